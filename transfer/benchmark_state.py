"""Which cells are done, stale, corrupt, interrupted or failed, and what a rerun does about each.

Every cell has a state file ``runs/<preset>/cells/<cell>.json`` (written atomically) holding the
*fingerprint* of its inputs (a hash over the command's meaning: config files' contents, overrides, the
upstream checkpoint's sha256, the data, seed, name, preset), its status and its outputs. On every run a
cell's verdict is decided from that file and from the outputs themselves, never from the state alone:

========== =====================================================================================
done       same fingerprint and the outputs check out (record valid, checkpoint loads): skipped
todo       never run (no state): run it (a runner itself skips when its own valid record exists)
resume     same fingerprint, status ``running``: the last run was interrupted; run it with the
           parts' resume options, it continues where it stopped
retry      same fingerprint, status ``failed``: run it again
missing    same fingerprint, status ``ok``, but the outputs are gone: run it again
stale      the inputs changed (or ``--force``): the old outputs move to the attic, the cell reruns
           from scratch, so old numbers are never mixed with new ones
corrupt    an output does not load or does not follow the schema: reported, moved to the attic,
           recomputed; never trusted
========== =====================================================================================

The attic (``runs/<preset>/attic/<time>/<cell>/``) keeps what was moved aside, for inspection; deleting
it is always safe.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.fileio import atomic_write_json, sha256_json
from pretrain.provenance import utc_now

STATE_SCHEMA = "masked-ssl-benchmark-cell/v1"
RUN_VERDICTS = ("todo", "resume", "retry", "missing", "stale", "corrupt")


@dataclass
class CellState:
    cell: str
    kind: str
    status: str  # running | ok | failed
    fingerprint: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    wall_s: float | None = None
    cpu_s: float | None = None
    log: str = ""
    error: str = ""
    attempts: int = 0
    schema: str = STATE_SCHEMA


@dataclass
class Problem:
    """Why a cell's outputs cannot be trusted: ``missing`` | ``corrupt`` | ``stale`` | ``failed``."""

    kind: str
    message: str
    paths: list[Path] = field(default_factory=list)  # files to move to the attic before rerunning


@dataclass
class Verdict:
    status: str  # done | todo | resume | retry | missing | stale | corrupt | always
    reason: str = ""
    fingerprint: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    quarantine: list[Path] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        return self.status != "done"


def fingerprint(inputs: dict[str, Any]) -> str:
    return sha256_json(inputs)


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (to say *why* a cell is stale)."""
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(describe_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes.append(f"{prefix}{key}")
    return changes


class StateStore:
    """The state files of one preset's cells."""

    def __init__(self, runs_dir: Path):
        self.directory = Path(runs_dir) / "cells"

    def path(self, slug: str) -> Path:
        return self.directory / f"{slug}.json"

    def get(self, slug: str) -> CellState | None:
        path = self.path(slug)
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema") != STATE_SCHEMA:
                return None
            return CellState(**{k: v for k, v in raw.items() if k in CellState.__dataclass_fields__})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # an unreadable state means "unknown": the outputs are checked and the cell reruns

    def put(self, slug: str, state: CellState) -> None:
        atomic_write_json(self.path(slug), asdict(state))

    def forget(self, slug: str) -> None:
        self.path(slug).unlink(missing_ok=True)


class Attic:
    """Where stale and corrupt outputs go instead of being deleted."""

    def __init__(self, runs_dir: Path):
        self.root = Path(runs_dir) / "attic"
        self.stamp = time.strftime("%Y%m%d-%H%M%S")

    def keep(self, slug: str, path: Path) -> Path | None:
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            return None
        target_dir = self.root / self.stamp / slug
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / path.name
        counter = 1
        while target.exists():
            target = target_dir / f"{path.name}.{counter}"
            counter += 1
        shutil.move(str(path), str(target))
        return target


def decide(
    state: CellState | None,
    inputs: dict[str, Any],
    problem: Problem | None,
    force: bool = False,
    always: bool = False,
    stale_paths: list[Path] | None = None,
) -> Verdict:
    """The verdict table of the module docstring, from the state, the current inputs and the outputs' check."""
    fp = fingerprint(inputs)
    base = {"fingerprint": fp, "inputs": inputs}
    if always:
        return Verdict("always", "runs every time", **base)
    stale_paths = [p for p in (stale_paths or []) if p.exists()]
    if force:
        return Verdict("stale", "--force", quarantine=stale_paths, **base)
    if state is not None and state.fingerprint != fp:
        changed = describe_changes(state.inputs or {}, inputs) or ["fingerprint"]
        return Verdict("stale", "inputs changed: " + ", ".join(changed[:6]), quarantine=stale_paths, **base)
    if problem is None:
        return Verdict("done", "up to date" if state else "outputs found and valid", **base)
    if problem.kind == "corrupt":
        return Verdict("corrupt", problem.message, quarantine=problem.paths, **base)
    if problem.kind == "stale":
        return Verdict("stale", problem.message, quarantine=stale_paths or problem.paths, **base)
    if problem.kind == "failed" and state is None:
        return Verdict("retry", problem.message, quarantine=problem.paths, **base)
    if state is None:
        return Verdict("todo", "not run yet", quarantine=problem.paths, **base)
    if state.status == "running":
        return Verdict("resume", f"interrupted run of {state.started or 'an earlier run'}", quarantine=problem.paths,
                       **base)
    if state.status == "failed":
        return Verdict("retry", f"failed before: {state.error.strip().splitlines()[-1] if state.error else '?'}",
                       quarantine=problem.paths, **base)
    return Verdict("missing", problem.message, quarantine=problem.paths, **base)


def running_state(slug_id: str, kind: str, verdict: Verdict, log: Path, previous: CellState | None) -> CellState:
    attempts = (previous.attempts if previous and previous.fingerprint == verdict.fingerprint else 0) + 1
    return CellState(cell=slug_id, kind=kind, status="running", fingerprint=verdict.fingerprint,
                     inputs=verdict.inputs, started=utc_now(), log=str(log), attempts=attempts,
                     outputs={"pid": os.getpid()})
