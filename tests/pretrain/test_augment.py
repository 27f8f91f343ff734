"""The two-crop pipeline reports each view's crop box and flip so saliency can be carried between views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pretrain.augment import TwoCropTransform, denormalize, normalize, to_device_batch
from pretrain.config import AugmentConfig
from pretrain.data import collate_samples


def _coordinate_image(height=90, width=120) -> Image.Image:
    """Red encodes x, green encodes y (so a view's pixels say where they came from)."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros_like(xs)], -1)
    return Image.fromarray(pixels.round().astype(np.uint8))


def _geometry_only(size=48, **extra):
    return OmegaConf.structured(AugmentConfig(image_size=size, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                              **extra))


@pytest.mark.parametrize("seed", range(8))
def test_crop_box_and_flip_locate_the_view_in_the_original(seed):
    torch.manual_seed(seed)
    views = TwoCropTransform(_geometry_only())(_coordinate_image())
    for name in ("query", "key"):
        view = views[name].float()
        y0, x0, y1, x1 = views[f"{name}_box"].tolist()
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        left, right = view[0, :, 0].mean() / 255, view[0, :, -1].mean() / 255
        if bool(views[f"{name}_flip"]):
            left, right = right, left
        top, bottom = view[1, 0, :].mean() / 255, view[1, -1, :].mean() / 255
        tolerance = 0.03  # a pixel of the crop plus resampling
        assert left.item() == pytest.approx(x0, abs=tolerance) and right.item() == pytest.approx(x1, abs=tolerance)
        assert top.item() == pytest.approx(y0, abs=tolerance) and bottom.item() == pytest.approx(y1, abs=tolerance)


def test_views_are_uint8_and_independent_and_flips_happen():
    transform = TwoCropTransform(OmegaConf.structured(AugmentConfig(image_size=32)))
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        views = transform(_coordinate_image())
        assert views["query"].dtype == torch.uint8 and views["query"].shape == (3, 32, 32)
        flips.append(bool(views["query_flip"]))
    assert any(flips) and not all(flips)


def test_device_batch_is_normalized_and_round_trips():
    transform = TwoCropTransform(_geometry_only(size=16))
    samples = []
    for i in range(2):
        torch.manual_seed(i)
        from pretrain.data import Sample

        samples.append(Sample(transform(_coordinate_image()), label=i, index=i))
    batch = to_device_batch(collate_samples(samples), torch.device("cpu"))
    assert batch.query.dtype == torch.float32 and batch.size == 2
    raw = collate_samples(samples)["views"]["query"]
    assert torch.allclose(denormalize(batch.query) * 255, raw.float(), atol=1e-3)
    assert torch.allclose(normalize(raw), batch.query)
