"""The straightforward per-sample, per-cell implementation of :mod:`pretrain.masking`.

It applies the same random draws (:class:`~pretrain.masking.MaskDraws`) as the batched code with plain
Python loops over samples, channels and cells, the way the released code masks. It is the reference the
tests compare the batched code with, and the baseline ``python -m pretrain.bench`` times it against.
Do not use it for training.
"""

from __future__ import annotations

import torch

from pretrain.masking import MaskDraws, SaliencyGuidedMasking
from pretrain.saliency import SaliencyMaps


def cell_bounds(index: int, cells: int, size: int) -> tuple[int, int]:
    """Pixel range [start, stop) of cell ``index`` of ``cells`` along an axis of ``size`` pixels."""
    return -(-index * size // cells), -(-(index + 1) * size // cells)


def reference_apply(masker: SaliencyGuidedMasking, views: torch.Tensor, saliency: SaliencyMaps,
                    draws: MaskDraws, negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked images, (N, C, G, G) chosen cells) computed one sample, channel and cell at a time."""
    cfg = masker.config
    g = cfg.grid
    n, c, h, w = views.shape
    out = views.clone()
    chosen_cells = torch.zeros(n, c, g, g, dtype=torch.bool)
    fill = masker.fill(views, draws)  # the fill images themselves are not what is being compared
    window = masker.negative_window if negative else masker.query_window
    for i in range(n):
        if bool(draws.focal[i]):
            top, left = (int(v) for v in draws.window_origin[i])
            square = (slice(None), slice(top, top + window), slice(left, left + window))
            if negative:  # one noise square
                out[i][square] = fill[i][square]
            else:  # noise everywhere but the kept window
                out[i] = fill[i]
                out[i][square] = views[i][square]
            continue
        foreground = [cell for cell in range(g * g) if bool(saliency.foreground[i].flatten()[cell])]
        background = [cell for cell in range(g * g) if cell not in foreground]
        for ch in range(c):
            score_channel = ch if bool(draws.channelwise[i]) else 0
            scores = draws.scores[i, score_channel]
            picked = sorted(foreground, key=lambda cell: float(scores[cell]))[: int(draws.fg_count[i])]
            picked += sorted(background, key=lambda cell: float(scores[cell]))[: int(draws.bg_count[i])]
            for cell in picked:
                row, col = divmod(cell, g)
                chosen_cells[i, ch, row, col] = True
                y0, y1 = cell_bounds(row, g, h)
                x0, x1 = cell_bounds(col, g, w)
                out[i, ch, y0:y1, x0:x1] = fill[i, ch, y0:y1, x0:x1]
    return out, chosen_cells
