"""Saliency-guided masking: properties over many random saliency maps, ratios and strategies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.fills import gaussian_blur
from pretrain.masking import MaskingConfig, SaliencyGuidedMasking
from pretrain.masking_reference import cell_bounds, reference_apply
from pretrain.saliency import SaliencyMaps, uniform_saliency

G = 7
CELLS = G * G


def _random_saliency(batch: int, generator: torch.Generator, fg_probability: float) -> SaliencyMaps:
    cells = torch.rand(batch, G, G, generator=generator)
    foreground = torch.rand(batch, G, G, generator=generator) < fg_probability
    return SaliencyMaps(cells, foreground)


def _setup(seed: int, strategy: str, size: int = 32, batch: int = 6, fg_probability: float = 0.5, **options):
    generator = torch.Generator().manual_seed(seed)
    views = torch.randn(batch, 3, size, size, generator=generator)
    saliency = _random_saliency(batch, generator, fg_probability)
    masker = SaliencyGuidedMasking(MaskingConfig(strategy=strategy, **options), image_size=size)
    return masker, views, saliency, generator


def _expected_counts(ratio: torch.Tensor, fg_ratio: torch.Tensor, n_fg: torch.Tensor, cap: float, negative: bool):
    """The paper's formulas, written per sample with Python arithmetic."""
    fg, bg = [], []
    for r, q, available in zip(ratio.tolist(), fg_ratio.tolist(), n_fg.tolist()):
        want_fg = round(min(r * q, cap) * CELLS)
        want_bg = 0 if negative else math.floor(CELLS * r) - want_fg
        fg.append(min(max(want_fg, 0), available))
        bg.append(min(max(want_bg, 0), CELLS - available))
    return torch.tensor(fg), torch.tensor(bg)


strategies = st.sampled_from(["hp", "blur", "mean"])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=strategies, fg_probability=st.floats(0.0, 1.0))
def test_query_cell_counts_follow_the_saliency_split(seed, strategy, fg_probability):
    masker, views, saliency, generator = _setup(seed, strategy, fg_probability=fg_probability)
    draws = masker.draw(views, saliency, negative=False, generator=generator)
    out = masker.apply(views, saliency, draws, negative=False)
    assert ((draws.ratio >= 0.05) & (draws.ratio <= 0.25)).all()
    n_fg = saliency.foreground.flatten(1).sum(1)
    fg_count, bg_count = _expected_counts(draws.ratio, saliency.fg_ratio, n_fg, 0.55, negative=False)
    fg = saliency.foreground[:, None].expand_as(out.cells)
    for i in range(len(views)):
        if out.focal[i]:
            assert not out.cells[i].any()
            continue
        for channel in range(3):
            assert (out.cells[i, channel] & fg[i, channel]).sum() == fg_count[i]
            assert (out.cells[i, channel] & ~fg[i, channel]).sum() == bg_count[i]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=strategies, fg_probability=st.floats(0.0, 1.0),
       n=st.integers(1, 3))
def test_hard_negatives_touch_only_foreground_cells(seed, strategy, fg_probability, n):
    masker, views, saliency, generator = _setup(seed, strategy, fg_probability=fg_probability,
                                                num_hard_negatives=n)
    original = views.clone()
    draws_generator = torch.Generator().manual_seed(seed)
    out = masker.hard_negatives(views, saliency, generator=draws_generator)
    assert torch.equal(views, original), "the key view itself is never modified"
    assert out.images.shape == (len(views) * n, 3, 32, 32)
    rows = torch.arange(len(views)).repeat_interleave(n)
    fg = saliency.foreground[rows]
    cap = 0.55 if strategy == "hp" else 1.0
    draws = masker.draw(views.repeat_interleave(n, 0), saliency.index(rows), negative=True,
                        generator=torch.Generator().manual_seed(seed))
    assert ((draws.ratio >= 0.4) & (draws.ratio <= 0.7)).all()
    fg_count, _ = _expected_counts(draws.ratio, saliency.fg_ratio[rows], fg.flatten(1).sum(1), cap, negative=True)
    for i in range(len(rows)):
        assert torch.equal(out.images[i][~out.pixels[i]], views[rows[i]][~out.pixels[i]]), "unmasked pixels kept"
        if out.focal[i]:
            continue
        assert not (out.cells[i] & ~fg[i][None]).any(), "a negative masks foreground cells only"
        assert (out.cells[i, 0]).sum() == fg_count[i]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=strategies, negative=st.booleans(),
       size=st.sampled_from([32, 45, 64]))
