"""What a benchmark run prints besides its progress: the plan (``--dry-run``) and the final summary.

The summary is a matrix of methods x columns (checkpoint, conversion, each task, picture; ``ok`` / ``FAIL`` /
``blk`` blocked / ``-`` not reached; seeds combined), the failures with their log files, the wall and CPU
seconds per cell kind, the three Markdown tables and the sanity check of the results index (every SSL row
of Table A above Random init). It is also written to ``runs/<preset>/summary.json``.
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter, defaultdict

from pretrain.fileio import atomic_write_json
from pretrain.provenance import utc_now
from transfer.benchmark_plan import MODEL_KINDS, Plan
from transfer.benchmark_progress import clock
from transfer.benchmark_runner import CellResult, Runner
from transfer.benchmark_workspace import Workspace


def _short(command: list[str]) -> str:
    return shlex.join(["python" if part == sys.executable else part for part in command])


def print_plan(plan: Plan, ws: Workspace, runner: Runner, stream=None) -> None:
    config = ws.config
    rows = runner.preview()
    methods = sorted({cell.method for cell in plan if cell.method})
    tasks = sorted({cell.task for cell in plan if cell.task})
    print(f"Plan for preset '{config.preset}' ({config.source}): {len(methods)} methods x {len(tasks)} tasks x "
          f"{len(config.seeds)} seed(s) -> {len(plan)} cells", file=stream)
    print(f"  data: {ws.data_root}{' (toy world generated there)' if 'data' in plan.cells else ''} · results: "
          f"{ws.results_dir} · work: {ws.runs_dir} · jobs {runner.jobs} x {runner.threads} thread(s) · gpus "
          f"{config.gpus}", file=stream)
    counts = Counter(status for _, status, _, _ in rows)
    print("  " + ", ".join(f"{n} {status}" for status, n in counts.most_common()), file=stream)
    for cell, status, reason, command in rows:
        print(f"{status:<8} {cell.id}  ({reason})", file=stream)
        if command:
            print(f"         $ {_short(command)}", file=stream)
    print("Nothing was run (--dry-run).", file=stream)


def summarize(results: dict[str, CellResult], plan: Plan, ws: Workspace, wall: float, stream=None,
              interrupted: bool = False) -> dict:
    statuses = Counter(result.status for result in results.values())
    head = "Stopped" if interrupted else "Finished"
    print(f"\n{head}: preset '{ws.preset}' in {clock(wall)}: {len(plan)} cells: {statuses.get('ok', 0)} ran, "
          f"{statuses.get('done', 0)} already done, {statuses.get('failed', 0)} failed, "
          f"{statuses.get('blocked', 0)} blocked, {statuses.get('left', 0)} not reached", file=stream)
    print(matrix_text(results, plan), file=stream)
    failed = [r for r in results.values() if r.status == "failed"]
    if failed:
        print("\nFailed (rerun the same command to retry them):", file=stream)
        for result in failed:
            print(f"  {result.cell.title}: {result.reason}\n      log: {result.log}", file=stream)
    blocked = Counter(r.reason for r in results.values() if r.status == "blocked")
    for reason, count in blocked.items():
        print(f"  blocked: {count} cell(s) because {reason}", file=stream)
    timing: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for result in results.values():
        if result.status == "ok" and result.wall_s is not None:
            timing[result.cell.task or result.cell.kind].append(result.wall_s)
            if result.cpu_s is not None:
                cpu[result.cell.task or result.cell.kind].append(result.cpu_s)
    if timing:
        print("\nCells that ran, mean wall (CPU) seconds: " + "; ".join(
            f"{key} {len(walls)} x {sum(walls) / len(walls):.0f}"
            + (f" ({sum(cpu[key]) / len(cpu[key]):.0f})" if cpu.get(key) else "")
            for key, walls in timing.items()), file=stream)
    summary = {
        "preset": ws.preset, "finished": utc_now(), "wall_s": round(wall, 1), "interrupted": interrupted,
        "counts": dict(statuses),
        "cells": {cid: {"status": r.status, "verdict": r.verdict, "reason": r.reason, "wall_s": r.wall_s,
                        "cpu_s": r.cpu_s, "log": r.log} for cid, r in results.items()},
        "wall_by_kind": {key: {"n": len(v), "total_s": round(sum(v), 1), "mean_s": round(sum(v) / len(v), 1),
                               "cpu_total_s": round(sum(cpu.get(key, [])), 1)}
                         for key, v in timing.items()},
    }
    atomic_write_json(ws.runs_dir / "summary.json", summary)
    return summary


SYMBOLS = {"ok": "ok", "done": "ok", "failed": "FAIL", "blocked": "blk", "left": "-"}


def matrix_text(results: dict[str, CellResult], plan: Plan) -> str:
    """Methods x columns (checkpoint, conversion, each task, picture), seeds combined."""
    columns: list[str] = []
    grid: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for cell in plan:
        if not cell.method:
            continue
        column = "model" if cell.kind in MODEL_KINDS else (cell.task or cell.kind)
        if column not in columns:
            columns.append(column)
        result = results.get(cell.id)
        grid[cell.method][column].append(result.status if result else "left")
    if not grid:
        return ""
    width = max(len("method"), *(len(name) for name in grid)) + 2
    lines = ["", "method".ljust(width) + "  ".join(c.ljust(max(5, len(c))) for c in columns)]
    for method, row in grid.items():
        cells = []
        for column in columns:
            found = row.get(column, [])
            if not found:
                text = ""
            else:
                worst = next((s for s in ("failed", "blocked", "left") if s in found), "ok")
                same = sum(1 for status in found if SYMBOLS[status] == SYMBOLS[worst])
                text = SYMBOLS[worst] + (f" {same}/{len(found)}" if len(found) > 1 else "")
            cells.append(text.ljust(max(5, len(column))))
        lines.append(method.ljust(width) + "  ".join(cells))
    return "\n".join(lines)


def print_tables(ws: Workspace, stream=None) -> None:
    tables = ws.results_dir / "tables"
    for key in ("A", "B", "C"):
        path = tables / f"table_{key}.md"
        if path.is_file():
            print(f"\n{path}:\n{path.read_text().strip()}", file=stream)
    index = ws.results_dir / "README.md"
    if index.is_file():
        print("\n" + sanity_lines(index.read_text()), file=stream)
        print(f"\nEverything (tables vs. the paper, figures, what is missing): {index}", file=stream)


def sanity_lines(index_text: str) -> str:
    """The index's "SSL rows vs. Random init" section (the toy preset's acceptance check)."""
    lines, keep = [], False
    for line in index_text.splitlines():
        if line.startswith("## "):
            keep = "Random init" in line and "Sanity" in line
        if keep and line.strip():
            lines.append(line)
    return "\n".join(lines)
