"""Input filters recorded in checkpoints: the high-pass filter and its spec."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pretrain.filters import PAPER_HIGHPASS, InputFilter, highpass, normalize_filter_spec


def test_highpass_is_the_image_minus_its_gaussian_blur():
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    expected = x - TF.gaussian_blur(x, [11, 11], [5.0, 5.0])
    assert torch.allclose(highpass(x), expected, atol=1e-5)
    assert torch.allclose(highpass(x[0]), expected[0], atol=1e-5), "(C, H, W) input too"
    flat = torch.full((1, 3, 20, 20), 0.7)
    assert highpass(flat).abs().max() < 1e-5, "a constant image has no high frequencies"


def test_input_filter_applies_its_spec():
    x = torch.randn(1, 3, 24, 24)
    assert torch.equal(InputFilter(None)(x), x)
    assert torch.allclose(InputFilter("highpass")(x), highpass(x))
    assert torch.allclose(InputFilter({"name": "highpass", "kernel_size": 3, "sigma": 1.0})(x), highpass(x, 3, 1.0))


def test_filter_specs_are_validated():
    assert normalize_filter_spec("highpass") == PAPER_HIGHPASS
    assert normalize_filter_spec({"name": "none", "junk": 1}) == {"name": "none"}
    with pytest.raises(ValueError, match="odd"):
        normalize_filter_spec({"name": "highpass", "kernel_size": 4})
    with pytest.raises(ValueError, match="unknown input filter"):
        normalize_filter_spec({"name": "sobel"})