def test_batched_masking_equals_the_per_sample_loop(seed, strategy, negative, size):
    masker, views, saliency, generator = _setup(seed, strategy, size=size, batch=4)
    draws = masker.draw(views, saliency, negative=negative, generator=generator)
    batched = masker.apply(views, saliency, draws, negative=negative)
    images, cells = reference_apply(masker, views, saliency, draws, negative=negative)
    assert torch.equal(batched.cells, cells)
    assert torch.equal(batched.images, images)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), negative=st.booleans())
def test_fills_write_exactly_what_each_strategy_says(seed, negative):
    for strategy in ("hp", "blur", "mean"):
        masker, views, saliency, generator = _setup(seed, strategy)
        draws = masker.draw(views, saliency, negative=negative, generator=generator)
        out = masker.apply(views, saliency, draws, negative=negative)
        pixels = out.pixels
        assert torch.equal(out.images[~pixels], views[~pixels]), "nothing changes outside masked pixels"
        if strategy == "hp":
            expected = draws.noise
        elif strategy == "blur":
            expected = gaussian_blur(views, masker.blur_kernel, masker.blur_sigma)
        else:
            expected = views.mean((2, 3), keepdim=True).expand_as(views)
        assert torch.equal(out.images[pixels], expected[pixels])
        if strategy != "hp":
            assert not out.focal.any() and not draws.channelwise.any(), "blur/mean: spatial grid masking only"
            assert torch.equal(out.cells, out.cells[:, :1].expand_as(out.cells))


def test_noise_statistics_and_channel_structure():
    masker, views, saliency, generator = _setup(0, "hp", size=64, batch=64)
    draws = masker.draw(views, saliency, negative=False, generator=generator)
    query = masker.apply(views, saliency, draws, negative=False)
    negatives = masker.hard_negatives(views, saliency, generator=generator)
    for out, std in ((query, 0.18), (negatives, 0.14)):
        values = out.images[out.pixels]
        assert values.numel() > 5000
        assert values.mean().abs().item() < 0.01
        assert values.std().item() == pytest.approx(std, rel=0.05)
    spatial = ~draws.focal & ~draws.channelwise
    channelwise = ~draws.focal & draws.channelwise
    assert spatial.any() and channelwise.any()
    for i in torch.nonzero(spatial).flatten():
        assert torch.equal(query.cells[i], query.cells[i, :1].expand_as(query.cells[i])), "spatial: same cells"
        masked = query.pixels[i, 0]
        assert torch.equal(query.images[i, 0][masked], query.images[i, 1][masked]), "spatial: one noise plane"
    differing_cells = 0
    for i in torch.nonzero(channelwise).flatten():
        differing_cells += not torch.equal(query.cells[i, 0], query.cells[i, 1])
        masked = query.pixels[i, 0] & query.pixels[i, 1]
        if masked.any():
            assert not torch.equal(query.images[i, 0][masked], query.images[i, 1][masked]), "noise per channel"
    assert differing_cells >= 0.8 * channelwise.sum().item(), "channel-wise: each channel draws its own cells"


def test_hp_mixes_focal_spatial_and_channelwise_at_the_configured_rates():
    masker, views, saliency, generator = _setup(1, "hp", size=32, batch=4000)
    draws = masker.draw(views, saliency, negative=False, generator=generator)
    assert draws.focal.float().mean().item() == pytest.approx(0.2, abs=0.025)
    assert draws.channelwise.float().mean().item() == pytest.approx(0.7, abs=0.025)


