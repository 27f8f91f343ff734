"""Input filters that a backbone was pretrained with and every transfer task must apply too.

A filter is described by a plain dict (stored in checkpoints), e.g. ``{"name": "none"}`` or
``{"name": "highpass", "kernel_size": 11, "sigma": 5.0}``. It acts on normalized images, batched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.fills import gaussian_blur

NO_FILTER: dict[str, Any] = {"name": "none"}
PAPER_HIGHPASS: dict[str, Any] = {"name": "highpass", "kernel_size": 11, "sigma": 5.0}


def highpass(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """``x - GaussianBlur(kernel_size, sigma)(x)`` on a normalized (B, C, H, W) or (C, H, W) tensor
    (torchvision's reflect-padded Gaussian, computed separably)."""
    if x.dim() == 3:
        return highpass(x[None], kernel_size, sigma)[0]
    return x - gaussian_blur(x, kernel_size, sigma)


class InputFilter(nn.Module):
    """A module applying a filter spec; identity for ``{"name": "none"}``."""

    def __init__(self, spec: dict[str, Any] | None = None):
        super().__init__()
        self.spec = normalize_filter_spec(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec["name"] == "highpass":
            return highpass(x, int(self.spec["kernel_size"]), float(self.spec["sigma"]))
        return x

    def extra_repr(self) -> str:
        return str(self.spec)


def normalize_filter_spec(spec: dict[str, Any] | str | None) -> dict[str, Any]:
    """Validate a filter spec; accepts None/"none"/"highpass" shorthands."""
    if spec is None or spec == "none":
        return dict(NO_FILTER)
    if spec == "highpass":
        return dict(PAPER_HIGHPASS)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"input filter must be a dict with a 'name', got {spec!r}")
    name = spec["name"]
    if name == "none":
        return dict(NO_FILTER)
    if name == "highpass":
        kernel_size = int(spec.get("kernel_size", PAPER_HIGHPASS["kernel_size"]))
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"highpass kernel_size must be a positive odd integer, got {kernel_size}")
        return {"name": "highpass", "kernel_size": kernel_size, "sigma": float(spec.get("sigma", 5.0))}
    raise ValueError(f"unknown input filter '{name}': expected 'none' or 'highpass'")
