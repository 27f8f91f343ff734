"""python -m pretrain CONFIG.yaml [key=value ...] [--force]

Pretrain a backbone with MoCo v2 or SimCLR, plain or with saliency-guided masking (WACV 2024), from a
config in configs/pretrain/ plus key=value overrides (e.g. data.root=/data/imagenet100 train.epochs=10).

Runs on one process or under torchrun (one or several nodes):
    torchrun --nproc_per_node 8 -m pretrain configs/pretrain/paper/mocov2_hp.yaml data.root=...

The run directory (out_dir, default runs/pretrain/<config name>) receives config.yaml, checkpoint_last.pth
(for resume=auto), final.pth (what transfer tasks take), metrics.jsonl, log.txt, tb/ and pictures/.
SIGTERM or Ctrl-C finishes the step in progress, checkpoints it and stops (a second one stops at once);
rerunning an interrupted run continues it exactly; a finished run is left alone unless --force.
See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import sys

from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError, load_config
from pretrain.data import DataError, without_worker_traceback
from pretrain.rundir import RunDirError
from pretrain.stop_request import STOP, Terminated


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     usage="%(prog)s [-h] [--force] [--print-config] CONFIG.yaml "
                                           "[key=value ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="?" and the check below: with a required positional before a nargs="*" one, argparse's error
    # says "the following arguments are required: config, key=value", though overrides are optional.
    parser.add_argument("config", nargs="?", help="YAML config, e.g. configs/pretrain/toy/mocov2_hp.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides in dotted form, e.g. train.epochs=10 data.batch_size=64")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the run directory even if it holds a finished or unfinished run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)
    if args.config is None:
        parser.error("no config file given: python -m pretrain CONFIG.yaml [key=value ...], "
                     "e.g. configs/pretrain/toy/mocov2_hp.yaml data.root=DIR")
    return args


def _resume_hint(cfg) -> str:
    from pathlib import Path

    from pretrain.rundir import LAST

    last = Path(str(cfg.out_dir)) / LAST if cfg is not None else None
    if last is not None and last.is_file():
        return f"rerun the same command to resume from the last checkpoint ({last})"
    return "nothing was checkpointed yet; rerunning the same command starts the run again"


def _stop(message: str, status: int, cfg) -> int:
    print(message, file=sys.stderr)
    if cfg is not None:
        from pretrain.engine import note_in_log_file

        note_in_log_file(str(cfg.out_dir), message)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and Ctrl-C during training: the step in progress is finished and checkpointed, then the run
    # stops (pretrain.stop_request); a second one, or one before training, unwinds at once (a checkpoint
    # being written is discarded). Either way the log and TensorBoard files are closed, and the message
    # says how to resume.
    with STOP.installed():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pretrain.engine import TrainingError

    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            from pretrain.config import to_yaml

            print(to_yaml(cfg), end="")
            return 0
        from pretrain.engine import train

        final = train(cfg, force=args.force)
    # An error raised in a DataLoader worker (a split whose images cannot be read, an I/O error) comes back
    # with the worker's traceback in its message: print only the message the worker raised.
    except (ConfigError, DataError, RunDirError, CheckpointError, ValueError) as err:
        return _stop(f"error: {without_worker_traceback(err)}", 2, cfg)
    except (TrainingError, OSError) as err:
        return _stop(f"error: {without_worker_traceback(err)}", 1, cfg)
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        return _stop(f"{what}: {_resume_hint(cfg)}", 143 if isinstance(err, Terminated) else 130, cfg)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
