"""Caltech-101 / Flowers-102 evaluation: cached frozen features -> Ericsson et al.'s logistic regression.

Called by :func:`transfer.linear.run_linear` once the weights and the layout are checked. Features of
each split are read from the cache or extracted (Resize + CenterCrop + normalize, then the checkpoint's
input filter), the C sweep runs on train/val, the refit on train+val is scored on test. Besides the
record, the work dir gets ``logreg_result.json`` (the whole sweep) and ``c_sweep.png`` (validation score
per C, the chosen C marked).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pretrain.fileio import atomic_write_json
from transfer.checkpoints import Backbone
from transfer.classification_data import ClassificationData
from transfer.eval_transforms import center_crop_transform, describe_center_crop, normalization_of
from transfer.feature_cache import FeatureCache, extract_features, feature_key
from transfer.frozen_encoder import FrozenEncoder
from transfer.logreg import sweep_and_refit, wd_grid

METRIC_OF = {"caltech101": "caltech101_acc", "flowers102": "flowers102_acc"}
RESULT_FILE = "logreg_result.json"
PLOT_FILE = "c_sweep.png"


def evaluate_logreg(dataset: str, backbone: Backbone, data: ClassificationData, cfg: dict[str, Any], out: Path,
                    device: torch.device, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, extra for the record) of one Caltech-101 / Flowers-102 run."""
    pre, runtime, logreg = cfg["preprocess"], cfg["runtime"], cfg["logreg"]
    grid = wd_grid(float(logreg["wd_min"]), float(logreg["wd_max"]), int(logreg["wd_count"]))
    normalize = normalization_of(backbone.meta)
    transform = center_crop_transform(int(pre["resize_size"]), int(pre["crop_size"]), str(pre["interpolation"]), normalize)
    preprocessing = describe_center_crop(int(pre["resize_size"]), int(pre["crop_size"]), str(pre["interpolation"]), normalize)
    cache = FeatureCache(runtime.get("cache_dir") or out / "features")
    encoder: FrozenEncoder | None = None
    features, cache_info = {}, {}
    started = time.monotonic()
    for split in ("train", "val", "test"):
        images = data.splits[split]
        key = feature_key(weights_sha256=backbone.sha256, arch=backbone.arch, dataset=dataset, split=split,
                          data_fingerprint=images.fingerprint(), preprocessing=preprocessing,
                          input_filter=backbone.input_filter)

        def compute(images=images, split=split):
            nonlocal encoder
            encoder = encoder or FrozenEncoder(backbone, device)  # built only when something is not cached
            return extract_features(encoder, images, transform, batch_size=int(runtime["batch_size"]),
                                    num_workers=int(runtime["num_workers"]), device=device, progress=progress,
                                    desc=f"{dataset} {split} features")

        found = cache.get_or_compute(key, compute)
        features[split] = (found.features, found.labels)
        cache_info[split] = {"file": str(found.path), "cached": found.cached, "shape": list(found.features.shape)}
    features_s = time.monotonic() - started
    result = sweep_and_refit(features["train"], features["val"], features["test"], grid,
                             max_iter=int(logreg["max_iter"]), blas_threads=runtime.get("blas_threads", "auto"),
                             progress=progress, desc=f"{dataset} C sweep")
    sweep_s = time.monotonic() - started - features_s
    checked = encoder.assert_unchanged() if encoder is not None else 0
    summary = result.summary()
    atomic_write_json(out / RESULT_FILE, {"dataset": dataset, "metric": METRIC_OF[dataset], "test_score": result.test_score,
                                          **summary, "features": cache_info})
    plot = _plot_sweep(out / PLOT_FILE, result, dataset) if runtime.get("plots", False) else None
    extra = {"logreg": {k: summary[k] for k in ("best_wd", "best_C", "val_score_at_best", "refit_iterations",
                                                "fits_at_max_iter")},
             "logreg_result": str(out / RESULT_FILE), "c_sweep_plot": plot, "feature_cache": cache_info,
             "timings_detail_s": {"features": round(features_s, 3), "c_sweep_and_refit": round(sweep_s, 3)},
             "feature_dim": int(features["train"][0].shape[1]), "input_filter": backbone.input_filter,
             "backbone_sanity_check": f"{checked} tensors unchanged" if encoder is not None else "features from cache"}
    return {METRIC_OF[dataset]: result.test_score}, extra


def _plot_sweep(path: Path, result, dataset: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from pretrain.fileio import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    cs = [1.0 / wd for wd in result.grid]
    ax.semilogx(cs, result.val_scores, marker=".", lw=1)
    ax.axvline(result.best_c, color="tab:red", ls="--", lw=1, label=f"chosen C = {result.best_c:.3g}")
    ax.set_xlabel("C = 1 / wd")
    ax.set_ylabel("val mean per-class acc. (%)")
    ax.set_title(f"{dataset}: test {result.test_score:.2f}%")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)
