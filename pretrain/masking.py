"""Where to mask: saliency-guided cell choice for the query view and the hard negatives (SPEC 1.2-1.3).

The image is a ``grid`` x ``grid`` array of cells (7 x 7: 32 px cells at 224 px, scaled with the size).

* Query (positive) view: ``r ~ U(0.05, 0.25)``; ``round(min(r * fg_ratio, 0.55) * G^2)`` foreground cells
  and ``int(G^2 * r)`` minus that many background cells are masked, each chosen uniformly inside its set,
  so masks spread over foreground and background in proportion to saliency.
* Hard negatives: copies of the (never masked) key view with only foreground cells masked,
  ``r ~ U(0.4, 0.7)``, ``round(min(r * fg_ratio, cap) * G^2)`` cells (cap 0.55 for ``hp``, none otherwise).
* ``hp`` only: with p = 0.2 an image gets focal masking instead of grid masking (the query keeps one
  random 200 x 200 window and everything else is noise; a negative gets one random 130 x 130 noise
  square); grid masking is channel-wise with p = 0.7 (each channel draws its own cells and noise), else
  spatial. ``blur`` and ``mean`` use spatial grid masking only.

Counts are clamped to the cells that exist in each set. Randomness is drawn first (:class:`MaskDraws`)
and applied after, both batched on the device; ``pretrain.bench`` applies the same draws with a
per-sample, per-cell loop as the reference implementation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from pretrain.fills import STRATEGIES, blur_fill, mean_fill, noise_fill, same_memory_format, scaled_kernel
from pretrain.saliency import SaliencyMaps


@dataclass
class MaskingParams:
    """Where and how much to mask and how to fill (SPEC 1.2-1.4); also the fields of the config's ``masking:``."""

    grid: int = 7
    query_ratio: tuple[float, float] = (0.05, 0.25)
    fg_cap: float = 0.55
    negative_ratio: tuple[float, float] = (0.4, 0.7)
    num_hard_negatives: int = 1  # 0: no hard negatives (MSCN)
    reference_size: int = 224  # the pixel sizes below are given at this image size and scaled
    noise_std_query: float = 0.18
    noise_std_negative: float = 0.14
    focal_p: float = 0.2
    focal_query_window: int = 200
    focal_negative_window: int = 130
    channelwise_p: float = 0.7
    blur_kernel: int = 31
    blur_sigma: float = 10.0


@dataclass
class MaskingConfig(MaskingParams):
    strategy: str = "hp"  # "hp" | "blur" | "mean"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"masking strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self.query_ratio = _ratio_range("query_ratio", self.query_ratio)
        self.negative_ratio = _ratio_range("negative_ratio", self.negative_ratio)
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {self.num_hard_negatives}")
        for name in ("fg_cap", "focal_p", "channelwise_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MaskingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown masking option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _ratio_range(name: str, value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 1, got {value}")
    return low, high


@dataclass
class MaskedViews:
    images: torch.Tensor  # (N, C, H, W)
    cells: torch.Tensor  # (N, C, G, G) bool: grid cells masked, per channel (all False for focal rows)
    pixels: torch.Tensor  # (N, C, H, W) bool: pixels overwritten
    focal: torch.Tensor  # (N,) bool

    @property
    def masked_fraction(self) -> torch.Tensor:
        return self.pixels.flatten(1).float().mean(1)


@dataclass
class MaskDraws:
    """Every random choice of one masking call; applying them is deterministic."""

    ratio: torch.Tensor  # (N,) the drawn masking ratio r
    fg_count: torch.Tensor  # (N,) long
    bg_count: torch.Tensor  # (N,) long
    scores: torch.Tensor  # (N, C, G*G) uniform: within a set, the lowest scores are masked
    focal: torch.Tensor  # (N,) bool
    channelwise: torch.Tensor  # (N,) bool
    window_origin: torch.Tensor  # (N, 2) long (top, left) of the focal window/square
    noise: torch.Tensor | None  # (N, C, H, W) fill noise (hp), None otherwise


