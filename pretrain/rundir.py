"""The pretraining run directory and what a new invocation does with an existing one.

Layout (``out_dir``)::

    config.yaml           the resolved config of the run
    checkpoint_last.pth   suite checkpoint + ``training`` state (resume=auto continues from it)
    final.pth             suite checkpoint, meta.finished = true, no training state (for transfer tasks)
    metrics.jsonl         one JSON line per epoch (epoch 0: before training)
    log.txt               the run log
    tb/                   TensorBoard scalars
    pictures/             epoch_NNN.png

A finished run is never overwritten without ``--force``: rerunning the same config reports it and does
nothing; a different config is an error. An unfinished run is continued (``resume: auto``) only with a
config that computes the same thing (runtime keys such as ``data.num_workers`` may differ).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CheckpointError, load_checkpoint
from pretrain.config import config_differences, without_runtime_keys
from pretrain.fileio import atomic_write_text

FINAL = "final.pth"
LAST = "checkpoint_last.pth"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOG = "log.txt"
TB = "tb"
PICTURES = "pictures"
OWNED = (FINAL, LAST, CONFIG, METRICS, LOG, TB, PICTURES)


class RunDirError(RuntimeError):
    """The run directory holds something this invocation must not touch."""


@dataclass
class Decision:
    action: str  # "fresh" | "resume" | "skip"
    checkpoint: Path | None = None
    message: str = ""


def decide(out_dir: Path, config: dict[str, Any], resume: str, force: bool) -> Decision:
    """What to do with ``out_dir`` for this config (run on the main process only)."""
    final, last = out_dir / FINAL, out_dir / LAST
    _check_writable(out_dir)
    explicit = Path(resume) if resume not in ("auto", "never") else None
    if explicit is not None and not explicit.exists():
        raise RunDirError(f"resume={resume}: no such checkpoint")
    if force:
        if explicit is not None and explicit.resolve() in {(out_dir / name).resolve() for name in (FINAL, LAST)}:
            raise RunDirError(f"--force clears {out_dir}, which would delete resume={resume} before resuming from "
                              "it: copy the checkpoint out of the run directory first, or drop --force")
        if explicit is not None:
            _check_resumable(explicit, config, f"cannot resume from {explicit}")
        clear(out_dir)
        if explicit is not None:
            return Decision("resume", explicit, f"--force: cleared {out_dir}; resuming from {resume}")
        return Decision("fresh", message=f"--force: cleared {out_dir}")
    if final.exists():
        meta = _meta(final)
        if meta.get("finished"):
            diff = config_differences(without_runtime_keys(meta.get("config", {})), without_runtime_keys(config))
            if not diff:
                return Decision("skip", final, f"{out_dir} already holds this finished run ({final}); nothing to "
                                               "do (pass --force to train again)")
            raise RunDirError(
                f"{out_dir} holds a finished run with a different config ({'; '.join(diff[:6])}). Choose another "
                "out_dir=..., or pass --force to overwrite it"
            )
    if explicit is not None:
        _check_resumable(explicit, config, f"cannot resume from {explicit}")
        return Decision("resume", explicit, f"resuming from {explicit}")
    if last.exists():
        if resume == "never":
            raise RunDirError(f"{out_dir} holds an unfinished run ({last}); use resume=auto to continue it, "
                              "or --force to start over")
        meta = _meta(last)
        diff = config_differences(without_runtime_keys(meta.get("config", {})), without_runtime_keys(config))
        if diff:
            raise RunDirError(
                f"cannot resume {last}: the config differs ({'; '.join(diff[:6])}). Use the original config, "
                "another out_dir=..., or --force to start over"
            )
        return Decision("resume", last, f"resuming {last} (epoch {meta.get('epoch')}, "
                                        f"step {meta.get('step_in_epoch', 0)} of that epoch)")
    return Decision("fresh")


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"out_dir={out_dir} is a file, not a directory: choose another out_dir=...")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create the run directory {out_dir} ({err.strerror}): set out_dir=... to a "
                          "writable directory") from err


def _check_resumable(path: Path, config: dict[str, Any], what: str) -> None:
    """``resume=PATH`` continues a run only with a config that computes the same thing (as resume=auto)."""
    try:
        checkpoint = load_checkpoint(path, foreign_hint="resume=... takes the checkpoint_last.pth of an "
                                     "interrupted `python -m pretrain` run")
    except CheckpointError as err:  # a foreign, truncated or unsafe file
        raise RunDirError(f"{what}: {err}") from err
    if checkpoint.get("training") is None:
        raise RunDirError(f"{what}: it has no training state (a final.pth?); resume needs a checkpoint_last.pth")
    diff = config_differences(without_runtime_keys(checkpoint["meta"].get("config", {})),
                              without_runtime_keys(config))
    if diff:
        raise RunDirError(f"{what}: the config differs ({'; '.join(diff[:6])}). Use the config that checkpoint "
                          "was trained with (its meta.config), or drop resume=... to start a new run")


def _meta(path: Path) -> dict[str, Any]:
    # The fix for the run directory's own damaged or foreign checkpoint (not checkpoint.py's "re-download it"
    # or "convert it"): nothing else holds that state, so the run can only start again.
    fix = (f"The run directory's checkpoint is damaged or not one `python -m pretrain` wrote: move "
           f"{path.name} out of {path.parent} (the run then starts again) or pass --force")
    try:
        return load_checkpoint(path, foreign_hint=fix, damaged_hint=fix)["meta"]
    except CheckpointError as err:
        raise RunDirError(str(err)) from err


def clear(out_dir: Path) -> None:
    """Remove what a pretraining run writes (nothing else in the directory)."""
    for name in OWNED:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(row) + "\n" for row in rows))


def append_metrics(out_dir: Path, row: dict[str, Any]) -> None:
    """Append one epoch (rewritten atomically: the file is small)."""
    rows = [r for r in read_metrics(out_dir) if r.get("epoch") != row.get("epoch")]
    write_metrics(out_dir, rows + [row])


def truncate_metrics(out_dir: Path, last_epoch: int) -> None:
    """Drop lines of epochs after ``last_epoch`` (written before a crash the checkpoint does not cover)."""
    rows = read_metrics(out_dir)
    kept = [r for r in rows if r.get("epoch", 0) <= last_epoch]
    if len(kept) != len(rows):
        write_metrics(out_dir, kept)
