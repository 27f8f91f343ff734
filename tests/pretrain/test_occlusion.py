"""ADIOS's occlusion network and sparsity penalty: masks partition every pixel, the penalty's shape."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pretrain.occlusion import (
    OcclusionNetwork,
    mask_fractions,
    occlude,
    pick_masks,
    sparsity_penalty,
    unet_depth,
)


@settings(max_examples=8, deadline=None)
@given(size=st.sampled_from([32, 40, 64]), num_masks=st.integers(2, 6), width=st.sampled_from([4, 8, 12]),
       norm=st.sampled_from(["gn", "in", "none"]), seed=st.integers(0, 2**16), scale=st.floats(0.1, 20.0))
def test_masks_partition_every_pixel(size, num_masks, width, norm, seed, scale):
    torch.manual_seed(seed)
    net = OcclusionNetwork(size, num_masks=num_masks, width=width, norm=norm, bottleneck_dim=16)
    masks = net(torch.randn(2, 3, size, size) * scale)
    assert masks.shape == (2, num_masks, size, size)
    assert (masks >= 0).all() and (masks <= 1).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, size, size), atol=1e-5, rtol=0)
    fractions = mask_fractions(masks)
    torch.testing.assert_close(fractions.sum(1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,depth", [(32, 4), (64, 5), (96, 5), (224, 6)])
def test_unet_has_log2_size_minus_one_blocks_of_conv_norm_relu(size, depth):
    assert unet_depth(size) == depth == int(math.log2(size) - 1)
    net = OcclusionNetwork(size, num_masks=4, width=8, norm="gn")
    assert len(net.down) == len(net.up) == depth
    for block in [*net.down, *net.up]:
        conv, norm, relu = block
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert isinstance(norm, nn.GroupNorm) and isinstance(relu, nn.ReLU)
    assert net.head.kernel_size == (1, 1) and net.head.out_channels == 4
    assert isinstance(OcclusionNetwork(size, width=8, norm="in").down[0][1], nn.InstanceNorm2d)
    linears = [m for m in net.bottleneck if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears[:2]] == [128, 128]  # the small MLP bottleneck


def test_masks_depend_on_the_image_and_gradients_reach_the_network():
    torch.manual_seed(0)
    net = OcclusionNetwork(32, num_masks=3, width=8)
    images = torch.randn(4, 3, 32, 32)
    masks = net(images)
    assert not torch.allclose(masks[0], masks[1])
    occlude(images, masks[:, 0]).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@settings(max_examples=60, deadline=None)
@given(fractions=st.lists(st.lists(st.floats(1e-3, 1 - 1e-3), min_size=2, max_size=6), min_size=1, max_size=5)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_sparsity_penalty_matches_its_formula_and_is_finite_on_valid_masks(fractions):
    s = torch.tensor(fractions, dtype=torch.float64)
    penalty = sparsity_penalty(s)
    expected = sum(sum(1 / math.sin(math.pi * row[n]) for row in fractions) / len(fractions)
                   for n in range(len(fractions[0])))
    assert math.isfinite(float(penalty))
    assert float(penalty) == pytest.approx(expected, rel=1e-5)
    assert float(penalty) >= s.shape[1] - 1e-6  # each term >= 1, equality at half coverage


def test_sparsity_penalty_is_smallest_at_half_coverage_and_blows_up_toward_degenerate_masks():
    def penalty(s: float) -> float:
        return float(sparsity_penalty(torch.tensor([[s, 1 - s]])))

    assert penalty(0.5) == pytest.approx(2.0)
    toward_empty = [penalty(s) for s in (0.4, 0.2, 0.05, 1e-2, 1e-4)]
    assert toward_empty == sorted(toward_empty) and toward_empty[-1] > 1e3
    assert penalty(0.0) > 1e9 and math.isfinite(penalty(0.0))  # eps keeps an exactly empty mask finite
    # On masks the network makes (softmax: never exactly 0 or 1) it is always finite.
    masks = OcclusionNetwork(32, num_masks=6, width=8)(torch.randn(3, 3, 32, 32) * 50)
    assert torch.isfinite(sparsity_penalty(mask_fractions(masks)))


def test_occlude_and_pick_masks():
    images = torch.randn(3, 3, 8, 8)
    masks = torch.rand(3, 4, 8, 8).softmax(1)
    torch.testing.assert_close(occlude(images, masks[:, 2]), images * (1 - masks[:, 2:3]))
    choice = torch.tensor([3, 0, 2])
    picked = pick_masks(masks, choice)
    for b, n in enumerate(choice.tolist()):
        assert torch.equal(picked[b], masks[b, n])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 2 masks"):
        OcclusionNetwork(32, num_masks=1)
    with pytest.raises(ValueError, match="norm"):
        OcclusionNetwork(32, norm="bn")
    with pytest.raises(ValueError, match="built for 32 px"):
        OcclusionNetwork(32, width=8)(torch.zeros(1, 3, 64, 64))
