"""Timing real training steps of one variant (run as its own process by ``python -m pretrain.bench``).

The engine itself runs the steps: a :class:`pretrain.engine.Trainer` is set up from the variant's config
exactly as ``python -m pretrain`` does (data, method, optimizer, DDP wrapper when distributed, AMP and
channels_last on CUDA) and its own epoch loop (``Trainer._train_epoch``) runs ``warmup + steps`` steps
with an enabled :class:`~pretrain.timing.PhaseTimer`; a step hook records each step's phases and wall time.

Data: with ``data: predecoded`` (the default) the batches are the real loader's (the real dataset, two-crop
aug+ pipeline and sampler, on real JPEGs) decoded before the timing starts, so loader workers do not
share the CPU cores with the timed steps; the ``data`` phase is then only the hand-over, and whether the
loader keeps up is measured separately (:mod:`pretrain.bench.loader_speed`). ``data: live`` times the steps
with the configured loader running alongside.

Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on CUDA; on the CPU the peak
resident set size of this process (``resource``; model, optimizer, batches and the Python runtime).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("data", "input_filter", "saliency", "masking", "key_forward", "hard_negative_forward", "query_forward",
          "loss", "backward", "optimizer", "momentum_update")
ENCODER_PHASES = ("query_forward", "backward", "key_forward", "hard_negative_forward")


class UnmaskedExtraPasses:
    """Plain MoCo v2's masking stage (a no-op) plus ``n`` unmasked copies of each key view as the batch's
    "hard negatives": the method's own forward then runs the hard-negative pass and loss on them."""

    def __init__(self, inner, copies: int):
        self.inner, self.copies = inner, int(copies)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def prepare(self, batch, key_encode, generator=None, timer=None):
        from pretrain.timing import NULL_TIMER

        prepared = self.inner.prepare(batch, key_encode, generator, timer or NULL_TIMER)
        prepared.negatives = prepared.key.repeat_interleave(self.copies, dim=0)
        return prepared


def _predecode(trainer) -> list[dict[str, Any]]:
    """The epoch-0 batches of the trainer's dataset and sampler, decoded now (no workers; in pinned memory
    for CUDA, as the engine's loader delivers them)."""
    from torch.utils.data import DataLoader

    from pretrain.data import collate_samples

    trainer.sampler.set_epoch(0)
    loader = DataLoader(trainer.train_set, batch_size=trainer.per_process_batch, sampler=trainer.sampler,
                        num_workers=0, collate_fn=collate_samples, pin_memory=trainer.device.type == "cuda")
    batches = []
    for raw in loader:
        batches.append(raw)
        if len(batches) == trainer.steps_per_epoch:
            break
    return batches


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if int(spec["threads"]) > 0:
        torch.set_num_threads(int(spec["threads"]))
    from torch.utils.tensorboard import SummaryWriter

    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.engine import Trainer
    from pretrain.timing import PhaseTimer

    cfg = load_config(spec["config"], spec["overrides"])
    world = distributed.setup(str(cfg.train.device))
    if world.distributed:
        raise RuntimeError("the benchmark times one process; run it without torchrun")
    device = world.device
    steps, warmup = int(spec["steps"]), int(spec["warmup"])
    timer = PhaseTimer(enabled=True, device=device)
    records: list[dict[str, float]] = []
    clock = {"last": 0.0}

    def hook(trainer: Trainer) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        row = {name: 0.0 for name in PHASES}
        row.update(timer.summary())
        row["total"] = now - clock["last"]
        records.append(row)
        timer.reset()
        if len(records) == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock["last"] = time.perf_counter()

    trainer = Trainer(cfg, world, force=True, step_hook=hook, timer=timer)
    started = time.perf_counter()
    trainer._seed()
    trainer._build_data()
    trainer.steps_per_epoch = warmup + steps
    data_mode = spec.get("data", "predecoded")
    if data_mode == "predecoded":
        decode_started = time.perf_counter()
        batches = _predecode(trainer)
        batches = [batches[i % len(batches)] for i in range(trainer.steps_per_epoch)]  # cycle if the split is small
        trainer.loader = batches
        decode_s = time.perf_counter() - decode_started
    else:
        decode_s = 0.0
    method_started = time.perf_counter()
    trainer._build_method()  # builds the frozen source's saliency cache, when configured
    setup_method_s = time.perf_counter() - method_started
    copies = 0
    if spec.get("extra_unmasked_passes"):
        copies = int(cfg.masking.num_hard_negatives) or 1
        trainer.method.masking = UnmaskedExtraPasses(trainer.method.masking, copies)
    trainer._wrap()
    with tempfile.TemporaryDirectory(prefix="bench_tb_") as tb:
        trainer.writer = SummaryWriter(tb)
        try:
            trainer.timer.reset()
            clock["last"] = time.perf_counter()
            trainer._train_epoch()
        finally:
            trainer.writer.close()
    timed = records[warmup:warmup + steps]
    mean = {key: sum(r[key] for r in timed) / len(timed) for key in timed[0]}
    mean["encoder"] = sum(mean[k] for k in ENCODER_PHASES)
    mean["other"] = mean["total"] - sum(mean[k] for k in PHASES)
    batch = int(cfg.data.batch_size)
    if device.type == "cuda":
        peak, peak_kind = int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    else:
        peak, peak_kind = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"
    meta = trainer.method.meta()
    return {
        "variant": spec["variant"], "config": str(spec["config"]), "overrides": list(spec["overrides"]),
        "extra_unmasked_passes": bool(spec.get("extra_unmasked_passes")), "data": data_mode,
        "arch": str(cfg.model.arch), "image_size": int(cfg.augment.image_size), "batch": batch,
        "device": str(device), "amp": str(trainer.amp).replace("torch.", "") if trainer.amp else "fp32",
        "channels_last": bool(trainer.channels_last), "threads": torch.get_num_threads(),
        "masking": meta.get("masking"), "strategy": meta.get("strategy"),
        "saliency_source": meta.get("saliency_source"), "query_map": meta.get("saliency_query_map"),
        "hard_negatives": meta.get("hard_negatives", copies),
        "steps": steps, "warmup": warmup, "per_step": timed, "mean": mean,
        "median_total": statistics.median(r["total"] for r in timed), "images_per_s": batch / mean["total"], "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "setup_s": {"predecode": decode_s, "method": setup_method_s, "all": time.perf_counter() - started},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="JSON spec written by python -m pretrain.bench")
    parser.add_argument("out", type=Path, help="where the result JSON goes (atomically)")
    args = parser.parse_args(argv)
    from pretrain.fileio import atomic_write_json

    spec = json.loads(args.spec.read_text())
    result = run_variant(spec)
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
