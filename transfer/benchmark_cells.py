"""What each kind of cell runs, what it depends on, and how its outputs are checked.

Every part is run as its own command (``python -m pretrain ...``, ``python -m transfer.detection ...``),
one process per cell, its output going to the cell's log file. The driver only builds command lines from
the shared contract (``--weights --data-root --seed --out --name --preset --record`` for the transfer
runners; ``out_dir= data.root= seed= resume=auto`` for pretraining), decides from fingerprints whether a
cell must run, and checks what it left behind. Kinds that take a second (the external checkpoint check,
the tables) run inside the driver.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.fileio import sha256_file
from transfer.benchmark_config import BenchmarkConfig, TaskSpec
from transfer.benchmark_plan import Cell
from transfer.benchmark_state import CellState, Problem
from transfer.records import (
    RecordError,
    make_record,
    model_from_meta,
    read_record,
    record_filename,
    write_record,
)
from transfer.results_index import masking_figure_path

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


def _looks_like_file(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg and Path(arg).suffix in (".yaml", ".yml", ".json") \
        and Path(arg).is_file()


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

        from transfer.toydata import MANIFEST

        manifest = ws.data_root / MANIFEST
        if not manifest.is_file():
            return Problem("missing", f"no toy world at {ws.data_root}")
        try:
            found = json.loads(manifest.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            return Problem("missing", f"{manifest} is unreadable; the toy world is regenerated")
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
        return Path(ws.config.pretrain.config_dir) / str(ws.config.methods[cell.method].config)

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


# ------------------------------------------------------------------------------------------- transfer


class Transfer(CellKind):
    """A detection or linear-evaluation run: one record per (model, task, seed)."""

    def task(self, cell: Cell, ws: Workspace) -> TaskSpec:
        return ws.config.tasks[str(cell.task)]

    def estimate(self, cell, ws):
        return self.task(cell, ws).estimate_s

    def record_path(self, cell: Cell, ws: Workspace) -> Path:
        return ws.records_dir / record_filename(self.task(cell, ws).record_task, str(cell.method), int(cell.seed))

    def weights(self, cell: Cell, deps: Deps) -> dict[str, Any]:
        return deps[cell.deps[-1]]

    def args(self, cell: Cell, ws: Workspace) -> list[str]:
        """The task's own arguments, with {runs_dir} {data_root} {preset} filled in."""
        values = {"runs_dir": str(ws.runs_dir), "data_root": str(ws.data_root), "preset": ws.preset}
        return [arg.format(**values) for arg in self.task(cell, ws).args]

    def inputs(self, cell, ws, deps):
        task = self.task(cell, ws)
        args = self.args(cell, ws)
        return {"task": task.key, "module": task.module, "args": args, "files": ws.file_digests(args),
                "weights_sha256": deps[cell.model_cell]["sha256"], "data": ws.data_inputs(deps),
                "seed": cell.seed, "name": cell.method, "preset": ws.preset}

    def command(self, cell, ws, deps):
        task = self.task(cell, ws)
        weights = self.weights(cell, deps)
        weights_file = weights["pkl"] if task.needs == "pkl" else weights["checkpoint"]
        command = [*ws.launcher(task.module, task.launcher), "--weights", weights_file,
                   "--data-root", str(ws.data_root), "--seed", str(cell.seed), "--out", str(ws.work_dir(cell)),
                   "--name", str(cell.method), "--preset", ws.preset, "--record", str(self.record_path(cell, ws))]
        if task.launcher == "num-gpus" and ws.gpus > 1:
            command += ["--num-gpus", str(ws.gpus)]
        return command + task.resume_args + self.args(cell, ws)  # last: detectron2 KEY VALUE overrides end the line

    def check(self, cell, ws, deps, state):
        path = self.record_path(cell, ws)
        if not path.exists():
            return Problem("missing", f"no record {path}")
        try:
            record = read_record(path)
        except RecordError as err:
            return Problem("corrupt", f"corrupt record ({str(err).replace(str(path) + ': ', '')}); moved to the attic, "
                           "recomputing", [path])
        if record["status"] != "ok":
            return Problem("failed", f"record {path.name} has status {record['status']}", [path])
        task = self.task(cell, ws)
        accepted = {deps[cell.model_cell]["sha256"], self.weights(cell, deps).get("sha256")}
        expected = {
            "task": (record["task"], task.record_task),
            "model.name": (record["model"].get("name"), cell.method),
            "seed": (record["seed"], cell.seed),
            "extra.preset": ((record.get("extra") or {}).get("preset"), ws.preset),
        }
        wrong = [f"{key} is {found!r}, expected {want!r}" for key, (found, want) in expected.items() if found != want]
        if record["weights"].get("sha256") not in accepted:
            wrong.append("computed from other weights (sha256 differs from the current checkpoint)")
        if wrong:
            return Problem("stale", f"record {path.name}: " + "; ".join(wrong), [path])
        return None

    def outputs(self, cell, ws, deps):
        path = self.record_path(cell, ws)
        record = read_record(path)  # raises on a runner that exited 0 without a valid record
        if record["status"] != "ok":
            raise RecordError(f"{path}: the runner exited 0 but its record has status {record['status']}")
        problem = self.check(cell, ws, deps, None)
        if problem is not None:
            raise RecordError(problem.message)
        return {"record": str(path), "metrics": record["metrics"], "protocol": record["protocol"],
                "wall_time_s": record.get("wall_time_s")}

    def stale_paths(self, cell, ws):
        return [self.record_path(cell, ws), ws.work_dir(cell)]

    def block_paths(self, cell, ws):
        return [self.record_path(cell, ws)]

    def describe(self, outputs):
        metrics = outputs.get("metrics") or {}
        if not metrics:
            return ""
        name, value = next(iter(metrics.items()))
        return f"{name} {value:.2f}"

    def record_failure(self, cell, ws, deps, error, started):
        """A ``failed`` record (unless the runner wrote its own during this attempt), so the tables say why."""
        path = self.record_path(cell, ws)
        try:
            existing = read_record(path)
            if existing["status"] == "ok" or (existing["status"] == "failed" and path.stat().st_mtime >= started):
                return  # never replace numbers; keep the runner's own account of its failure
        except (OSError, RecordError):
            pass
        task = self.task(cell, ws)
        model_outputs = deps.get(str(cell.model_cell)) or {}
        model = self._model_fields(cell, ws, model_outputs)
        record = make_record(
            task=task.record_task, protocol=task.protocol or _known_protocol(ws, task), seed=int(cell.seed),
            model=model, weights_path=model_outputs.get("checkpoint", ""),
            weights_sha256=model_outputs.get("sha256", ""), metrics={},
            config={"benchmark_cell": cell.id, "command_inputs": self.safe_inputs(cell, ws, deps)},
            status="failed", error=error,
            extra={"preset": ws.preset, "benchmark_cell": cell.id, "log": str(ws.log_path(cell)),
                   "written_by": "transfer.benchmark"},
        )
        write_record(path, record)

    def safe_inputs(self, cell, ws, deps) -> dict[str, Any]:
        try:
            return self.inputs(cell, ws, deps)
        except (KeyError, OSError):
            return {}

    @staticmethod
    def _model_fields(cell: Cell, ws: Workspace, model_outputs: dict[str, Any]) -> dict[str, Any]:
        checkpoint = model_outputs.get("checkpoint")
        if checkpoint and Path(checkpoint).is_file():
            try:
                from transfer.checkpoints import load_backbone

                return model_from_meta(load_backbone(checkpoint).meta, str(cell.method))
            except Exception:  # a checkpoint that does not load still gets a row from the config
                pass
        declared = dict(ws.config.methods[str(cell.method)].model)
        declared.update(name=str(cell.method), arch=ws.config.arch, input_filter={"name": "none"})
        return declared


def _known_protocol(ws: Workspace, task: TaskSpec) -> str:
    """The protocol other records of this task carry, so a failed record never splits the table."""
    from transfer.records import load_records

    records, _ = load_records([ws.records_dir]) if ws.records_dir.exists() else ([], [])
    for record in records:
        if record["task"] == task.record_task and (record.get("extra") or {}).get("preset") == ws.preset:
            return record["protocol"]
    return f"{ws.preset}:{task.key}"


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


KINDS: dict[str, CellKind] = {
    "data": ToyData(),
    "pretrain": Pretrain(),
    "random_init": RandomInit(),
    "external": External(),
    "convert": Convert(),
    "detection": Transfer(),
    "linear": Transfer(),
    "pictures": Pictures(),
    "tables": Tables(),
}
