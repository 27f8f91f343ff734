"""Saliency for masking: the relaxed constrained SCDA of the paper (SPEC 1.1), batched on the device.

A ConvNet's last feature map is summed over channels into an activation map ``A``; a cell of the
masking grid is foreground (FG) when ``A >= mean(A)`` or ``mean(A) - A <= 0.6 * std(A)`` (no
connected-component step), i.e. ``A >= mean(A) - 0.6 * std(A)``. ``fg_ratio`` is the FG fraction of the
grid; masking splits its budget between FG and BG cells by it (:mod:`pretrain.masking`).

At 224 px ResNet-50's layer4 is exactly the 7 x 7 masking grid. At other sizes the activation map is
resampled to the grid (area-averaged when finer, bilinear when coarser), so thresholding always happens
on the cells that are masked.

The released code thresholds a row-sorted copy of ``A`` while indexing the original cells
(``released_code=True``): each row keeps its FG count but its FG cells move to the right end of the row.

:func:`map_cells` moves a map between crops of one image (key view -> query view, or a cached
whole-image map -> a random crop), so saliency can be reused instead of recomputed by a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_GRID = 7
DEFAULT_STD_RATIO = 0.6


@dataclass
class SaliencyMaps:
    """Per-image saliency on the masking grid."""

    cells: torch.Tensor  # (B, G, G) float activation per cell
    foreground: torch.Tensor  # (B, G, G) bool

    @property
    def fg_ratio(self) -> torch.Tensor:
        """(B,) fraction of foreground cells."""
        return self.foreground.flatten(1).float().mean(1)

    @property
    def grid(self) -> int:
        return int(self.foreground.shape[-1])

    def __len__(self) -> int:
        return int(self.foreground.shape[0])

    def index(self, rows: torch.Tensor | slice) -> SaliencyMaps:
        return SaliencyMaps(self.cells[rows], self.foreground[rows])


def activation_map(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) last convolutional features -> (B, h, w) channel-summed activation map."""
    if features.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) features, got shape {tuple(features.shape)}")
    return features.float().sum(1)


def resample_to_grid(maps: torch.Tensor, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """(B, h, w) -> (B, grid, grid): identity on a match, area average when finer, bilinear when coarser."""
    h, w = maps.shape[-2:]
    if (h, w) == (grid, grid):
        return maps
    if h >= grid and w >= grid:
        return F.adaptive_avg_pool2d(maps[:, None], grid)[:, 0]
    return F.interpolate(maps[:, None], size=(grid, grid), mode="bilinear", align_corners=False)[:, 0]


def scda_foreground(cells: torch.Tensor, std_ratio: float = DEFAULT_STD_RATIO,
                    released_code: bool = False) -> torch.Tensor:
    """(B, G, G) activation -> (B, G, G) bool FG mask by the relaxed SCDA threshold (population std)."""
    flat = cells.flatten(1)
    threshold = flat.mean(1) - std_ratio * flat.std(1, unbiased=False)
    compared = torch.sort(cells, dim=-1).values if released_code else cells
    return compared >= threshold[:, None, None]


def saliency_from_cells(cells: torch.Tensor, std_ratio: float = DEFAULT_STD_RATIO,
                        released_code: bool = False) -> SaliencyMaps:
    return SaliencyMaps(cells, scda_foreground(cells, std_ratio, released_code))


def scda_saliency(features: torch.Tensor, grid: int = DEFAULT_GRID, std_ratio: float = DEFAULT_STD_RATIO,
                  released_code: bool = False) -> SaliencyMaps:
    """Saliency of a batch from its last conv features (e.g. ResNet layer4 output), on a ``grid`` x ``grid``."""
    cells = resample_to_grid(activation_map(features), grid)
    return saliency_from_cells(cells, std_ratio, released_code)


def uniform_saliency(batch: int, grid: int = DEFAULT_GRID, device: torch.device | str | None = None) -> SaliencyMaps:
    """Saliency source ``none``: every cell is foreground, so masked cells are chosen uniformly at random."""
    ones = torch.ones(batch, grid, grid, device=device)
    return SaliencyMaps(ones, ones.bool())


def map_cells(cells: torch.Tensor, src_box: torch.Tensor, src_flip: torch.Tensor, dst_box: torch.Tensor,
              dst_flip: torch.Tensor, grid: int = DEFAULT_GRID, supersample: int = 4) -> torch.Tensor:
    """Resample a map covering ``src_box`` of the original image onto the ``grid`` of ``dst_box``.

    Boxes are (B, 4) ``(y0, x0, y1, x1)`` in [0, 1] coordinates of the original image; flips are (B,)
    bools (the view was mirrored after cropping). Source cells are treated as constant patches: each
    destination cell is the average of ``supersample**2`` point samples of the source over its area (so
    identical boxes give the map back exactly); parts of the destination outside the source take the
    nearest covered value (border padding).
    """
    batch = cells.shape[0]
    device = cells.device
    src_box, dst_box = src_box.to(device, torch.float32), dst_box.to(device, torch.float32)
    src_flip, dst_flip = src_flip.to(device, torch.bool), dst_flip.to(device, torch.bool)
    n = grid * supersample
    centers = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n  # in the destination crop
    u = torch.where(dst_flip[:, None], 1 - centers, centers)  # (B, n) horizontal, before mirroring
    v = centers.expand(batch, n)
    x = dst_box[:, 1:2] + u * (dst_box[:, 3:4] - dst_box[:, 1:2])  # original-image coordinates
    y = dst_box[:, 0:1] + v * (dst_box[:, 2:3] - dst_box[:, 0:1])
    us = (x - src_box[:, 1:2]) / (src_box[:, 3:4] - src_box[:, 1:2]).clamp_min(1e-6)
    vs = (y - src_box[:, 0:1]) / (src_box[:, 2:3] - src_box[:, 0:1]).clamp_min(1e-6)
    us = torch.where(src_flip[:, None], 1 - us, us)
    sample_grid = torch.stack(torch.broadcast_tensors(us[:, None, :], vs[:, :, None]), dim=-1) * 2 - 1
    sampled = F.grid_sample(cells[:, None].float(), sample_grid, mode="nearest", padding_mode="border",
                            align_corners=False)
    return F.avg_pool2d(sampled, supersample)[:, 0]
