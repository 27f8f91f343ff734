"""Transfer cells: one detection or linear-evaluation run per (model, task, seed), and its record.

The runner (``python -m transfer.detection`` / ``python -m transfer.linear``, or any module with the same
contract) gets ``--weights --data-root --seed --out --name --preset --record`` plus the preset's
arguments for the task. The cell is done when its record is valid: status ok, this preset, this name, seed
and task, computed from the current weights. When a run fails without writing its own failed record, or is
blocked by a failed dependency, the driver writes one (``status: failed`` with the error and the log
path), so the tables say why a number is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer.benchmark_cells import CellKind
from transfer.benchmark_config import TaskSpec
from transfer.benchmark_plan import Cell
from transfer.benchmark_state import Problem
from transfer.benchmark_workspace import Deps, Workspace
from transfer.records import (
    RecordError,
    make_record,
    model_from_meta,
    read_record,
    record_filename,
    write_record,
)


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
        """The task's own arguments, with {runs_dir} {data_root} {preset} filled in (repository files found
        from any working directory)."""
        values = {"runs_dir": str(ws.runs_dir), "data_root": str(ws.data_root), "preset": ws.preset}
        return ws.repo_args([arg.format(**values) for arg in self.task(cell, ws).args])

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
