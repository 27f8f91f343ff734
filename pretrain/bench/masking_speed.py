"""Batched masking against the per-sample, per-cell loop reference, on the same draws.

For each strategy and kind (positive query / hard negative) one batch of normalized views gets its random
draws once (:meth:`SaliencyGuidedMasking.draw`); then the batched :meth:`~SaliencyGuidedMasking.apply` and
:func:`pretrain.masking_reference.reference_apply` apply those same draws, their outputs are compared
(images and cells must be equal), and each is timed (median of repeats). Both compute the fill image the
same batched way (the reference shares it, see its docstring), so the fill's time is reported too, with
the speedup of the cell choice + writing alone. ``clone`` is the time to copy the batch once: a lower
bound for any implementation that returns new masked images, whichever way it loops.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pretrain.masking import MaskingConfig, SaliencyGuidedMasking
from pretrain.masking_reference import reference_apply
from pretrain.saliency import saliency_from_cells

SPEEDUP_TARGET = 20.0  # issue 9: batched >= 20x the loop reference on a 64 x 3 x 224 x 224 batch


def _timed(repeats: int, device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls ``fn(*args)`` (after one untimed call) and the last result."""
    result = fn(*args)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def masking_benchmark(batch: int = 64, size: int = 224, strategies: tuple[str, ...] = ("hp", "blur", "mean"),
                      repeats: int = 5, reference_repeats: int = 2, device: str | torch.device = "cpu",
                      seed: int = 0) -> dict[str, Any]:
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    views = torch.randn(batch, 3, size, size, generator=generator, device=device)
    # SCDA foreground of random activation maps: FG ratios like real saliency (about 0.6-0.8)
    saliency = saliency_from_cells(torch.rand(batch, 7, 7, generator=generator, device=device))
    clone_s, _ = _timed(repeats, device, views.clone)
    rows = []
    for strategy in strategies:
        masker = SaliencyGuidedMasking(MaskingConfig(strategy=strategy), size)
        for negative in (False, True):
            draw_s, draws = _timed(repeats, device, masker.draw, views, saliency, negative, generator)
            fill_s, _ = _timed(repeats, device, masker.fill, views, draws)
            batched_s, batched = _timed(repeats, device, masker.apply, views, saliency, draws, negative)
            reference_s, (images, cells) = _timed(reference_repeats, device, reference_apply, masker, views,
                                                  saliency, draws, negative)
            equal = bool(torch.equal(images, batched.images) and torch.equal(cells.to(device), batched.cells))
            loop_only = max(reference_s - fill_s, 1e-9)
            rows.append({
                "strategy": strategy, "kind": "negative" if negative else "query",
                "draw_s": draw_s, "fill_s": fill_s, "batched_s": batched_s, "reference_s": reference_s,
                "speedup": reference_s / batched_s,
                "speedup_without_fill": loop_only / max(batched_s - fill_s, 1e-9),
                "speedup_bound": reference_s / clone_s,  # if masking cost only the copy of the batch
                "equal": equal, "masked_fraction": float(batched.masked_fraction.mean()),
                "meets_target": reference_s / batched_s >= SPEEDUP_TARGET,
            })
    return {
        "shape": [batch, 3, size, size], "device": str(device), "repeats": repeats,
        "reference_repeats": reference_repeats, "clone_s": clone_s, "target_speedup": SPEEDUP_TARGET,
        "rows": rows, "all_equal": all(r["equal"] for r in rows),
        "min_speedup": min(r["speedup"] for r in rows),
    }
