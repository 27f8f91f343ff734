"""TEST-ONLY stand-in for a transfer runner: exercises the benchmark driver's orchestration, nothing else.

It speaks the transfer runners' command-line contract (``--weights --data-root --seed --out --name
--preset --record --force``, skip when a valid record for the same weights and config exists, resume an
interrupted run) but computes nothing: its records are SYNTHETIC, labelled as such (protocol
``synthetic-driver-test``, ``extra.synthetic: true``), and only ever written into test temp folders. The
metric is a fixed function of the seed so tests can tell records apart. Real numbers come only from the
real runners (``transfer.detection``, ``transfer.linear``), which the end-to-end benchmark test uses.

Test knobs: ``--steps N --step-s S`` (work in N resumable steps, progress kept in ``<out>/progress.json``),
``--fail-for NAME`` (exit 1 with a message when ``--name`` is NAME), ``--fail-if-exists FILE`` (the same
while FILE exists: a failure cause the test can remove), ``--task-key KEY`` (which record task).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROTOCOL = "synthetic-driver-test"


def weights_meta(path: str) -> dict:
    if path.endswith(".pkl"):
        from transfer.convert import conversion_provenance

        return conversion_provenance(path).get("meta", {})
    from pretrain.checkpoint import load_checkpoint

    return load_checkpoint(path)["meta"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark_stub_runner", description=__doc__)
    for flag in ("--weights", "--data-root", "--out", "--name", "--preset", "--record", "--task-key"):
        parser.add_argument(flag, required=flag in ("--weights", "--out", "--record", "--task-key"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--step-s", type=float, default=0.0)
    parser.add_argument("--fail-for", default=None)
    parser.add_argument("--fail-if-exists", default=None)
    args = parser.parse_args(argv)

    from pretrain.fileio import atomic_write_json, sha256_file
    from transfer.records import (
        TASKS,
        RecordError,
        RecordTimer,
        is_valid_for,
        make_record,
        model_from_meta,
        read_record,
        write_record,
    )

    timer = RecordTimer()
    if not Path(args.data_root or ".").is_dir():
        print(f"error: --data-root {args.data_root} does not exist", file=sys.stderr)
        return 2
    sha = sha256_file(args.weights)
    config = {"stub": True, "task": args.task_key, "steps": args.steps}
    record_path = Path(args.record)
    if record_path.exists() and not args.force:
        try:
            if is_valid_for(read_record(record_path), sha, config):
                print(f"valid record {record_path} exists: skipped")
                return 0
        except RecordError:
            pass
    if args.fail_for and args.name == args.fail_for and (args.fail_if_exists is None
                                                         or Path(args.fail_if_exists).exists()):
        print(f"error: stub runner told to fail for {args.name}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.json"
    start_step = json.loads(progress.read_text())["step"] if progress.exists() and args.resume else 0
    for step in range(start_step, args.steps):
        time.sleep(args.step_s)
        atomic_write_json(progress, {"step": step + 1})
        print(f"step {step + 1}/{args.steps}", flush=True)
    metrics = {metric: 50.0 + args.seed for metric in TASKS[args.task_key]}
    record = make_record(task=args.task_key, protocol=PROTOCOL, seed=args.seed,
                         model=model_from_meta(weights_meta(args.weights), args.name), weights_path=args.weights,
                         weights_sha256=sha, metrics=metrics, config=config, timer=timer,
                         extra={"preset": args.preset or "custom", "synthetic": True, "resumed_from": start_step})
    write_record(record_path, record)
    print(f"record -> {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
