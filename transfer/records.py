"""Results records: one JSON file per (model, task, seed), the only input of the tables.

Every transfer runner (detection, linear probe, logistic regression) writes one record with
:func:`write_record`; :mod:`transfer.tables` reads them back with :func:`load_records`. A record holds
the metrics (named as in ``results/paper/reference_results.csv``) and enough provenance to tell whether
it is still valid for given inputs (weights hash, config hash, code version).

The tables treat records with equal ``model`` fields (name included) as seeds of one model, so one model
keeps one ``model.name`` across its seeds and tasks (``model_from_meta``'s default name does), and the
benchmark driver tags each record with ``extra["preset"]`` so that presets are never mixed.

Schema (``"schema": "masked-ssl-record/v1"``)::

    {
      "schema": ..., "status": "ok" | "failed" | "running",
      "task": one of TASKS, "protocol": e.g. "voc07+12_faster_rcnn_R50_C4_24k" or "toy_voc_R18_FPN",
      "seed": int,
      "model": {"name": row label, "base": "mocov2"|"simclr"|"supervised"|"random"|"external",
                "masking": "none"|"saliency"|"mscn"|"adios", "strategy": "hp"|"blur"|"mean"|None,
                "mask_branch": "query"|"key"|"both"|None, "arch": "resnet50", "input_filter": {...},
                "saliency_source": str|None (saliency masking only; absent in older records)},
      "weights": {"path": str, "sha256": str},
      "metrics": {"voc_AP": 50.1, ...},        # percentages in [0, 100]
      "config": {...}, "config_hash": sha256 of config,
      "code_version": str, "device": str,
      "started": iso time, "finished": iso time, "wall_time_s": float,
      "error": str (failed records only), "extra": {...}    # e.g. iteration reached, split, report summary;
                                                              # "preset": the benchmark preset (toy, paper, ...)
    }
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.fileio import atomic_write_json, sha256_json
from pretrain.provenance import code_version, device_description, utc_now

SCHEMA = "masked-ssl-record/v1"
TASKS = {
    "linear_imagenet100": ("imagenet100_top1", "imagenet100_top5"),
    "logreg_caltech101": ("caltech101_acc",),
    "logreg_flowers102": ("flowers102_acc",),
    "voc_detection": ("voc_AP", "voc_AP50", "voc_AP75"),
    "coco_instance": (
        "coco_bbox_AP", "coco_bbox_AP50", "coco_bbox_AP75",
        "coco_segm_AP", "coco_segm_AP50", "coco_segm_AP75",
    ),
}
STATUSES = ("ok", "failed", "running")
MODEL_FIELDS = ("name", "base", "masking", "strategy", "mask_branch", "arch", "input_filter", "saliency_source")


class RecordError(ValueError):
    """A record file is unreadable or does not follow the schema."""


def model_from_meta(meta: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The ``model`` entry of a record from a checkpoint's metadata (see :mod:`pretrain.checkpoint`)."""
    model = {
        "base": meta.get("method", "external"),
        "masking": meta.get("masking", "none"),
        "strategy": meta.get("strategy"),
        "mask_branch": meta.get("mask_branch"),
        "arch": meta.get("arch"),
        "input_filter": meta.get("input_filter", {"name": "none"}),
        "saliency_source": meta.get("saliency_source"),
    }
    model["name"] = name or default_model_name(model)
    return model


def default_model_name(model: dict[str, Any]) -> str:
    parts = [str(model.get("base") or "external")]
    if model.get("masking") not in (None, "none"):
        parts.append(str(model["masking"]))
    if model.get("strategy"):
        parts.append(str(model["strategy"]))
    if model.get("mask_branch") not in (None, "query"):
        parts.append(f"{model['mask_branch']}-branch")
    return "+".join(parts)


def record_filename(task: str, model_name: str, seed: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in model_name)
    return f"{task}__{safe}__seed{seed}.json"


@dataclass
class RecordTimer:
    """Measures a run's wall time and start/finish stamps for its record."""

    started: str = ""
    _t0: float = 0.0

    def __post_init__(self) -> None:
        self.started = utc_now()
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0


