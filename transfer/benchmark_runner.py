"""Runs a plan: skips what is done, runs the rest (``--jobs`` at a time), isolates failures.

A cell starts when every cell it needs has finished well. A failing cell is recorded as failed (its state,
and for transfer cells a ``failed`` record with the error, so the tables say why the number is missing);
the cells that need it are reported as blocked, and everything else continues. The tables cell waits for
all the others and runs whatever failed. Each process runs in its own session with its output in the
cell's log file; when the driver is stopped (Ctrl-C, SIGTERM) it stops its children, their cells stay
``running`` in the state, and the next run resumes them. If the driver is killed outright its children
die with it (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.provenance import utc_now
from transfer.benchmark_kinds import KINDS
from transfer.benchmark_plan import Cell, Plan
from transfer.benchmark_progress import Progress
from transfer.benchmark_state import Attic, CellState, StateStore, Verdict, decide, running_state
from transfer.benchmark_workspace import Deps, Workspace
from transfer.warm_start import (
    IMPORT_TIME_DEFAULTS,
    THREAD_VARIABLES,
    ForkedCell,
    WarmStarter,
    die_with_parent,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.2
STOP_GRACE_S = 20.0  # default of machine.stop_grace_s
LOG_TAIL_LINES = 25


@dataclass
class CellResult:
    cell: Cell
    status: str  # ok (ran) | done (skipped) | failed | blocked | left (not reached: interrupted)
    verdict: str = ""
    reason: str = ""
    wall_s: float | None = None
    error: str = ""
    log: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    cpu_s: float | None = None  # CPU seconds of the cell's processes (user + system), when it ran


@dataclass
class _Running:
    cell: Cell
    verdict: Verdict
    process: subprocess.Popen | ForkedCell
    log_handle: Any
    started: float
    started_wall: float
    deadline: float | None


class Stopped(BaseException):
    """The driver was asked to stop (SIGTERM); like KeyboardInterrupt it passes every ``except Exception``."""


def cell_environment(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a cell's process: ``threads`` per cell, the repository importable, and the preset's
    ``machine.env`` (a variable the user already set keeps the user's value)."""
    env = dict(os.environ)
    for name, value in (extra or {}).items():
        env.setdefault(name, value)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for name, value in IMPORT_TIME_DEFAULTS.items():
        env.setdefault(name, value)
    return env


