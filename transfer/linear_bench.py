"""Benchmark of the linear evaluations: cost per task and "pretrained beats random init".

    python -m transfer.linear_bench --weights CKPT [--weights CKPT2 ...] [--data-root DIR] [--config toy]
                                    [--out DIR] [--json FILE] [--check]

Runs the three linear tasks (ImageNet-100 probe, Caltech-101 and Flowers-102 logistic regression) for
each checkpoint and for a random-init backbone of the same architecture (the sanity baseline), in one
process as the benchmark driver does, and prints a Markdown table of the metrics and the wall time of
every task. ``--check`` exits with status 1 unless every checkpoint beats random init on every task.
Wall times depend on what else runs on the machine; they are measured, not promised.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pretrain.fileio import atomic_write_json
from pretrain.random_init import random_init_checkpoint
from transfer.checkpoints import load_backbone
from transfer.linear import DATASETS, TASK_OF, LinearEvalError, run_linear
from transfer.records import TASKS

MAIN_METRIC = {"imagenet100": "imagenet100_top1", "caltech101": "caltech101_acc", "flowers102": "flowers102_acc"}


def random_init_like(weights: Path, out: Path, seed: int = 0) -> Path:
    """The random-init sanity checkpoint (:mod:`pretrain.random_init`) of the same architecture as ``weights``."""
    arch = load_backbone(weights).arch
    return random_init_checkpoint(out / f"random_init_{arch}_seed{seed}.pth", arch=arch, seed=seed)


def bench(weights: list[Path], data_root: Path, out: Path, config: str = "toy", datasets=DATASETS,
          overrides: list[str] | None = None, force: bool = True, cache_cold: bool = True) -> list[dict[str, Any]]:
    """One row per (checkpoint, dataset): metrics, wall and CPU time, protocol; the random-init rows come first.

    ``cache_cold``: start from an empty feature cache, so the logistic-regression times include extraction.
    """
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "feature_cache"
    if cache_cold and cache.is_dir():
        shutil.rmtree(cache)  # measure extraction, not a cache hit
    baselines = sorted({random_init_like(w, out) for w in weights})
    rows = []
    for checkpoint in [*baselines, *weights]:
        for dataset in datasets:
            started, cpu_started = time.monotonic(), _cpu_seconds()
            record = run_linear(dataset, checkpoint, data_root=data_root, config=config, overrides=overrides or [],
                                out=out / TASK_OF[dataset] / checkpoint.stem, force=force, progress=False,
                                cache_dir=cache)
            rows.append({"weights": str(checkpoint), "name": record["model"]["name"], "dataset": dataset,
                         "random_init": checkpoint in baselines, "protocol": record["protocol"],
                         "metrics": record["metrics"], "wall_s": round(time.monotonic() - started, 2),
                         "cpu_s": round(_cpu_seconds() - cpu_started, 2),
                         "timings_s": record["extra"].get("timings_s")})
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (data-loader workers): on a machine shared with
    other jobs it shows what a task costs better than the wall clock does."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def beats_random(rows: list[dict[str, Any]]) -> list[str]:
    """Problems: (checkpoint, dataset) pairs where a checkpoint does not beat random init."""
    random_score = {r["dataset"]: r["metrics"][MAIN_METRIC[r["dataset"]]] for r in rows if r["random_init"]}
    return [f"{r['name']} on {r['dataset']}: {r['metrics'][MAIN_METRIC[r['dataset']]]:.2f} <= random "
            f"{random_score[r['dataset']]:.2f}" for r in rows
            if not r["random_init"] and r["metrics"][MAIN_METRIC[r["dataset"]]] <= random_score[r["dataset"]]]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | task | metrics | wall (s) | CPU (s) |", "|---|---|---|---|---|"]
    for r in rows:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items() if k in TASKS[TASK_OF[r["dataset"]]])
        lines.append(f"| {r['name']} | {TASK_OF[r['dataset']]} | {shown} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    per_model: dict[str, list[float]] = {}
    for r in rows:
        totals = per_model.setdefault(r["name"], [0.0, 0.0])
        totals[0] += r["wall_s"]
        totals[1] += r["cpu_s"]
    lines.append("")
    lines += [f"all tasks of {name}: {wall:.1f} s wall, {cpu:.1f} s CPU" for name, (wall, cpu) in per_model.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transfer.linear_bench", description=__doc__.split("\n\n")[2])
    parser.add_argument("--weights", type=Path, action="append", required=True, help="checkpoint (repeatable)")
    parser.add_argument("--data-root", type=Path, default=Path("data/toy"), help="toy world or real data root")
    parser.add_argument("--config", default="toy", help="toy | paper | YAML (default: toy)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of the datasets")
    parser.add_argument("--out", type=Path, default=Path("runs/linear_bench"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--keep-cache", action="store_true", help="reuse cached features (default: extract afresh)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every checkpoint beats random init")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    try:
        rows = bench(args.weights, args.data_root, args.out, args.config, datasets, args.overrides,
                     cache_cold=not args.keep_cache)
    except (LinearEvalError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    problems = beats_random(rows)
    for problem in problems:
        print(f"does not beat random init: {problem}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