def make_record(
    *,
    task: str,
    protocol: str,
    seed: int,
    model: dict[str, Any],
    weights_path: str | os.PathLike,
    weights_sha256: str,
    metrics: dict[str, float],
    config: dict[str, Any],
    timer: RecordTimer | None = None,
    status: str = "ok",
    error: str | None = None,
    device: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    record = {
        "schema": SCHEMA,
        "status": status,
        "task": task,
        "protocol": protocol,
        "seed": int(seed),
        "model": {key: model.get(key) for key in MODEL_FIELDS},
        "weights": {"path": str(weights_path), "sha256": weights_sha256},
        "metrics": {key: float(value) for key, value in metrics.items()},
        "config": config,
        "config_hash": sha256_json(config),
        "code_version": code_version(),
        "device": device or device_description(),
        "started": timer.started if timer else utc_now(),
        "finished": utc_now(),
        "wall_time_s": round(timer.elapsed(), 3) if timer else None,
        "extra": extra or {},
    }
    if error is not None:
        record["error"] = error
    validate_record(record)
    return record


def validate_record(record: Any, source: str = "record") -> dict[str, Any]:
    """Check a record against the schema; raise :class:`RecordError` naming the first problem."""
    if not isinstance(record, dict):
        raise RecordError(f"{source}: expected a JSON object, got {type(record).__name__}")
    if record.get("schema") != SCHEMA:
        raise RecordError(f"{source}: schema is {record.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("status", "task", "protocol", "seed", "model", "weights", "metrics", "config_hash"):
        if key not in record:
            raise RecordError(f"{source}: missing field '{key}'")
    if record["status"] not in STATUSES:
        raise RecordError(f"{source}: status {record['status']!r} is not one of {STATUSES}")
    if record["task"] not in TASKS:
        raise RecordError(f"{source}: unknown task {record['task']!r}; known: {', '.join(TASKS)}")
    if not isinstance(record["model"], dict) or not record["model"].get("name"):
        raise RecordError(f"{source}: 'model' must be an object with a 'name'")
    if record["status"] == "ok":
        missing = [m for m in TASKS[record["task"]] if m not in record["metrics"]]
        if missing:
            raise RecordError(f"{source}: status ok but metrics {missing} are missing")
        for name, value in record["metrics"].items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 100.0:
                raise RecordError(f"{source}: metric {name}={value!r} is not a finite percentage in [0, 100]")
    return record


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    validate_record(record, str(path))
    atomic_write_json(path, record)
    return Path(path)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise RecordError(f"{path}: no such record") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: not valid JSON ({err}); the file is corrupt, delete it to recompute") from err
    return validate_record(record, str(path))


def is_valid_for(record: dict[str, Any], weights_sha256: str, config: dict[str, Any]) -> bool:
    """True when a finished record was computed from exactly these weights and this config."""
    return (
        record.get("status") == "ok"
        and record.get("weights", {}).get("sha256") == weights_sha256
        and record.get("config_hash") == sha256_json(config)
    )


def _named_like_a_record(filename: str) -> bool:
    """``<task>__<name>__seed<N>.json`` (:func:`record_filename`) for a known task."""
    task, _, rest = filename.partition("__")
    return task in TASKS and re.fullmatch(r".+__seed\d+\.json", rest) is not None


def load_records(
    paths: Iterable[str | os.PathLike], on_error: str = "warn"
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Read every ``*.json`` record under the given files/directories.

    Returns (valid records, [(path, problem), ...]). ``on_error="raise"`` raises on the first bad file.
    """
    records, problems = [], []
    for entry in paths:
        entry = Path(entry)
        files = sorted(entry.rglob("*.json")) if entry.is_dir() else [entry]
        for file in files:
            try:
                raw = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
                if on_error == "raise":
                    raise RecordError(f"{file}: unreadable ({err})") from err
                problems.append((str(file), f"unreadable: {err}"))
                continue
            if not (isinstance(raw, dict) and raw.get("schema") == SCHEMA):
                if not _named_like_a_record(file.name):
                    continue  # other JSON files (reports, manifests) live beside records
                problem = (f"{file}: named like a record but holds "
                           f"{'no schema ' + repr(SCHEMA) if isinstance(raw, dict) else 'a JSON ' + type(raw).__name__}"
                           "; the file is corrupt or foreign, delete it to recompute")
                if on_error == "raise":
                    raise RecordError(problem)
                problems.append((str(file), problem))
                continue
            try:
                records.append(validate_record(raw, str(file)))
            except RecordError as err:
                if on_error == "raise":
                    raise
                problems.append((str(file), str(err)))
    return records, problems
