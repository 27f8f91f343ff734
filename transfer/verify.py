"""Prove that a converted ``.pkl`` loads completely into the detectron2 models the suite trains.

detectron2 loads converted weights by suffix-matching names ("matching heuristics") and only *logs*
what it could not place, so a partial load looks like a successful one. Verification therefore trusts
values, not logs:

1. build each model the suite uses for this depth (R50/R101: Mask R-CNN C4, whose ``res5`` stage lives
   in ``roi_heads.res5``, and FPN; R18/R34: FPN only, because detectron2's C4 ROI head is built from
   Bottleneck blocks) on the CPU, with the suite's settings (BN, FREEZE_AT 0, STRIDE_IN_1X1 False, RGB);
2. fill every trunk parameter and BN buffer with NaN;
3. load the file with :class:`~transfer.d2checkpoint.SafeDetectionCheckpointer` (detectron2's own loading
   path, minus unsafe unpickling);
4. require that every trunk tensor of the model now equals the expected (source) tensor, that no trunk
   tensor of the model was left without a source, and that detectron2 reported no unexpected keys
   or shape mismatches.

The result reads "backbone: 265/265 loaded" per model (R50: 53 convolutions + 53 BNs x 4 tensors).
BN's ``num_batches_tracked`` counter is not a weight and is not compared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError
from transfer.d2compat import import_detectron2
from transfer.d2names import is_bn_counter
from transfer.safe_pickle import load_detectron2_pickle

# Model-zoo configs whose backbone/ROI-head layout the suite's detection runs use.
LAYOUT_CONFIGS = {
    "C4": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
    "FPN": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]


class VerificationError(CheckpointError):
    """A converted file did not load completely or exactly into a detectron2 model."""


def layouts_for(arch: str) -> tuple[str, ...]:
    return ("C4", "FPN") if DEPTHS[arch] >= 50 else ("FPN",)


def detectron2_config(arch: str, layout: str, norm: str = "BN", freeze_at: int = 0,
                      pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None):
    """The suite's detectron2 config for ``arch`` in ``layout`` ("C4"/"FPN"), on the CPU, no weights."""
    import_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(LAYOUT_CONFIGS[layout]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = DEPTHS[arch]
    if DEPTHS[arch] < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.PIXEL_MEAN = list(pixel_mean or TORCHVISION_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(pixel_std or TORCHVISION_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def model_key(name: str, layout: str) -> str:
    """Where detectron2 keeps trunk tensor ``name`` (``res2.0.conv1.weight`` ...) in a full model."""
    if layout == "FPN":
        return "backbone.bottom_up." + name
    return ("roi_heads." if name.startswith("res5.") else "backbone.") + name


def _is_trunk_key(key: str, layout: str) -> bool:
    if is_bn_counter(key):
        return False
    if layout == "FPN":
        return key.startswith("backbone.bottom_up.")
    # only the numbered res5 blocks: an extra layer after res5 (the "extra norm" ROI head) is new, not converted
    return key.startswith("backbone.") or re.match(r"roi_heads\.res5\.\d+\.", key) is not None


def verify_detectron2(pkl_path: str | os.PathLike, arch: str, expected: dict[str, Any] | None = None,
                      layouts: tuple[str, ...] | None = None, norm: str = "BN", freeze_at: int = 0,
                      raise_on_failure: bool = True) -> dict[str, Any]:
    """Load ``pkl_path`` into each detectron2 model for ``arch`` and check every trunk tensor.

    ``expected`` maps detectron2 trunk names to the source tensors (default: the file's own arrays,
    which proves loading but not conversion; :func:`transfer.convert.convert_to_detectron2` passes the
    original checkpoint's tensors). Returns ``{"passed", "models": {layout: {...,"summary": "backbone:
    N/N loaded"}}}``; raises :class:`VerificationError` on any failure unless ``raise_on_failure`` is off.
    """
    if arch not in DEPTHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(DEPTHS)}")
    import_detectron2()
    from detectron2.modeling import build_model

    results: dict[str, Any] = {}
    for layout in layouts or layouts_for(arch):
        model = build_model(detectron2_config(arch, layout, norm=norm, freeze_at=freeze_at))
        result = load_and_check(model, pkl_path, expected=expected, raise_on_failure=False)
        results[layout] = {"config": LAYOUT_CONFIGS[layout], "norm": norm, "freeze_at": freeze_at, **result}
    report = {"passed": all(r["passed"] for r in results.values()), "arch": arch, "models": results}
    if raise_on_failure and not report["passed"]:
        raise VerificationError(f"{pkl_path} did not load completely into detectron2: {_failure_text(results)}")
    return report


def layout_of(model: torch.nn.Module) -> str:
    """"C4" when the model keeps res5 in its ROI head, "FPN" when the ResNet is ``backbone.bottom_up``."""
    keys = model.state_dict().keys()
    if any(k.startswith("roi_heads.res5.") for k in keys):
        return "C4"
    if any(k.startswith("backbone.bottom_up.") for k in keys):
        return "FPN"
    raise ValueError("the model has neither roi_heads.res5 (C4) nor backbone.bottom_up (FPN): not a layout "
                     "this verification knows")


def load_and_check(model: torch.nn.Module, pkl_path: str | os.PathLike, expected: dict[str, Any] | None = None,
                   raise_on_failure: bool = True) -> dict[str, Any]:
    """Load ``pkl_path`` into ``model`` (a detectron2 model, not DDP-wrapped) and prove every trunk tensor
    arrived: trunk tensors are set to NaN first, loaded with :class:`SafeDetectionCheckpointer`, then
    compared with ``expected`` (default: the file's arrays). The detection runner can use this on the model
    it is about to train. Returns ``{"loaded", "expected", "summary": "backbone: N/N loaded", "passed", ...}``.
    """
    from transfer.d2checkpoint import SafeDetectionCheckpointer

    pkl_path = Path(pkl_path)
    layout = layout_of(model)
    if expected is None:
        expected = load_detectron2_pickle(pkl_path)["model"]
    expected = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
                for k, v in expected.items() if not is_bn_counter(k)}
    state = model.state_dict()  # shares storage with the model
    trunk_keys = sorted(k for k in state if _is_trunk_key(k, layout))
    with torch.no_grad():
        for key in trunk_keys:
            state[key].fill_(float("nan"))
    checkpointer = SafeDetectionCheckpointer(model)
    with _quiet_loading():
        extra = checkpointer.load(str(pkl_path))
    incompatible = checkpointer.last_incompatible
    loaded_state = model.state_dict()
    targets = {name: model_key(name, layout) for name in expected}
    no_place = sorted(name for name, key in targets.items() if key not in loaded_state)
    uncovered = sorted(set(trunk_keys) - set(targets.values()))
    not_loaded, mismatched = [], []
    for name, key in targets.items():
        if key not in loaded_state:
            continue
        value = loaded_state[key]
        source = expected[name].to(device=value.device, dtype=value.dtype)
        if torch.isnan(value).any():
            not_loaded.append(key)
        elif value.shape != source.shape or not torch.equal(value, source):
            mismatched.append(key)
    loaded = len(targets) - len(no_place) - len(not_loaded) - len(mismatched)
    total = len(set(trunk_keys) | set(targets.values()))
    unexpected = sorted(getattr(incompatible, "unexpected_keys", []) or [])
    shapes = [list(map(str, item)) for item in getattr(incompatible, "incorrect_shapes", []) or []]
    result = {
        "layout": layout,
        "loaded": loaded,
        "expected": total,
        "summary": f"backbone: {loaded}/{total} loaded",
        "not_loaded": not_loaded,
        "mismatched": mismatched,
        "no_place_in_model": no_place,
        "model_trunk_tensors_without_source": uncovered,
        "unexpected_keys": unexpected,
        "incorrect_shapes": shapes,
        "other_top_level_keys": sorted(k for k in extra if k != "model"),
        "passed": loaded == total and not (not_loaded or mismatched or no_place or uncovered or unexpected or shapes),
    }
    if raise_on_failure and not result["passed"]:
        raise VerificationError(f"{pkl_path} did not load completely into the model: {_failure_text({layout: result})}")
    return result


def _failure_text(results: dict[str, Any]) -> str:
    parts = []
    for layout, r in results.items():
        if r["passed"]:
            continue
        problems = [f"{name}: {len(r[name])} e.g. {r[name][:3]}" for name in (
            "not_loaded", "mismatched", "no_place_in_model", "model_trunk_tensors_without_source",
            "unexpected_keys", "incorrect_shapes") if r[name]]
        parts.append(f"{layout} ({r['summary']}; {'; '.join(problems)})")
    return "; ".join(parts)


@contextlib.contextmanager
def _quiet_loading():
    """detectron2 logs every matched name (and every new head layer as "missing") at INFO/WARNING; the
    verification result says the same precisely, so silence those loggers for the load only."""
    loggers = [logging.getLogger(name) for name in
               ("fvcore.common.checkpoint", "detectron2.checkpoint.c2_model_loading", "transfer.d2checkpoint",
                "detectron2.checkpoint.detection_checkpoint")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
