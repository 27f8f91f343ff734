"""Fill strategies: the separable blur equals torchvision's, kernels scale with the image, fills' shapes."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pretrain.fills import gaussian_blur, mean_fill, noise_fill, scaled_kernel


@pytest.mark.parametrize("kernel, sigma, size", [(31, 10.0, 64), (9, 2.9, 20), (11, 5.0, 32), (31, 10.0, 12)])
def test_separable_blur_equals_torchvision_gaussian_blur(kernel, sigma, size):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(images, kernel, sigma)
    assert ours.shape == images.shape
    assert ours.std() < images.std(), "a blur removes high frequencies"
    if kernel // 2 < size:
        theirs = TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
        assert torch.allclose(ours, theirs, atol=1e-5)
    # else: torchvision refuses (reflect padding needs pad < size); ours falls back to replicate padding


def test_blur_commutes_with_per_channel_normalization():
    image = torch.rand(1, 3, 40, 40)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    blurred_then_normalized = (gaussian_blur(image, 9, 3.0) - mean) / std
    normalized_then_blurred = gaussian_blur((image - mean) / std, 9, 3.0)
    assert torch.allclose(blurred_then_normalized, normalized_then_blurred, atol=1e-5)


def test_invalid_blur_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(torch.rand(1, 3, 8, 8), 4, 1.0)


def test_kernel_scaling_keeps_odd_sizes():
    assert scaled_kernel(31, 224) == 31
    assert scaled_kernel(31, 64) == 9
    assert scaled_kernel(11, 64) == 3
    assert all(scaled_kernel(31, size) % 2 == 1 for size in range(8, 400, 7))


def test_mean_fill_is_the_per_image_channel_mean():
    images = torch.randn(3, 3, 10, 10)
    filled = mean_fill(images)
    assert torch.allclose(filled[:, :, 4, 7], images.mean((2, 3)))
    assert torch.equal(filled, filled[:, :, :1, :1].expand_as(filled))


def test_noise_fill_shares_a_plane_only_for_spatial_rows():
    channelwise = torch.tensor([True, False])
    noise = noise_fill((2, 3, 16, 16), 0.5, channelwise, torch.Generator().manual_seed(0))
    assert not torch.equal(noise[0, 0], noise[0, 1])
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 0], noise[1, 2])
