"""What each kind of cell runs, what it depends on, and how its outputs are checked.

Every part is run as its own command (``python -m pretrain ...``, ``python -m transfer.detection ...``),
one process per cell, its output going to the cell's log file. The driver only builds command lines from
the shared contract (``--weights --data-root --seed --out --name --preset --record`` for the transfer
runners; ``out_dir= data.root= seed= resume=auto`` for pretraining), decides from fingerprints whether a
cell must run, and checks what it left behind. Kinds that take a second (the external checkpoint check,
the tables) run inside the driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.fileio import sha256_file
from transfer.benchmark_plan import Cell
from transfer.benchmark_state import CellState, Problem
from transfer.benchmark_workspace import Deps, Workspace, config_tree_digests
from transfer.results_index import masking_figure_path


class CellKind:
    """Behaviour shared by every kind; subclasses fill in the parts that differ."""

    in_process = False  # run inside the driver (fast checks) instead of as a subprocess
    always = False  # no skipping: runs on every invocation (cheap and a pure function of other outputs)

    def runs_in_process(self, ws: Workspace) -> bool:
        return self.in_process

    def estimate(self, cell: Cell, ws: Workspace) -> float:
        return 10.0

    def inputs(self, cell: Cell, ws: Workspace, deps: Deps) -> dict[str, Any]:
        return {}

    def command(self, cell: Cell, ws: Workspace, deps: Deps) -> list[str]:
        raise NotImplementedError

    def precheck(self, cell: Cell, ws: Workspace) -> None:
        """Raise with a clear message when the cell cannot possibly run (saves starting a process)."""

    def check(self, cell: Cell, ws: Workspace, deps: Deps, state: CellState | None) -> Problem | None:
        """None when the outputs are present and valid; else what is wrong with them."""
        return None

    def outputs(self, cell: Cell, ws: Workspace, deps: Deps) -> dict[str, Any]:
        return {}

    def expected_outputs(self, cell: Cell, ws: Workspace) -> dict[str, Any]:
        """Where the outputs will be, before they exist (to show a plan's commands)."""
        return {"sha256": "<pending>"}

    def stale_paths(self, cell: Cell, ws: Workspace) -> list[Path]:
        """What goes to the attic when the cell's inputs changed."""
        return [ws.work_dir(cell)]

    def run_in_process(self, cell: Cell, ws: Workspace, deps: Deps, log) -> dict[str, Any]:
        raise NotImplementedError

    def record_failure(self, cell: Cell, ws: Workspace, deps: Deps, error: str, started: float) -> None:
        """Leave a trace of a failure where the tables look (transfer cells only)."""

    def block_paths(self, cell: Cell, ws: Workspace) -> list[Path]:
        """Outputs to move aside when a cell is blocked (its inputs failed to be remade)."""
        return []

    def describe(self, outputs: dict[str, Any]) -> str:
        return ""


# ------------------------------------------------------------------------------------------------- data


class ToyData(CellKind):
    def estimate(self, cell, ws):
        return 15.0 * float((ws.config.toy_world or {}).get("scale", 1.0))

    def _settings(self, ws: Workspace) -> dict[str, Any]:
        toy = ws.config.toy_world or {}
        return {"seed": int(toy.get("seed", 0)), "scale": float(toy.get("scale", 1.0)),
                "num_classes": int(toy.get("classes", 8))}

    def inputs(self, cell, ws, deps):
        return {"toy_world": self._settings(ws), "root": str(ws.data_root.resolve())}

    def command(self, cell, ws, deps):
        s = self._settings(ws)
        return [ws.python, "-m", "transfer", "make-toy-data", str(ws.data_root), "--seed", str(s["seed"]),
                "--scale", str(s["scale"]), "--classes", str(s["num_classes"]), "--force"]

    def check(self, cell, ws, deps, state):
        import json

        from transfer.toydata import MANIFEST, TOY_WORLD_VERSION

        manifest = ws.data_root / MANIFEST
        if not manifest.is_file():
            return Problem("missing", f"no toy world at {ws.data_root}")
        try:
            written = json.loads(manifest.read_text())
            found, version = written["config"], written.get("version")
        except (ValueError, KeyError, TypeError):
            return Problem("missing", f"{manifest} is unreadable; the toy world is regenerated")
        if version != TOY_WORLD_VERSION:
            return Problem("missing", f"the toy world at {ws.data_root} is version {version}, this suite writes "
                                      f"{TOY_WORLD_VERSION}; regenerated")
        wanted = self._settings(ws)
        differing = [key for key, value in wanted.items() if found.get(key) != value]
        if differing:
            return Problem("missing", f"the toy world at {ws.data_root} differs in {differing}; regenerated")
        return None

    def outputs(self, cell, ws, deps):
        from transfer.toydata import MANIFEST

        return {"root": str(ws.data_root.resolve()), "sha256": sha256_file(ws.data_root / MANIFEST)}

    def expected_outputs(self, cell, ws):
        return {"root": str(ws.data_root), "sha256": "<pending>"}

    def stale_paths(self, cell, ws):
        return []  # make-toy-data --force replaces only the toy world's own entries


# ----------------------------------------------------------------------------------------- checkpoints


class _CheckpointKind(CellKind):
    def checkpoint_path(self, cell: Cell, ws: Workspace) -> Path:
        return ws.work_dir(cell) / "final.pth"

    def check(self, cell, ws, deps, state):
        from pretrain.checkpoint import CheckpointError, load_checkpoint

        path = self.checkpoint_path(cell, ws)
        if not path.is_file():
            return Problem("missing", f"{path} does not exist")
        try:
            meta = load_checkpoint(path)["meta"]
        except (CheckpointError, OSError, RuntimeError, EOFError) as err:
            return Problem("corrupt", f"{path} does not load ({err})", [path])
        if not meta.get("finished", False):
            return Problem("missing", f"{path} is not a finished run")
        return None

    def outputs(self, cell, ws, deps):
        path = self.checkpoint_path(cell, ws)
        return {"checkpoint": str(path.resolve()), "sha256": ws.sha256(path)}

    def expected_outputs(self, cell, ws):
        return {"checkpoint": str(self.checkpoint_path(cell, ws)), "sha256": "<pending>"}


class Pretrain(_CheckpointKind):
    def estimate(self, cell, ws):
        return ws.config.pretrain.estimate_s

    def config_file(self, cell: Cell, ws: Workspace) -> Path:
        return ws.repo_file(Path(ws.config.pretrain.config_dir) / str(ws.config.methods[cell.method].config))

    def precheck(self, cell, ws):
        path = self.config_file(cell, ws)
        if not path.is_file():
            raise FileNotFoundError(f"no pretraining config {path} (methods.{cell.method}.config with "
                                    f"pretrain.config_dir in {ws.config.source})")

    def inputs(self, cell, ws, deps):
        method = ws.config.methods[cell.method]
        config = self.config_file(cell, ws)
        return {"config": str(config), "config_files": config_tree_digests(config, ws),
                "overrides": [*ws.config.pretrain.overrides, *method.overrides], "seed": cell.seed,
                "data": ws.data_inputs(deps)}

    def command(self, cell, ws, deps):
        spec, method = ws.config.pretrain, ws.config.methods[cell.method]
        return [*ws.launcher(spec.module, spec.launcher), str(self.config_file(cell, ws)),
                f"out_dir={ws.work_dir(cell)}", f"data.root={ws.data_root / spec.data_subdir}", f"seed={cell.seed}",
                *spec.resume_args, *spec.overrides, *method.overrides]


class RandomInit(_CheckpointKind):
    def estimate(self, cell, ws):
        return 4.0

    def inputs(self, cell, ws, deps):
        return {"arch": ws.config.arch, "seed": cell.seed, "image_size": ws.config.image_size}

    def command(self, cell, ws, deps):
        return [ws.python, "-m", "pretrain.random_init", str(self.checkpoint_path(cell, ws)), "--arch",
                ws.config.arch, "--seed", str(cell.seed), "--image-size", str(ws.config.image_size)]


class External(CellKind):
    """A third-party checkpoint: checked with the suite's intake (a clear refusal if it is no ResNet)."""

    in_process = True
    always = True

    def estimate(self, cell, ws):
        return 2.0

    def path(self, cell: Cell, ws: Workspace) -> Path:
        return Path(str(ws.config.methods[cell.method].checkpoint)).expanduser()

    def run_in_process(self, cell, ws, deps, log):
        from transfer.checkpoints import load_backbone

        path = self.path(cell, ws)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        backbone = load_backbone(path)
        print(f"{path}: {backbone.arch} trunk under '{backbone.key_prefix}' ({backbone.source_format}); "
              f"sha256 {backbone.sha256}", file=log)
        for note in backbone.notes:
            print(f"  {note}", file=log)
        return {"checkpoint": str(path.resolve()), "sha256": backbone.sha256, "arch": backbone.arch}

    def expected_outputs(self, cell, ws):
        path = self.path(cell, ws)
        return {"checkpoint": str(path), "sha256": ws.sha256(path) if path.is_file() else "<missing>"}

    def stale_paths(self, cell, ws):
        return []


# ------------------------------------------------------------------------------------------- conversion


class Convert(CellKind):
    def estimate(self, cell, ws):
        return ws.config.convert_estimate_s

    def pkl_path(self, cell: Cell, ws: Workspace) -> Path:
        return ws.work_dir(cell) / "detectron2.pkl"

    def inputs(self, cell, ws, deps):
        return {"source_sha256": deps[cell.model_cell]["sha256"]}

    def command(self, cell, ws, deps):
        pkl = self.pkl_path(cell, ws)
        return [ws.python, "-m", "transfer.convert", deps[cell.model_cell]["checkpoint"], str(pkl),
                "--report", str(pkl.with_suffix(".report.json")), "--force"]

    def check(self, cell, ws, deps, state):
        pkl = self.pkl_path(cell, ws)
        if not pkl.is_file():
            return Problem("missing", f"{pkl} does not exist")
        if state is not None and state.outputs.get("sha256") not in (None, ws.sha256(pkl)):
            return Problem("corrupt", f"{pkl} changed since it was converted", [pkl])
        return None

    def outputs(self, cell, ws, deps):
        pkl = self.pkl_path(cell, ws)
        model = deps[cell.model_cell]
        return {"pkl": str(pkl.resolve()), "sha256": ws.sha256(pkl), "checkpoint": model["checkpoint"],
                "source_sha256": model["sha256"]}

    def expected_outputs(self, cell, ws):
        return {"pkl": str(self.pkl_path(cell, ws)), "sha256": "<pending>"}


# ------------------------------------------------------------------------------------ pictures, tables


class Pictures(CellKind):
    """``figures/masking_<name>.png``: the run's last-epoch picture, or one rendered by a configured command."""

    def runs_in_process(self, ws):
        return ws.config.pictures is None or ws.config.pictures.module is None

    def estimate(self, cell, ws):
        return ws.config.pictures.estimate_s if ws.config.pictures else 1.0

    def out(self, cell: Cell, ws: Workspace) -> Path:
        return masking_figure_path(ws.results_dir, str(cell.method))

    def _values(self, cell, ws, deps) -> dict[str, str]:
        model = deps[cell.model_cell]
        return {"checkpoint": model["checkpoint"], "data_root": str(ws.data_root), "out": str(self.out(cell, ws)),
                "run_dir": str(Path(model["checkpoint"]).parent), "name": str(cell.method),
                "pretrain_data": str(ws.data_root / ws.config.pretrain.data_subdir)}

    def inputs(self, cell, ws, deps):
        spec = ws.config.pictures
        return {"module": spec.module if spec else None, "args": spec.args if spec else [],
                "weights_sha256": deps[cell.model_cell]["sha256"], "data": ws.data_inputs(deps)}

    def command(self, cell, ws, deps):
        spec = ws.config.pictures
        values = self._values(cell, ws, deps)
        return [ws.python, "-m", str(spec.module), *(arg.format(**values) for arg in spec.args)]

    def run_in_process(self, cell, ws, deps, log):
        import shutil

        from pretrain.fileio import atomic_write_bytes

        run_dir = Path(deps[cell.model_cell]["checkpoint"]).parent
        pictures = sorted((run_dir / "pictures").glob("epoch_*.png"))
        if not pictures:
            raise FileNotFoundError(f"{run_dir}/pictures/ holds no epoch_*.png: the pretraining run rendered no "
                                    "picture (visualize.enabled=false?)")
        out = self.out(cell, ws)
        atomic_write_bytes(out, pictures[-1].read_bytes())
        shutil.copystat(pictures[-1], out)
        print(f"{pictures[-1]} -> {out}", file=log)
        return {"picture": str(out), "source": str(pictures[-1])}

    def check(self, cell, ws, deps, state):
        out = self.out(cell, ws)
        return None if out.is_file() and out.stat().st_size > 0 else Problem("missing", f"no picture {out}")

    def outputs(self, cell, ws, deps):
        if self.check(cell, ws, deps, None) is not None:
            raise FileNotFoundError(f"the picture command exited 0 but wrote no {self.out(cell, ws)}")
        return {"picture": str(self.out(cell, ws))}

    def stale_paths(self, cell, ws):
        return [self.out(cell, ws)]


class Tables(CellKind):
    """``transfer.tables.write_all`` over the preset's records: always regenerated (a pure function of them)."""

    in_process = True
    always = True

    def estimate(self, cell, ws):
        return 8.0

    def run_in_process(self, cell, ws, deps, log):
        from transfer.records import load_records
        from transfer.tables import write_all

        records, _ = load_records([ws.results_dir]) if ws.results_dir.exists() else ([], [])
        if not records:
            print("no records yet: nothing to tabulate", file=log)
            return {"index": None}
        data, index = write_all(ws.results_dir, preset=ws.preset)
        print(f"tables from {len(data.winners)} records -> {index}", file=log)
        for path, problem in data.invalid:
            print(f"invalid record {path}: {problem}", file=log)
        return {"index": str(index), "records": len(data.winners), "invalid": len(data.invalid)}

    def stale_paths(self, cell, ws):
        return []
