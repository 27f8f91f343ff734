"""The aug+ two-crop pipeline (torchvision v2) that also reports where each view came from.

Each view is a RandomResizedCrop of the original image followed by an optional horizontal flip and
photometric jitter. Besides the pixels the pipeline returns each view's crop box in normalized
coordinates of the original image, ``(y0, x0, y1, x1)`` in [0, 1], and its flip flag, so a saliency map
computed on one view can be carried onto the other (``pretrain.saliency.map_cells``) or a cached
whole-image map onto any crop.

Views leave the loader as uint8 tensors (a quarter of the bytes of float) and are converted and
normalized on the training device (:func:`to_device_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pretrain.checkpoint import IMAGENET_NORMALIZE


def odd_kernel(fraction: float, size: int) -> int:
    """The odd integer nearest ``fraction * size`` (at least 3)."""
    k = max(3, int(round(fraction * size)))
    return k if k % 2 == 1 else k + 1


class CropView:
    """One aug+ view: crop box + flip (geometry) then colour jitter, grey, blur (appearance)."""

    def __init__(self, cfg) -> None:
        size = int(cfg.image_size)
        self.size = size
        self.crop = v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))
        self.flip_p = float(cfg.flip_p)
        jitter = list(cfg.color_jitter)
        self.appearance = v2.Compose([
            v2.RandomApply([v2.ColorJitter(*jitter)], p=float(cfg.color_jitter_p)),
            v2.RandomGrayscale(p=float(cfg.grayscale_p)),
            v2.RandomApply(
                [v2.GaussianBlur(odd_kernel(cfg.blur_kernel_fraction, size), tuple(cfg.blur_sigma))],
                p=float(cfg.blur_p),
            ),
        ])

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, height, width = image.shape
        params = self.crop.make_params([image])
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        view = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        flip = bool(torch.rand(()) < self.flip_p)
        if flip:
            view = F.horizontal_flip(view)
        view = self.appearance(view)
        box = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width], dtype=torch.float32)
        return view, box, torch.tensor(flip)


class TwoCropTransform:
    """PIL image -> dict of two independently augmented views (query, key) with boxes and flips."""

    def __init__(self, cfg) -> None:
        self.view = CropView(cfg)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        pixels = F.pil_to_tensor(image)
        query, query_box, query_flip = self.view(pixels)
        key, key_box, key_flip = self.view(pixels)
        return {"query": query, "key": key, "query_box": query_box, "key_box": key_box,
                "query_flip": query_flip, "key_flip": key_flip}


class EvalTransform:
    """Resize(ratio * size) + CenterCrop(size), uint8: the kNN monitor's deterministic view."""

    def __init__(self, cfg) -> None:
        size = int(cfg.image_size)
        self.pipeline = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(int(round(size * float(cfg.eval_resize_ratio))), antialias=True),
            v2.CenterCrop(size),
        ])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(image)}


@dataclass
class TwoViewBatch:
    """A training batch on the device: normalized float views plus their geometry."""

    query: torch.Tensor  # (B, 3, H, W) normalized
    key: torch.Tensor
    query_box: torch.Tensor  # (B, 4) (y0, x0, y1, x1) in [0, 1] of the original image
    key_box: torch.Tensor
    query_flip: torch.Tensor  # (B,) bool
    key_flip: torch.Tensor
    labels: torch.Tensor  # (B,) long (only supervised methods may use them)
    index: torch.Tensor  # (B,) long: position in the dataset (e.g. for a per-image saliency cache)
    skipped: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.query.shape[0])


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalized float."""
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"], device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"], device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalized float -> [0, 1] RGB (for pictures)."""
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"], device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def to_device_batch(raw: dict, device: torch.device, channels_last: bool = False) -> TwoViewBatch:
    """The loader's collated dict -> a :class:`TwoViewBatch` on ``device`` (normalized there)."""
    views = raw["views"]
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def images(name: str) -> torch.Tensor:
        moved = views[name].to(device, non_blocking=non_blocking)
        return normalize(moved).contiguous(memory_format=memory_format)

    return TwoViewBatch(
        query=images("query"),
        key=images("key"),
        query_box=views["query_box"].to(device, non_blocking=non_blocking),
        key_box=views["key_box"].to(device, non_blocking=non_blocking),
        query_flip=views["query_flip"].to(device, non_blocking=non_blocking),
        key_flip=views["key_flip"].to(device, non_blocking=non_blocking),
        labels=raw["labels"].to(device, non_blocking=non_blocking),
        index=raw["index"].to(device, non_blocking=non_blocking),
        skipped=list(raw.get("skipped", [])),
    )
