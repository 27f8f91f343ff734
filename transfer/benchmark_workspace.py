"""Where one preset's run reads and writes, how it launches processes, and what its inputs hash to.

The :class:`Workspace` is shared by every cell kind (:mod:`transfer.benchmark_cells`): the preset's config,
its results/runs/data folders, the GPU count, and a cache of file hashes (checkpoints are hashed once per
run). :func:`config_tree_digests` hashes a YAML config together with the files it inherits from, so
editing any of them makes the cells that use it stale.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.fileio import sha256_file
from transfer.benchmark_config import BenchmarkConfig
from transfer.benchmark_plan import Cell

REPO_ROOT = Path(__file__).resolve().parents[1]

Deps = dict[str, dict[str, Any]]  # dependency cell id -> its outputs


@dataclass
class Workspace:
    """Where one preset's run reads and writes, and how it launches processes."""

    config: BenchmarkConfig
    runs_dir: Path
    results_dir: Path
    data_root: Path
    gpus: int = 1
    default_data_root: bool = True  # the preset's own data folder (not one named with --data-root)
    python: str = sys.executable
    _digests: dict[tuple[str, int, int], str] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return self.config.preset

    @property
    def records_dir(self) -> Path:
        return self.results_dir / "records"

    def log_path(self, cell: Cell) -> Path:
        return self.runs_dir / "logs" / f"{cell.slug}.log"

    def work_dir(self, cell: Cell) -> Path:
        return self.runs_dir / cell.id

    def sha256(self, path: str | os.PathLike) -> str:
        """sha256 of a file, cached on (path, size, mtime) for this run."""
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    def repo_file(self, path: str | os.PathLike) -> Path:
        """A relative path of the repository's own files (``configs/...``) that works from any directory."""
        path = Path(path)
        if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
            return path
        return REPO_ROOT / path

    def repo_args(self, args: list[str]) -> list[str]:
        return [str(self.repo_file(arg)) if _looks_like_relative_file(arg) else arg for arg in args]

    def file_digests(self, args: list[str]) -> dict[str, str]:
        """Contents of every config file named in a command line (and of the files it builds on): editing
        one makes its cells stale."""
        digests: dict[str, str] = {}
        for arg in args:
            if _looks_like_file(arg):
                digests.update(config_tree_digests(Path(arg), self))
        return digests

    def launcher(self, module: str, launcher: str) -> list[str]:
        if launcher == "torchrun" and self.gpus > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}",
                    "-m", module]
        return [self.python, "-m", module]

    def data_inputs(self, deps: Deps) -> dict[str, Any]:
        if "data" in deps:
            return {"toy_world_sha256": deps["data"].get("sha256")}
        return {"root": str(self.data_root.resolve())}


def _looks_like_relative_file(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg and Path(arg).suffix in (".yaml", ".yml", ".json") \
        and not Path(arg).is_absolute()


def _looks_like_file(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg and Path(arg).suffix in (".yaml", ".yml", ".json") \
        and Path(arg).is_file()


def config_tree_digests(path: Path, ws: Workspace, seen: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of a YAML config and of every file it inherits from (``_base_``: the pretraining and linear
    configs; ``_BASE_``: detectron2's), relative to the file."""
    if not path.is_file():
        return {str(path): "missing"}
    if path.resolve() in seen:
        return {}
    digests = {str(path): ws.sha256(path)}
    try:
        node = OmegaConf.load(path)
        bases = node.get("_base_") or node.get("_BASE_") or []
    except Exception:  # the part reports a broken file itself; its hash is enough here
        return digests
    for base in [bases] if isinstance(bases, str) else list(bases):
        digests.update(config_tree_digests(path.parent / str(base), ws, (*seen, path.resolve())))
    return digests
