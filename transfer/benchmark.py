"""``python -m transfer.benchmark`` (what ``bash run_all.sh`` runs): the benchmark matrix end to end.

With no arguments: the toy preset on the built-in toy world (generated into ``data/toy`` on first use),
every row of the paper's Tables A, B and C plus a random-init row, through pretraining, conversion,
detection (VOC, COCO), linear evaluation (ImageNet-100, Caltech-101, Flowers-102) and the tables.

The matrix (methods x tasks x seeds) and the preset's schedules come from ``configs/benchmark/<preset>.yaml``.
Runs are idempotent: what is done is skipped, an interrupted cell resumes, a cell whose inputs changed
reruns, a failed cell is recorded and the rest continues. See ``docs/benchmark.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from transfer.warm_start import prepare_driver

if __name__ == "__main__":  # as the program (not when imported): before anything loads numpy, torch or tqdm,
    prepare_driver()  # so that the driver holds no thread pools and its cells can start as forks of it

from transfer.benchmark_config import (  # noqa: E402
    BenchmarkConfig,
    BenchmarkConfigError,
    MethodSpec,
    config_path_for,
    load_benchmark_config,
)
from transfer.benchmark_plan import Plan, Selection, build_plan, forced_cells  # noqa: E402
from transfer.benchmark_progress import Progress  # noqa: E402
from transfer.benchmark_report import print_plan, print_tables, summarize  # noqa: E402
from transfer.benchmark_runner import Runner, Stopped  # noqa: E402
from transfer.benchmark_workspace import Workspace  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """\
examples:
  bash run_all.sh                                   toy preset, everything (about 30 min on 2 cores)
  bash run_all.sh --dry-run                         the plan: every cell, its status and its command
  bash run_all.sh --only linear --methods 'mocov2*' only the linear tasks of the MoCo v2 rows
  bash run_all.sh --checkpoint my_r50.pth --name mine   a third-party checkpoint on every task of the preset
  bash run_all.sh --preset paper --data-root /data --gpus 8 --seeds 3

exit status: 0 every selected cell done; 1 some cell failed or was blocked (see the summary and the named
logs; rerun the same command to retry them); 2 bad arguments or config; 3 another run of the preset is
in progress; 130 stopped (rerun the same command to resume).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bash run_all.sh", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description=textwrap.fill(
            "The benchmark matrix end to end (python -m transfer.benchmark): pretraining -> conversion -> detection "
            "(VOC, COCO) -> linear evaluation (ImageNet-100, Caltech-101, Flowers-102) -> the paper's tables, for "
            "every method of a preset (configs/benchmark/PRESET.yaml). Finished cells are skipped, interrupted ones "
            "resume, cells whose inputs changed rerun. Details: docs/benchmark.md.", 100))
    which = parser.add_argument_group("what to run")
    which.add_argument("--preset", default="toy", help="configs/benchmark/PRESET.yaml (default: toy; also: paper, mini)")
    which.add_argument("--config", metavar="FILE.yaml", help="a matrix config file instead of the preset's")
    which.add_argument("--methods", metavar="A,B,...", help="only these methods (names or shell patterns, e.g. 'simclr*')")
    which.add_argument("--only", metavar="WORDS", help="only these tasks: task names (voc, coco, imagenet100, "
                       "caltech101, flowers102), kinds (detection, linear) or stages (pretrain, pictures, tables); "
                       "the checkpoints they need are made as well")
    which.add_argument("--checkpoint", action="append", metavar="FILE", default=[],
                       help="a third-party (or any) checkpoint to evaluate on every task of the preset; repeatable, "
                       "each with its --name. Without --methods only these are run; their rows join the tables")
    which.add_argument("--name", action="append", metavar="NAME", default=[],
                       help="the row name of the --checkpoint at the same position")
    which.add_argument("--seeds", metavar="N|A,B", help="transfer seeds: a count (3 = seeds 0,1,2) or a list")
    which.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], dest="overrides",
                       help="override a key of the matrix config, e.g. --set pretrain.overrides=[train.epochs=1]")
    how = parser.add_argument_group("how and where")
    how.add_argument("--data-root", metavar="DIR", help="datasets in their standard layouts (required for paper; "
                     "toy: where the toy world is generated, default data/toy)")
    how.add_argument("--gpus", type=int, metavar="N", help="GPUs per cell: pretraining under torchrun, detection "
                     "with --num-gpus N (default: the config's machine.gpus)")
    how.add_argument("--jobs", type=int, metavar="N", help="cells run at once (default: the config's machine.jobs)")
    how.add_argument("--threads", type=int, metavar="N", help="CPU threads per cell (default: cores / jobs)")
    how.add_argument("--results-dir", metavar="DIR", help="records, tables, figures (default: results/PRESET)")
    how.add_argument("--runs-dir", metavar="DIR", help="work dirs, logs, cell states (default: runs/PRESET)")
    how.add_argument("--force", action="store_true", help="rerun the selected cells even if they are done "
                     "(old outputs go to the attic)")
    how.add_argument("--no-tables", action="store_true", help="do not regenerate the tables at the end")
    how.add_argument("--dry-run", action="store_true", help="print the plan (status and command of every cell); run nothing")
    how.add_argument("--quiet", action="store_true", help="do not print the tables at the end")
    return parser.parse_args(argv)


