"""Relaxed SCDA saliency: thresholding, the released-code variant, resampling and mapping between crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.saliency import (
    activation_map,
    map_cells,
    resample_to_grid,
    saliency_from_cells,
    scda_foreground,
    scda_saliency,
    uniform_saliency,
)

GRID = 7


def _numpy_foreground(cells: np.ndarray, std_ratio: float = 0.6) -> np.ndarray:
    """The paper's rule written the long way: A >= mean, or mean - A <= std_ratio * std (numpy std)."""
    mean, std = cells.mean(), cells.std()
    return (cells >= mean) | (mean - cells <= std_ratio * std)


def test_column_gradient_is_thresholded_by_hand():
    # A[i, j] = j: mean 3, population std 2 -> threshold 3 - 1.2 = 1.8 -> columns 2..6 are foreground.
    cells = torch.arange(GRID, dtype=torch.float32).expand(GRID, GRID)[None]
    maps = saliency_from_cells(cells)
    assert maps.foreground[0].all(0).tolist() == [False, False, True, True, True, True, True]
    assert maps.foreground[0].any(0).tolist() == [False, False, True, True, True, True, True]
    assert maps.fg_ratio.item() == pytest.approx(35 / 49)


def test_released_code_moves_foreground_to_the_right_of_each_row():
    # A[i, j] = 6 - j: the paper keeps columns 0..4; thresholding the row-sorted copy picks columns 2..6.
    cells = (GRID - 1 - torch.arange(GRID, dtype=torch.float32)).expand(GRID, GRID)[None]
    paper = scda_foreground(cells)
    released = scda_foreground(cells, released_code=True)
    assert paper[0, 0].tolist() == [True] * 5 + [False] * 2
    assert released[0, 0].tolist() == [False] * 2 + [True] * 5
    assert torch.equal(paper.sum(-1), released.sum(-1)), "per-row FG counts are kept"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), std_ratio=st.floats(0.0, 2.0), spread=st.floats(0.01, 100.0))
def test_foreground_matches_the_rule_on_random_maps(seed, std_ratio, spread):
    generator = torch.Generator().manual_seed(seed)
    cells = torch.rand(4, GRID, GRID, generator=generator, dtype=torch.float64) * spread
    fg = scda_foreground(cells, std_ratio)
    for b in range(4):
        expected = _numpy_foreground(cells[b].numpy(), std_ratio)
        assert np.array_equal(fg[b].numpy(), expected)
        assert fg[b][cells[b] >= cells[b].mean()].all(), "every cell at or above the mean is foreground"
    released = scda_foreground(cells, std_ratio, released_code=True)
    assert torch.equal(released.sum(-1), fg.sum(-1))
    # Released-code FG cells form a suffix of each row (the right end).
    assert torch.equal(released, released.int().cummax(-1).values.bool())


def test_constant_map_is_all_foreground():
    maps = saliency_from_cells(torch.full((2, GRID, GRID), 3.0))
    assert maps.foreground.all() and torch.allclose(maps.fg_ratio, torch.ones(2))


def test_activation_map_sums_channels_and_rejects_bad_shapes():
    features = torch.rand(2, 5, 3, 3)
    assert torch.allclose(activation_map(features), features.sum(1))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        activation_map(torch.rand(5, 3, 3))


def test_resampling_to_the_grid():
    maps = torch.rand(2, GRID, GRID)
    assert torch.equal(resample_to_grid(maps), maps)
    fine = torch.rand(2, 14, 14)
    expected = fine.view(2, GRID, 2, GRID, 2).mean((2, 4))
    assert torch.allclose(resample_to_grid(fine), expected, atol=1e-6)
    coarse = resample_to_grid(torch.rand(2, 2, 2))  # ResNet-18 layer4 at 64 px
    assert coarse.shape == (2, GRID, GRID)


def test_scda_saliency_from_layer4_features():
    features = torch.zeros(1, 8, GRID, GRID)
    features[0, :, :3] = -1.0  # a dark region (rows 0-2)
    features[0, :, 4:6, 2:5] = 1.0  # a bright object
    # mean -15/49, population std ~0.66: threshold ~ -0.70, so only the dark rows are background.
    maps = scda_saliency(features)
    assert maps.foreground[0, 4:6, 2:5].all()
    assert not maps.foreground[0, :3].any() and maps.foreground[0, 3:].all()
    assert maps.fg_ratio.item() == pytest.approx(28 / 49)
    # A two-level map is all foreground: the relaxed rule reaches 0.6 std below the mean.
    binary = torch.zeros(1, 8, GRID, GRID)
    binary[0, :, 2:5, 2:5] = 1.0
    assert scda_saliency(binary).foreground.all()


def test_uniform_saliency_is_all_foreground():
    maps = uniform_saliency(3, GRID)
    assert maps.foreground.shape == (3, GRID, GRID) and maps.foreground.all()
    assert torch.equal(maps.fg_ratio, torch.ones(3))


# ------------------------------------------------------------------------------------------ map_cells


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_map_cells_identity_and_flips():
    cells = torch.rand(2, GRID, GRID)
    box = _boxes((0.1, 0.2, 0.7, 0.9), (0.0, 0.0, 1.0, 1.0))
    no, yes = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    assert torch.allclose(map_cells(cells, box, no, box, no), cells)
    assert torch.allclose(map_cells(cells, box, yes, box, yes), cells)
    assert torch.allclose(map_cells(cells, box, no, box, yes), cells.flip(-1))


def test_map_cells_crop_of_a_whole_image_map_averages_the_covered_cells():
    fine = torch.rand(1, 14, 14)  # a cached whole-image map on a finer grid
    whole = _boxes((0.0, 0.0, 1.0, 1.0))
    left_half = _boxes((0.0, 0.0, 1.0, 0.5))
    no = torch.zeros(1, dtype=torch.bool)
    mapped = map_cells(fine, whole, no, left_half, no, grid=GRID)
    # Each destination cell covers 2 source rows x 1 source column of the left half.
    expected = fine[:, :, :GRID].reshape(1, GRID, 2, GRID).mean(2)
    assert torch.allclose(mapped, expected, atol=1e-6)


def test_map_cells_matches_a_smooth_field_evaluated_on_the_crop():
    def field(y, x):
        return torch.sin(3 * x) + torch.cos(2 * y) + x * y

    n = 56
    centers = (torch.arange(n) + 0.5) / n
    whole_map = field(centers[:, None], centers[None, :])[None]
    crop = _boxes((0.25, 0.1, 0.85, 0.6))
    flip = torch.ones(1, dtype=torch.bool)
    mapped = map_cells(whole_map, _boxes((0.0, 0.0, 1.0, 1.0)), torch.zeros(1, dtype=torch.bool), crop, flip)
    g = (torch.arange(GRID) + 0.5) / GRID
    ys = 0.25 + g * 0.6
    xs = 0.1 + (1 - g) * 0.5  # mirrored crop
    expected = field(ys[:, None], xs[None, :])
    assert torch.allclose(mapped[0], expected, atol=0.05)


def test_map_cells_outside_the_source_uses_the_border():
    cells = torch.arange(GRID, dtype=torch.float32).expand(GRID, GRID)[None].clone()
    src = _boxes((0.0, 0.0, 1.0, 0.5))  # source covers the left half only
    dst = _boxes((0.0, 0.5, 1.0, 1.0))  # destination is the right half
    no = torch.zeros(1, dtype=torch.bool)
    mapped = map_cells(cells, src, no, dst, no)
    assert torch.allclose(mapped, torch.full_like(mapped, GRID - 1.0))