@pytest.mark.parametrize("negative", [False, True])
def test_focal_masking_geometry(negative):
    size = 64
    masker, views, saliency, generator = _setup(2, "hp", size=size, batch=40, focal_p=1.0)
    window = round((130 if negative else 200) * size / 224)
    assert window == (masker.negative_window if negative else masker.query_window)
    method = masker.hard_negatives if negative else masker.mask_query
    out = method(views, saliency, generator=generator)
    assert out.focal.all() and not out.cells.any()
    origins = set()
    for i in range(len(out.images)):
        region = out.pixels[i, 0] if negative else ~out.pixels[i, 0]
        assert torch.equal(out.pixels[i], out.pixels[i, :1].expand_as(out.pixels[i]))
        ys, xs = torch.nonzero(region, as_tuple=True)
        top, left = ys.min().item(), xs.min().item()
        assert ys.max().item() - top + 1 == window and xs.max().item() - left + 1 == window
        assert region.sum().item() == window * window, "exactly one square window inside the image"
        origins.add((top, left))
    assert len(origins) > 10, "window positions are random"


def test_uniform_saliency_spreads_masks_evenly():
    masker, views, _, generator = _setup(3, "mean", batch=4000)
    out = masker.mask_query(views, uniform_saliency(4000, G), generator=generator)
    frequency = out.cells[:, 0].float().mean(0)
    expected = frequency.mean()
    assert expected.item() == pytest.approx(0.15 - 0.5 / CELLS, abs=0.02)  # E[floor(49 r)] / 49
    assert (frequency - expected).abs().max().item() < 0.03


def test_grid_cells_cover_the_image_in_near_equal_bands():
    for size in (32, 45, 64, 224):
        bounds = [cell_bounds(i, G, size) for i in range(G)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert cell_bounds(1, 7, 224) == (32, 64)


def test_same_generator_seed_gives_the_same_masks():
    masker, views, saliency, _ = _setup(4, "hp")
    a = masker.mask_query(views, saliency, generator=torch.Generator().manual_seed(9))
    b = masker.mask_query(views, saliency, generator=torch.Generator().manual_seed(9))
    c = masker.mask_query(views, saliency, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_sizes_scale_with_the_image():
    masker = SaliencyGuidedMasking(MaskingConfig(strategy="blur"), image_size=224)
    assert (masker.blur_kernel, masker.blur_sigma, masker.query_window) == (31, 10.0, 200)
    small = SaliencyGuidedMasking(MaskingConfig(strategy="blur"), image_size=64)
    assert small.blur_kernel % 2 == 1 and small.blur_kernel == 9
    assert small.blur_sigma == pytest.approx(10 * 64 / 224)


@pytest.mark.parametrize("bad, message", [
    (dict(strategy="noise"), "strategy"),
    (dict(query_ratio=(0.3, 0.1)), "query_ratio"),
    (dict(negative_ratio=(0.4, 1.5)), "negative_ratio"),
    (dict(num_hard_negatives=-1), "num_hard_negatives"),
    (dict(focal_p=2.0), "focal_p"),
])
def test_invalid_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**bad)


def test_config_round_trip_and_unknown_keys():
    config = MaskingConfig(strategy="mean", query_ratio=[0.1, 0.2])
    assert MaskingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown masking option"):
        MaskingConfig.from_dict({"stratgy": "hp"})


def test_saliency_shape_mismatch_is_refused():
    masker, views, _, _ = _setup(5, "hp")
    with pytest.raises(ValueError, match="saliency"):
        masker.mask_query(views, uniform_saliency(len(views) + 1, G))


def test_no_hard_negatives_configured_is_an_error():
    masker, views, saliency, _ = _setup(6, "hp", num_hard_negatives=0)
    with pytest.raises(ValueError, match="num_hard_negatives is 0"):
        masker.hard_negatives(views, saliency)