class Runner:
    def __init__(self, plan: Plan, ws: Workspace, progress: Progress, jobs: int = 1, threads: int | None = None,
                 forced: set[str] | None = None, env: dict[str, str] | None = None, warm_start: bool = False,
                 stop_grace_s: float = STOP_GRACE_S):
        self.plan, self.ws, self.progress = plan, ws, progress
        self.warm = WarmStarter(enabled=warm_start)
        self.stop_grace_s = stop_grace_s  # after SIGTERM, how long a cell may take to save its step and exit
        self.env = dict(env or {})
        self.jobs = max(1, jobs)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.forced = forced or set()  # cell ids to rerun even when done (--force)
        self.store = StateStore(ws.runs_dir)
        self.attic = Attic(ws.runs_dir)
        self.results: dict[str, CellResult] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self._verdicts: dict[str, Verdict] = {}
        self._running: dict[str, _Running] = {}

    # -------------------------------------------------------------- decisions

    def deps_of(self, cell: Cell) -> Deps:
        ids = [*cell.deps, *([cell.model_cell] if cell.model_cell else [])]
        return {i: self.outputs.get(i, {}) for i in ids}

    def verdict(self, cell: Cell) -> Verdict:
        """Decide (once, when every dependency has its outputs) whether the cell must run, and why."""
        if cell.id not in self._verdicts:
            kind, deps = KINDS[cell.kind], self.deps_of(cell)
            state = self.store.get(cell.slug)
            inputs = kind.inputs(cell, self.ws, deps)
            problem = None if kind.always else kind.check(cell, self.ws, deps, state)
            self._verdicts[cell.id] = decide(state, inputs, problem, force=cell.id in self.forced, always=kind.always,
                                             stale_paths=kind.stale_paths(cell, self.ws))
        return self._verdicts[cell.id]

    def _blocker(self, cell: Cell) -> str | None:
        if cell.kind == "tables":
            return None
        for dep in cell.deps:
            result = self.results.get(dep)
            if result and result.status in ("failed", "blocked"):
                root = result.reason if result.status == "blocked" else f"{result.cell.title} failed"
                return root
        return None

    def _ready(self, cell: Cell) -> bool:
        return all(dep in self.results for dep in cell.deps)

    def preview(self) -> list[tuple[Cell, str, str, list[str] | None]]:
        """(cell, verdict, reason, command) for every cell, running nothing (``--dry-run``).

        A cell whose dependencies are not done yet shows ``waits``: its verdict is decided once they are.
        """
        rows = []
        for cell in self.plan:
            kind = KINDS[cell.kind]
            dep_ids = [*cell.deps, *([cell.model_cell] if cell.model_cell else [])]
            missing = list(dict.fromkeys(d for d in dep_ids if d not in self.outputs))
            if cell.kind == "tables":
                status, reason = "always", "regenerated at the end from every record"
            elif missing:
                status = "waits"
                reason = "after " + ", ".join(self.plan.cells[d].title for d in missing if d in self.plan.cells)
            else:
                try:
                    verdict = self.verdict(cell)
                    status, reason = verdict.status, verdict.reason
                except Exception as err:
                    status, reason = "error", f"cannot check the inputs: {err}"
            deps = {d: self.outputs.get(d) or KINDS[self.plan.cells[d].kind].expected_outputs(self.plan.cells[d], self.ws)
                    for d in dep_ids}
            if status == "done":
                self.outputs[cell.id] = kind.outputs(cell, self.ws, deps)
            elif cell.kind == "external" and status != "error":
                self.outputs[cell.id] = kind.expected_outputs(cell, self.ws)
            command = None if kind.runs_in_process(self.ws) else kind.command(cell, self.ws, deps)
            rows.append((cell, status, reason, command))
        return rows

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, CellResult]:
        pending = list(self.plan)
        previous = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}

        def stop(signum, frame):
            raise Stopped(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        try:
            while pending or self._running:
                pending = self._launch(pending)
                self._poll()
                self.progress.eta([(c, KINDS[c.kind].estimate(c, self.ws)) for c in pending])
                self.progress.draw()
                if self._running:
                    time.sleep(POLL_S)
        except (KeyboardInterrupt, Stopped) as why:
            self._stop_children(str(why) or "interrupted")
            for cell in pending:
                self.results.setdefault(cell.id, CellResult(cell, "left", reason="not reached"))
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.close()
        return self.results

    def _launch(self, pending: list[Cell]) -> list[Cell]:
        still: list[Cell] = []
        blocked: dict[str, list[Cell]] = {}
        for cell in pending:
            blocker = self._blocker(cell)
            if blocker is not None:
                self._block(cell, blocker)
                blocked.setdefault(blocker, []).append(cell)
                continue
            if not self._ready(cell) or (cell.kind == "tables" and self._running):
                still.append(cell)
                continue
            try:
                KINDS[cell.kind].precheck(cell, self.ws)
                verdict = self.verdict(cell)
            except Exception as err:  # an input that cannot be read (a deleted checkpoint): the cell fails
                self._fail(cell, Verdict("todo"), f"cannot start: {err}", None, time.time())
                continue
            if verdict.status == "done":
                self._skip(cell, verdict)
                continue
            kind = KINDS[cell.kind]
            if kind.runs_in_process(self.ws):
                self._run_in_process(cell, verdict)
            elif len(self._running) < self.jobs:
                self._spawn(cell, verdict)
            else:
                still.append(cell)
        for cause, cells in blocked.items():
            self.progress.blocked(cause, cells)
        return still

    def _skip(self, cell: Cell, verdict: Verdict) -> None:
        kind, deps = KINDS[cell.kind], self.deps_of(cell)
        outputs = kind.outputs(cell, self.ws, deps)
        state = self.store.get(cell.slug)
        if state is None or state.status != "ok" or state.outputs != outputs:
            # adopt outputs found without a state (or re-hashed ones), so the next run knows them
            self.store.put(cell.slug, CellState(
                cell=cell.id, kind=cell.kind, status="ok", fingerprint=verdict.fingerprint, inputs=verdict.inputs,
                outputs=outputs, started=state.started if state else "", finished=state.finished if state else utc_now(),
                wall_s=state.wall_s if state else None, log=str(self.ws.log_path(cell)),
                attempts=state.attempts if state else 0))
        self.outputs[cell.id] = outputs
        self.results[cell.id] = CellResult(cell, "done", verdict.status, verdict.reason, outputs=outputs)
        self.progress.finish(cell, "done")

    def _prepare(self, cell: Cell, verdict: Verdict) -> tuple[Path, CellState]:
        self.progress.note(cell, verdict.status, verdict.reason)
        for path in verdict.quarantine:
            self.attic.keep(cell.slug, path)
        log = self.ws.log_path(cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        state = running_state(cell.id, cell.kind, verdict, log, self.store.get(cell.slug))
        self.store.put(cell.slug, state)
        return log, state

    def _spawn(self, cell: Cell, verdict: Verdict) -> None:
        kind, deps = KINDS[cell.kind], self.deps_of(cell)
        log, _ = self._prepare(cell, verdict)
        command = kind.command(cell, self.ws, deps)
        handle = open(log, "a", encoding="utf-8")
        handle.write(f"\n==== {utc_now()} {cell.id}: {verdict.status} ({verdict.reason})\n$ "
                     f"{subprocess.list2cmdline(command)}\n")
        handle.flush()
        env = cell_environment(self.threads, self.env)
        process = self.warm.start(command, handle, env, self.threads) or subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        timeout = self._timeout(cell)
        now = time.monotonic()
        self._running[cell.id] = _Running(cell, verdict, process, handle, now, time.time(),
                                          now + timeout if timeout else None)
        self.progress.start(cell, kind.estimate(cell, self.ws))

    def _timeout(self, cell: Cell) -> float | None:
        if cell.kind == "pretrain":
            return self.ws.config.pretrain.timeout_s
        if cell.task:
            return self.ws.config.tasks[cell.task].timeout_s
        return None

    def _run_in_process(self, cell: Cell, verdict: Verdict) -> None:
        kind, deps = KINDS[cell.kind], self.deps_of(cell)
        log, _ = self._prepare(cell, verdict)
        self.progress.start(cell, kind.estimate(cell, self.ws))
        start, start_wall, start_cpu = time.monotonic(), time.time(), time.process_time()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"\n==== {utc_now()} {cell.id} (in the driver)\n")
            try:
                outputs = kind.run_in_process(cell, self.ws, deps, handle)
            except Exception as err:
                handle.write(traceback.format_exc())
                self._fail(cell, verdict, f"{type(err).__name__}: {err}", time.monotonic() - start, start_wall)
                return
        self._succeed(cell, verdict, outputs, time.monotonic() - start, time.process_time() - start_cpu)

    def _poll(self) -> None:
        for cell_id, job in list(self._running.items()):
            code, cpu = _reap(job.process)
            if code is None:
                if job.deadline and time.monotonic() > job.deadline:
                    self._terminate(job)
                    job.log_handle.write("\n[benchmark] stopped: ran past its timeout\n")
                    code, cpu = "timeout", None
                else:
                    continue
            del self._running[cell_id]
            job.log_handle.close()
            wall = time.monotonic() - job.started
            cell, kind = job.cell, KINDS[job.cell.kind]
            if code == 0:
                try:
                    outputs = kind.outputs(cell, self.ws, self.deps_of(cell))
                except Exception as err:
                    self._fail(cell, job.verdict, f"exited 0 but its output is not usable: {err}", wall,
                               job.started_wall)
                    continue
                self._succeed(cell, job.verdict, outputs, wall, cpu)
            else:
                why = f"timed out after {clock_s(wall)}" if code == "timeout" else f"exit status {code}"
                self._fail(cell, job.verdict, f"{why}: {log_tail(self.ws.log_path(cell), 1)}", wall,
                           job.started_wall, full_error=log_tail(self.ws.log_path(cell), LOG_TAIL_LINES))

    def _succeed(self, cell: Cell, verdict: Verdict, outputs: dict[str, Any], wall: float,
                 cpu: float | None = None) -> None:
        state = self.store.get(cell.slug)
        self.store.put(cell.slug, CellState(
            cell=cell.id, kind=cell.kind, status="ok", fingerprint=verdict.fingerprint, inputs=verdict.inputs,
            outputs=outputs, started=state.started if state else "", finished=utc_now(), wall_s=round(wall, 2),
            cpu_s=None if cpu is None else round(cpu, 2), log=str(self.ws.log_path(cell)),
            attempts=state.attempts if state else 1))
        self.outputs[cell.id] = outputs
        self.results[cell.id] = CellResult(cell, "ok", verdict.status, verdict.reason, wall, outputs=outputs,
                                           log=str(self.ws.log_path(cell)), cpu_s=cpu)
        self.progress.finish(cell, "ok", wall, KINDS[cell.kind].describe(outputs))

    def _fail(self, cell: Cell, verdict: Verdict, message: str, wall: float | None, started_wall: float,
              full_error: str | None = None) -> None:
        log = self.ws.log_path(cell)
        error = f"{full_error or message}\n(log: {log})"
        state = self.store.get(cell.slug)
        if state is not None and verdict.fingerprint:
            state.status, state.error, state.finished = "failed", error, utc_now()
            state.wall_s = round(wall, 2) if wall is not None else None
            self.store.put(cell.slug, state)
        with contextlib.suppress(Exception):
            KINDS[cell.kind].record_failure(cell, self.ws, self.deps_of(cell), error, started_wall)
        self.results[cell.id] = CellResult(cell, "failed", verdict.status, message, wall, error, str(log))
        self.progress.finish(cell, "failed", wall, message, str(log))

    def _block(self, cell: Cell, blocker: str) -> None:
        reason = f"blocked: {blocker}"
        kind = KINDS[cell.kind]
        # What the cell produced before came from inputs that are being replaced (their producer reran and
        # failed): keep it in the attic, not beside the new matrix's records.
        for path in kind.block_paths(cell, self.ws):
            self.attic.keep(cell.slug, path)
        with contextlib.suppress(Exception):
            kind.record_failure(cell, self.ws, self.deps_of(cell), reason, time.time())
        self.results[cell.id] = CellResult(cell, "blocked", reason=blocker)
        self.progress.finish(cell, "blocked", detail=blocker)

    # ------------------------------------------------------------------ stop

    def _terminate(self, job: _Running) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signal.SIGTERM)
        try:
            job.process.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGKILL)
            job.process.wait()

    def _stop_children(self, why: str) -> None:
        for job in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for job in self._running.values():
            try:
                job.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
            job.log_handle.write(f"\n[benchmark] stopped ({why}); the next run resumes this cell\n")
            job.log_handle.close()
            self.results[job.cell.id] = CellResult(job.cell, "left", job.verdict.status, f"stopped ({why})",
                                                   log=str(self.ws.log_path(job.cell)))
        self._running.clear()


def _reap(process: subprocess.Popen) -> tuple[int | None, float | None]:
    """(exit status, CPU seconds of the process and the children it waited for) once it ended, else (None, None).

    ``os.wait4`` gives the resource usage that ``Popen.poll`` throws away: CPU time, unlike wall time, does not
    depend on what else the machine is doing, so the budgets in docs/benchmark.md are kept in CPU seconds too.
    """
    if process.returncode is not None:
        return process.returncode, None
    try:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    except ChildProcessError:
        return process.poll(), None
    if pid == 0:
        return None, None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def log_tail(path: Path, lines: int) -> str:
    """The last non-empty lines of a log (tqdm's carriage-return updates collapsed)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64_000))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    kept = [line.split("\r")[-1].rstrip() for line in text.splitlines()]
    kept = [line for line in kept if line.strip() and not line.startswith("====") and not line.startswith("$ ")]
    return "\n".join(kept[-lines:]) if kept else "(empty log)"


def clock_s(seconds: float) -> str:
    return f"{seconds:.0f} s"