class SaliencyGuidedMasking:
    """Masks query views and makes hard negatives for one image size (see the module docstring)."""

    def __init__(self, config: MaskingConfig, image_size: int):
        self.config = config
        self.image_size = int(image_size)
        scale = self.image_size / config.reference_size
        self.query_window = max(1, min(self.image_size, round(config.focal_query_window * scale)))
        self.negative_window = max(1, min(self.image_size, round(config.focal_negative_window * scale)))
        self.blur_kernel = scaled_kernel(config.blur_kernel, self.image_size, config.reference_size)
        self.blur_sigma = config.blur_sigma * scale

    # ------------------------------------------------------------------------------------------ public

    def mask_query(self, views: torch.Tensor, saliency: SaliencyMaps,
                   generator: torch.Generator | None = None) -> MaskedViews:
        draws = self.draw(views, saliency, negative=False, generator=generator)
        return self.apply(views, saliency, draws, negative=False)

    def hard_negatives(self, views: torch.Tensor, saliency: SaliencyMaps,
                       generator: torch.Generator | None = None) -> MaskedViews:
        """``num_hard_negatives`` masked copies per sample, sample-major ((B * n, C, H, W))."""
        n = self.config.num_hard_negatives
        if n == 0:
            raise ValueError("num_hard_negatives is 0: this configuration makes no hard negatives")
        repeated = views.repeat_interleave(n, dim=0)
        repeated_saliency = saliency.index(torch.arange(len(saliency), device=views.device).repeat_interleave(n))
        draws = self.draw(repeated, repeated_saliency, negative=True, generator=generator)
        return self.apply(repeated, repeated_saliency, draws, negative=True)

    # ------------------------------------------------------------------------------------------- draws

    def cell_counts(self, fg_ratio: torch.Tensor, ratio: torch.Tensor, negative: bool) -> tuple[torch.Tensor, ...]:
        """(FG count, BG count) per image before clamping, by the paper's formulas."""
        total = self.config.grid**2
        if negative:
            cap = self.config.fg_cap if self.config.strategy == "hp" else 1.0
            fg = torch.round(torch.clamp(ratio * fg_ratio, max=cap) * total)
            return fg.long(), torch.zeros_like(fg, dtype=torch.long)
        fg = torch.round(torch.clamp(ratio * fg_ratio, max=self.config.fg_cap) * total).long()
        return fg, torch.floor(ratio * total).long() - fg

    def draw(self, views: torch.Tensor, saliency: SaliencyMaps, negative: bool,
             generator: torch.Generator | None = None) -> MaskDraws:
        cfg = self.config
        n, c, h, w = views.shape
        if saliency.grid != cfg.grid or len(saliency) != n:
            raise ValueError(f"saliency is {len(saliency)} x {saliency.grid}x{saliency.grid}, expected "
                             f"{n} x {cfg.grid}x{cfg.grid}")
        device = views.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        low, high = cfg.negative_ratio if negative else cfg.query_ratio
        ratio = low + (high - low) * uniform(n)
        fg_count, bg_count = self.cell_counts(saliency.fg_ratio.to(device), ratio, negative)
        fg_available = saliency.foreground.flatten(1).sum(1).to(device)
        fg_count = torch.minimum(fg_count.clamp_min(0), fg_available)
        bg_count = torch.minimum(bg_count.clamp_min(0), cfg.grid**2 - fg_available)
        scores = uniform(n, c, cfg.grid**2)
        hp = cfg.strategy == "hp"
        focal = (uniform(n) < cfg.focal_p) if hp else torch.zeros(n, dtype=torch.bool, device=device)
        channelwise = (uniform(n) < cfg.channelwise_p) if hp else torch.zeros(n, dtype=torch.bool, device=device)
        window = self.negative_window if negative else self.query_window
        top = torch.floor(uniform(n) * (h - window + 1)).long().clamp(0, h - window)
        left = torch.floor(uniform(n) * (w - window + 1)).long().clamp(0, w - window)
        noise = None
        if hp:
            std = cfg.noise_std_negative if negative else cfg.noise_std_query
            noise = noise_fill(views.shape, std, channelwise, generator, device, views.dtype)
        return MaskDraws(ratio, fg_count, bg_count, scores, focal, channelwise, torch.stack([top, left], 1), noise)

    # ------------------------------------------------------------------------------------------- apply

    def select_cells(self, saliency: SaliencyMaps, draws: MaskDraws) -> torch.Tensor:
        """(N, C, G, G) bool: the ``fg_count`` lowest-score FG cells and ``bg_count`` lowest-score BG cells
        of each channel; spatial rows use channel 0's choice for every channel; focal rows none."""
        n, c, cells = draws.scores.shape
        fg = saliency.foreground.flatten(1).to(draws.scores.device)[:, None, :].expand(n, c, cells)
        chosen = _lowest_in_set(draws.scores, fg, draws.fg_count) | _lowest_in_set(draws.scores, ~fg, draws.bg_count)
        chosen = torch.where(draws.channelwise[:, None, None], chosen, chosen[:, :1].expand_as(chosen))
        chosen = chosen & ~draws.focal[:, None, None]
        g = self.config.grid
        return chosen.view(n, c, g, g)

    def cell_pixels(self, cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, C, G, G) cell mask -> (N, C, H, W) pixel mask (cell rows/cols as equal as integers allow)."""
        n, c, g, _ = cells.shape
        if height % g == 0 and width % g == 0:  # equal cells (224 px / 7): one broadcast copy
            rows, cols = height // g, width // g
            return cells[:, :, :, None, :, None].expand(n, c, g, rows, g, cols).reshape(n, c, height, width)
        # index_select is several times faster than advanced indexing for this gather on the CPU
        rows = torch.arange(height, device=cells.device) * g // height
        cols = torch.arange(width, device=cells.device) * g // width
        return cells.index_select(2, rows).index_select(3, cols)

    def focal_region(self, draws: MaskDraws, height: int, width: int, negative: bool) -> torch.Tensor:
        """(N, H, W): for the query everything outside the window, for a negative the square itself
        (all False on rows without focal masking)."""
        window = self.negative_window if negative else self.query_window
        device = draws.window_origin.device
        top, left = draws.window_origin[:, :1], draws.window_origin[:, 1:]
        ys = torch.arange(height, device=device)[None, :] - top
        xs = torch.arange(width, device=device)[None, :] - left
        in_rows = (ys >= 0) & (ys < window) & draws.focal[:, None]
        in_cols = (xs >= 0) & (xs < window)
        inside = in_rows[:, :, None] & in_cols[:, None, :]
        return inside if negative else ~inside & draws.focal[:, None, None]

    def focal_pixels(self, draws: MaskDraws, shape: torch.Size, negative: bool) -> torch.Tensor:
        """(N, C, H, W) view of :meth:`focal_region` (the same region in every channel)."""
        n, c, h, w = shape
        return self.focal_region(draws, h, w, negative)[:, None].expand(n, c, h, w)

    def fill(self, views: torch.Tensor, draws: MaskDraws) -> torch.Tensor:
        strategy = self.config.strategy
        if strategy == "hp":
            return draws.noise
        if strategy == "blur":
            return blur_fill(views, self.blur_kernel, self.blur_sigma)
        return mean_fill(views)

    def apply(self, views: torch.Tensor, saliency: SaliencyMaps, draws: MaskDraws, negative: bool) -> MaskedViews:
        cells = self.select_cells(saliency, draws)
        pixels = self.cell_pixels(cells, views.shape[2], views.shape[3])
        if self.config.strategy == "hp":
            pixels = pixels | self.focal_pixels(draws, views.shape, negative)
        images = same_memory_format(torch.where(pixels, self.fill(views, draws), views), views)
        return MaskedViews(images=images, cells=cells, pixels=pixels, focal=draws.focal.clone())


def _lowest_in_set(scores: torch.Tensor, in_set: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, mark the ``count`` members of ``in_set`` with the lowest scores (count <= set size)."""
    ranked = torch.where(in_set, scores, torch.full_like(scores, 2.0))  # non-members rank after members
    rank = ranked.argsort(dim=-1).argsort(dim=-1)
    return in_set & (rank < count[:, None, None])