def _words(text: str | None) -> list[str] | None:
    return [w.strip() for w in text.split(",") if w.strip()] if text else None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()] if "," in text else None
        count = int(text) if seeds is None else len(seeds)
    except ValueError as err:
        raise BenchmarkConfigError(f"--seeds expects a count (3) or a list (0,1,2), got '{text}'") from err
    if seeds is None:
        if count < 1:
            raise BenchmarkConfigError(f"--seeds {text}: a count must be at least 1 (one seed N alone: --seeds N,)")
        return list(range(count))
    if not seeds or any(seed < 0 for seed in seeds):
        raise BenchmarkConfigError(f"--seeds {text}: seeds are non-negative integers, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise BenchmarkConfigError(f"--seeds {text}: a seed is listed twice; list each seed once")
    return seeds


def configure(args: argparse.Namespace) -> tuple[BenchmarkConfig, Selection]:
    """The config with the command line applied, and what to select from it."""
    path = Path(args.config) if args.config else config_path_for(args.preset)
    config = load_benchmark_config(path, args.overrides)
    if args.seeds:
        config.seeds = _seeds(args.seeds)
    if args.gpus is not None:
        if args.gpus < 0:
            raise BenchmarkConfigError("--gpus must be 0 or more")
        config.gpus = args.gpus
    if args.threads is not None and args.threads < 1:
        raise BenchmarkConfigError("--threads must be at least 1")
    if args.jobs is not None:
        if args.jobs < 1:
            raise BenchmarkConfigError("--jobs must be at least 1")
        config.jobs = args.jobs
    if len(args.checkpoint) != len(args.name):
        raise BenchmarkConfigError("give each --checkpoint FILE its --name NAME (as many names as checkpoints)")
    for file, name in zip(args.checkpoint, args.name):
        if name in config.methods:
            raise BenchmarkConfigError(f"--name {name}: the preset already has a method of that name; choose another")
        if not all(ch.isalnum() or ch in "-_.+" for ch in name):
            raise BenchmarkConfigError(f"--name {name}: use letters, digits and - _ . + only")
        if not Path(file).expanduser().is_file():
            raise BenchmarkConfigError(f"--checkpoint {file}: no such file")
        config.methods[name] = MethodSpec(name=name, source="external", config=None, overrides=[],
                                          checkpoint=str(Path(file).expanduser().resolve()),
                                          model={"base": "external", "masking": "none", "strategy": None,
                                                 "mask_branch": None}, tasks=None, pictures=False)
    methods = _words(args.methods)
    if args.checkpoint and not methods:
        methods = list(args.name)
    return config, Selection(methods=methods, only=_words(args.only), tables=not args.no_tables)


def make_workspace(config: BenchmarkConfig, args: argparse.Namespace) -> Workspace:
    data_root = Path(args.data_root).expanduser() if args.data_root else None
    if data_root is None:
        if not config.toy_world and config.raw.get("data", {}).get("root") in (None, "", "???"):
            raise BenchmarkConfigError(
                f"preset '{config.preset}' reads real datasets: pass --data-root DIR holding imagenet100/, "
                "VOCdevkit/, coco/, caltech101/, flowers-102/ (see docs/benchmark.md)")
        data_root = Path(config.data_root)
    if config.gpus > 1 and not args.dry_run:
        import torch

        available = torch.cuda.device_count()
        if available < config.gpus:
            raise BenchmarkConfigError(f"--gpus {config.gpus}: only {available} CUDA device(s) visible")
    return Workspace(config=config, runs_dir=Path(args.runs_dir or f"runs/{config.preset}"),
                     results_dir=Path(args.results_dir or f"results/{config.preset}"), data_root=data_root,
                     gpus=max(1, config.gpus), default_data_root=not args.data_root)


def preflight(plan: Plan, ws: Workspace) -> None:
    """Fail before any long work when the data the selected cells read is not there."""
    config = ws.config
    if "data" in plan.cells:
        from transfer.toydata import LAYOUTS, MANIFEST

        root = ws.data_root
        if root.is_dir() and not (root / MANIFEST).is_file():
            # The default folder may hold an interrupted generation (its layouts, a staging folder); a folder the
            # user named must be empty: make-toy-data --force would replace layouts of the same names.
            own = set(LAYOUTS) if ws.default_data_root else set()
            foreign = [p.name for p in root.iterdir() if p.name not in own and not p.name.startswith(".toy-staging-")]
            if foreign:
                raise BenchmarkConfigError(
                    f"{root} is not empty ({', '.join(sorted(foreign)[:4])}) and holds no toy world ({MANIFEST}); "
                    f"the {config.preset} preset generates its data there: omit --data-root (default "
                    f"{config.data_root}) or pass an empty or toy-world folder")
        return
    needed: dict[str, list[str]] = defaultdict(list)
    if any(cell.kind == "pretrain" for cell in plan):
        needed[config.pretrain.data_subdir].append("pretraining")
    for key in {cell.task for cell in plan if cell.task}:
        for path in config.tasks[key].requires:
            needed[path].append(key)
    missing = [f"{ws.data_root / path} (for {', '.join(sorted(set(users)))})" for path, users in needed.items()
               if not (ws.data_root / path).exists()]
    if missing:
        raise BenchmarkConfigError("missing datasets under --data-root:\n  " + "\n  ".join(missing)
                                   + "\nsee docs/benchmark.md for the expected layouts, or narrow the run with --only")


@contextlib.contextmanager
def preset_lock(runs_dir: Path):
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise BenchmarkConfigError(f"another benchmark run uses {runs_dir} (pid {handle.read().strip() or '?'}); "
                                       "wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, selection = configure(args)
        ws = make_workspace(config, args)
        plan = build_plan(config, selection)
        preflight(plan, ws)
    except BenchmarkConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(config.preset, len(plan), jobs=config.jobs)
    forced = forced_cells(plan, config, selection) if args.force else set()
    runner = Runner(plan, ws, progress, jobs=config.jobs, threads=args.threads, forced=forced, env=config.env,
                    warm_start=config.warm_start, stop_grace_s=config.stop_grace_s)
    if args.dry_run:
        print_plan(plan, ws, runner)
        return EXIT_OK
    start = time.monotonic()
    try:
        with preset_lock(ws.runs_dir):
            print(f"[{config.preset}] {len(plan)} cells, {runner.jobs} at a time x {runner.threads} thread(s); logs in "
                  f"{ws.runs_dir / 'logs'}; results in {ws.results_dir}", flush=True)
            try:
                results = runner.run()
            except (KeyboardInterrupt, Stopped):
                summarize(runner.results, plan, ws, time.monotonic() - start, interrupted=True)
                print("\nStopped. Rerun the same command to resume: finished cells are kept, interrupted ones "
                      "continue.", file=sys.stderr)
                return EXIT_INTERRUPTED
    except BenchmarkConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    summary = summarize(results, plan, ws, time.monotonic() - start)
    if not args.quiet:
        print_tables(ws)
    bad = summary["counts"].get("failed", 0) + summary["counts"].get("blocked", 0)
    return EXIT_FAILED if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
