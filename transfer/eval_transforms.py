"""Image preprocessing of the linear evaluations (torchvision transforms v2, on PIL images).

Each builder also has a plain-dict description, so that what was done to the pixels is part of a
feature-cache key and of the results record. The checkpoint's input filter (e.g. high-pass) is not part
of these transforms: it acts on normalized batches on the device (:class:`pretrain.filters.InputFilter`).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from pretrain.checkpoint import IMAGENET_NORMALIZE

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def normalization_of(meta: dict[str, Any]) -> dict[str, list[float]]:
    """The mean/std a checkpoint was trained with (ImageNet's unless its metadata says otherwise)."""
    norm = meta.get("normalize") or IMAGENET_NORMALIZE
    return {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{name}'; choose one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _to_normalized_tensor(normalize: dict[str, list[float]]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(normalize["mean"], normalize["std"])]


def center_crop_transform(resize: int, crop: int, interpolation: str, normalize: dict[str, list[float]]) -> v2.Compose:
    """Resize(shorter side = resize) + CenterCrop(crop) + normalize: Ericsson's features
    (resize = crop = 224, bicubic) and the MoCo probe's validation (256 -> 224, bilinear)."""
    return v2.Compose([v2.Resize(resize, interpolation=_interpolation(interpolation)), v2.CenterCrop(crop),
                       *_to_normalized_tensor(normalize)])


def random_crop_transform(crop: int, interpolation: str, normalize: dict[str, list[float]]) -> v2.Compose:
    """RandomResizedCrop(crop) (default scale 0.08-1) + horizontal flip + normalize: the MoCo probe's training."""
    return v2.Compose([v2.RandomResizedCrop(crop, interpolation=_interpolation(interpolation)),
                       v2.RandomHorizontalFlip(), *_to_normalized_tensor(normalize)])


def describe_center_crop(resize: int, crop: int, interpolation: str, normalize: dict[str, list[float]]) -> dict:
    return {"resize": int(resize), "center_crop": int(crop), "interpolation": interpolation, "normalize": normalize}
