"""The per-epoch picture: what the method does to a fixed set of held-out images.

One row per image, one column per panel a method returns from ``pictures()``; for saliency-guided
masking: query view, key view, key saliency (heat map over the key view), FG cells (background cells
dimmed, grid drawn), masked query (or key), hard negative. Written to ``pictures/epoch_NNN.png``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pretrain.augment import denormalize  # noqa: E402
from pretrain.fileio import atomic_write_bytes  # noqa: E402


def displayable(images: torch.Tensor, filtered: bool) -> torch.Tensor:
    """(N, 3, H, W) normalized (maybe high-pass filtered) -> [0, 1] for display."""
    images = images.detach().float().cpu()
    if not filtered:
        return denormalize(images)
    flat = images.flatten(1)
    low = flat.quantile(0.01, dim=1)[:, None, None, None]
    high = flat.quantile(0.99, dim=1)[:, None, None, None]
    return ((images - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)


def upsample(cells: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    return F.interpolate(cells.detach().float().cpu()[:, None], size=(size, size), mode=mode)[:, 0]


def render(panels: dict[str, Any], filtered: bool, title: str = "") -> bytes:
    """PNG bytes of the grid (rows: images, columns: panels)."""
    base_key = "key view" if "key view" in panels else next(iter(panels))
    base = displayable(panels[base_key], filtered)
    rows, size = base.shape[0], base.shape[-1]
    names = list(panels)
    fig, axes = plt.subplots(rows, len(names), figsize=(1.9 * len(names), 1.9 * rows + 0.4), squeeze=False)
    for col, name in enumerate(names):
        value = panels[name]
        if value.dim() == 4:
            shown = displayable(value, filtered)
        else:
            shown = None
        for row in range(rows):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if shown is not None:
                ax.imshow(shown[row].permute(1, 2, 0).numpy())
            elif value.dtype == torch.bool:
                keep = upsample(value[row:row + 1], size, "nearest")[0]
                dimmed = base[row] * (0.25 + 0.75 * keep)
                ax.imshow(dimmed.permute(1, 2, 0).numpy())
                grid = value.shape[-1]
                for line in range(1, grid):
                    ax.axhline(line * size / grid - 0.5, color="white", linewidth=0.3)
                    ax.axvline(line * size / grid - 0.5, color="white", linewidth=0.3)
            else:
                heat = upsample(value[row:row + 1], size, "bilinear")[0]
                ax.imshow(base[row].permute(1, 2, 0).numpy())
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_picture(path: str | Path, panels: dict[str, Any], filtered: bool, title: str = "") -> Path:
    path = Path(path)
    atomic_write_bytes(path, render(panels, filtered, title))
    return path
