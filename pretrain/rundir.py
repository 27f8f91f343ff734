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
    if force:
        clear(out_dir)
        if resume not in ("auto", "never"):
            return Decision("resume", Path(resume), f"--force: cleared {out_dir}; resuming from {resume}")
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
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not path.exists():
            raise RunDirError(f"resume={resume}: no such checkpoint")
        return Decision("resume", path, f"resuming from {path}")
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


def _meta(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path)["meta"]
    except CheckpointError as err:
        raise RunDirError(f"{err}. The run directory's checkpoint is damaged: remove it or pass --force") from err


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
