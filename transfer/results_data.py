"""From a directory of JSON records to one number per table cell, without ever mixing protocols.

Records are grouped twice before anything is averaged:

1. **Preset.** The benchmark driver tags every record with ``extra["preset"]`` (``toy``, ``paper``, ...).
   Tables are built for one preset at a time; records of another preset are excluded (and listed).
   Untagged records (a runner called by hand) join whatever preset is being built.
2. **Protocol.** Within a preset every task must have a single ``protocol`` (e.g. the toy linear probe
   vs. the paper's 100-epoch probe). If one task has records under several protocols, the build stops
   with one error naming them, unless ``--protocol TASK=PROTOCOL`` picks one; a toy number and a paper
   number are never averaged. Only ``ok`` records vote: failed and running records carry no number, so
   they are kept whatever protocol they name (a run that never started cannot know its protocol).

A *cell* is then (model identity, metric). Its number is the mean over seeds of the ``ok`` records
(sample std, n = number of seeds). Per (identity, task, seed) one record wins: the latest ``ok`` one, else
the latest ``failed`` one, else the latest ``running`` one; the rest are listed as superseded. A failed or
running record never produces a number.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.records import SCHEMA, TASKS, load_records
from transfer.table_layout import ModelIdentity

STATUS_RANK = {"ok": 0, "failed": 1, "running": 2}
BIG_JSON_BYTES = 8 << 20  # records are a few kB


class TablesInputError(ValueError):
    """The results directory cannot be turned into tables as it is (the message says how to fix it)."""


@dataclass
class LoadedRecord:
    path: str
    record: dict[str, Any]
    identity: ModelIdentity

    @property
    def preset(self) -> str | None:
        extra = self.record.get("extra") or {}
        return extra.get("preset") if isinstance(extra, dict) else None

    @property
    def sort_time(self) -> tuple[str, str]:
        return (str(self.record.get("finished") or ""), self.path)


@dataclass
class Cell:
    """One (model identity, metric) cell over seeds."""

    values: dict[int, float] = field(default_factory=dict)  # seed -> value, ok records only
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error
    running: list[int] = field(default_factory=list)
    protocol: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values()) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if self.n > 1 else math.nan

    @property
    def status(self) -> str:
        if self.values:
            return "ok"
        if self.failed:
            return "failed"
        if self.running:
            return "running"
        return "missing"


@dataclass
class ResultsData:
    """Everything the tables, figures and index need, with every exclusion accounted for."""

    source: str
    preset: str
    protocols: dict[str, str]  # task -> protocol used
    winners: list[LoadedRecord]
    invalid: list[tuple[str, str]]  # (path, problem)
    excluded: list[tuple[str, str]]  # (path, why: other preset / other protocol)
    superseded: list[tuple[str, str]]  # (path, why)
    cells: dict[tuple[ModelIdentity, str], Cell]

    @property
    def failed(self) -> list[LoadedRecord]:
        return [item for item in self.winners if item.record["status"] == "failed"]

    @property
    def running(self) -> list[LoadedRecord]:
        return [item for item in self.winners if item.record["status"] == "running"]

    @property
    def identities(self) -> set[ModelIdentity]:
        return {item.identity for item in self.winners}

    def identities_for(self, tasks: tuple[str, ...]) -> set[ModelIdentity]:
        return {item.identity for item in self.winners if item.record["task"] in tasks}

    def cell(self, identity: ModelIdentity | None, metric: str) -> Cell:
        if identity is None:
            return Cell()
        return self.cells.get((identity, metric), Cell())


def _clearly_not_a_record(file: Path) -> bool:
    """Big JSON files beside records (detectron2's predictions dumps) are not parsed just to be skipped."""
    try:
        if file.stat().st_size <= BIG_JSON_BYTES:
            return False
        with open(file, "rb") as handle:
            return SCHEMA.encode() not in handle.read(4096)
    except OSError:
        return False


def read_results(paths: list[str | os.PathLike]) -> tuple[list[LoadedRecord], list[tuple[str, str]]]:
    """Every record under ``paths`` with its file, plus (path, problem) for each invalid one."""
    loaded, invalid = [], []
    for entry in map(Path, paths):
        files = sorted(entry.rglob("*.json")) if entry.is_dir() else [entry]
        for file in files:
            if _clearly_not_a_record(file):
                continue
            records, problems = load_records([file])
            invalid.extend(problems)
            for record in records:
                try:
                    identity = ModelIdentity.from_model(record["model"])
                except (KeyError, TypeError, AttributeError) as err:
                    invalid.append((str(file), f"'model' entry unusable ({err!r})"))
                    continue
                loaded.append(LoadedRecord(str(file), record, identity))
    return loaded, invalid


def parse_protocol_choices(choices: list[str] | None) -> dict[str, str]:
    chosen = {}
    for choice in choices or []:
        task, sep, protocol = choice.partition("=")
        if not sep or not task or not protocol:
            raise TablesInputError(f"--protocol expects TASK=PROTOCOL, got {choice!r}")
        chosen[task] = protocol
    return chosen


def collect(
    results_dir: str | os.PathLike,
    preset: str | None = None,
    protocols: dict[str, str] | None = None,
) -> ResultsData:
    """Read, select and aggregate the records under ``results_dir`` (see the module docstring)."""
    results_dir = Path(results_dir)
    if not results_dir.exists():
        raise TablesInputError(
            f"results directory {results_dir} does not exist; pass the folder the runs wrote"
        )
    loaded, invalid = read_results([results_dir])
    if not loaded:
        detail = (
            f" ({len(invalid)} invalid record files, e.g. {invalid[0][0]}: {invalid[0][1]})"
            if invalid
            else ""
        )
        raise TablesInputError(
            f"no results records (JSON files with schema masked-ssl-record/v1) under {results_dir}{detail}; "
            "run the transfer tasks (or bash run_all.sh) first, or point at the folder they wrote"
        )
    excluded: list[tuple[str, str]] = []
    tags = Counter(item.preset for item in loaded if item.preset)
    if preset is None:
        if len(tags) > 1:
            listing = ", ".join(f"'{name}' ({count} records)" for name, count in sorted(tags.items()))
            raise TablesInputError(
                f"{results_dir} holds records of several presets: {listing}; tables never mix presets. "
                "Choose one with --preset NAME (or point at one preset's folder)"
            )
        preset = next(iter(tags), None) or results_dir.resolve().name
    else:
        kept = []
        for item in loaded:
            if item.preset and item.preset != preset:
                excluded.append((item.path, f"preset '{item.preset}' (building '{preset}')"))
            else:
                kept.append(item)
        loaded = kept
        if not loaded:
            raise TablesInputError(
                f"no records of preset '{preset}' under {results_dir}; presets found: {sorted(tags)}"
            )

    loaded, chosen, more_excluded = _select_protocols(loaded, protocols or {}, results_dir)
    excluded.extend(more_excluded)
    winners, superseded = _pick_winners(loaded)
    return ResultsData(
        source=str(results_dir),
        preset=preset,
        protocols=chosen,
        winners=winners,
        invalid=invalid,
        excluded=excluded,
        superseded=superseded,
        cells=_aggregate(winners),
    )


def _select_protocols(
    loaded: list[LoadedRecord], chosen: dict[str, str], results_dir: Path
) -> tuple[list[LoadedRecord], dict[str, str], list[tuple[str, str]]]:
    by_task: dict[str, Counter] = {}
    numbered: dict[str, Counter] = {}
    for item in loaded:
        by_task.setdefault(item.record["task"], Counter())[item.record["protocol"]] += 1
        if item.record["status"] == "ok":
            numbered.setdefault(item.record["task"], Counter())[item.record["protocol"]] += 1
    for task, protocol in chosen.items():
        if protocol not in by_task.get(task, {}):
            found = sorted(by_task.get(task, {}))
            raise TablesInputError(
                f"--protocol {task}={protocol}: no such records; protocols of {task}: {found}"
            )
    # Only records with numbers vote: a failed or running record cannot mix numbers, and one written for a run
    # that never started (e.g. blocked by a failed pretraining) cannot know the protocol the runner would use.
    mixed = {task: counts for task, counts in numbered.items() if len(counts) > 1 and task not in chosen}
    if mixed:
        lines = "; ".join(
            f"{task}: " + ", ".join(f"'{p}' ({n} records)" for p, n in sorted(counts.items()))
            for task, counts in sorted(mixed.items())
        )
        example_task, counts = sorted(mixed.items())[0]
        raise TablesInputError(
            f"{results_dir} mixes evaluation protocols within a task ({lines}); tables never average across "
            f"protocols. Point at one preset's folder, pass --preset, or pick one per task, e.g. "
            f"--protocol {example_task}={counts.most_common(1)[0][0]}"
        )
    protocols = {
        task: chosen.get(task) or (numbered.get(task) or counts).most_common(1)[0][0]
        for task, counts in sorted(by_task.items())
    }
    kept, excluded = [], []
    for item in loaded:
        task, protocol = item.record["task"], item.record["protocol"]
        if protocol == protocols[task] or (item.record["status"] != "ok" and task not in chosen):
            kept.append(item)
        else:
            excluded.append((item.path, f"protocol '{protocol}' of {task} (using '{protocols[task]}')"))
    return kept, protocols, excluded


def _pick_winners(loaded: list[LoadedRecord]) -> tuple[list[LoadedRecord], list[tuple[str, str]]]:
    slots: dict[tuple, list[LoadedRecord]] = {}
    for item in loaded:
        slots.setdefault((item.identity, item.record["task"], item.record["seed"]), []).append(item)
    winners, superseded = [], []
    for candidates in slots.values():
        latest_first = sorted(candidates, key=lambda i: i.sort_time, reverse=True)
        # min() keeps the first of equals, so this is the latest record of the best status
        best = min(latest_first, key=lambda i: STATUS_RANK[i.record["status"]])
        winners.append(best)
        for other in candidates:
            if other is best:
                continue
            same_weights = other.record["weights"].get("sha256") == best.record["weights"].get("sha256")
            why = f"superseded by {best.path} ({best.record['status']})"
            if other.record["status"] == "ok" and not same_weights:
                why += "; CONFLICT: different weights for the same model, task and seed"
            superseded.append((other.path, why))
    winners.sort(key=lambda i: i.path)
    return winners, sorted(superseded)


def _aggregate(winners: list[LoadedRecord]) -> dict[tuple[ModelIdentity, str], Cell]:
    cells: dict[tuple[ModelIdentity, str], Cell] = {}
    for item in winners:
        record = item.record
        for metric in TASKS[record["task"]]:
            cell = cells.setdefault((item.identity, metric), Cell(protocol=record["protocol"]))
            seed = int(record["seed"])
            if record["status"] == "ok":
                cell.values[seed] = float(record["metrics"][metric])
            elif record["status"] == "failed":
                cell.failed[seed] = str(record.get("error") or "no error message recorded").strip()
            else:
                cell.running.append(seed)
    return cells
