"""The frozen-source saliency cache: built once, resumable, keyed by inputs, and its crop maps agree with
the saliency computed on the crops themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from pretrain.backbones import build_resnet, layer4_extractor
from pretrain.checkpoint import IMAGENET_NORMALIZE
from pretrain.saliency import scda_saliency
from pretrain.saliency_cache import SaliencyCache, build_saliency_cache, cache_key


class BlockBrightness(nn.Module):
    """A crop-equivariant stand-in for a network: mean brightness of 32 x 32 blocks (stride-32 'layer4')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x.sum(1, keepdim=True), 32)


def _toy_files(toy_world: Path, count: int) -> list[Path]:
    files = sorted((toy_world / "imagenet100" / "train").rglob("*.JPEG"))
    return files[:: max(1, len(files) // count)][:count]


def _normalized(pixels: torch.Tensor) -> torch.Tensor:
    return TF.normalize(pixels.float()[None] / 255, IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])


def _random_crops(files, generator, per_image, crop_size):
    """(index, normalized crop, box, flip) for random RandomResizedCrop-like crops of each file."""
    for index, file in enumerate(files):
        with Image.open(file) as image:
            pixels = TF.pil_to_tensor(image.convert("RGB"))
        height, width = pixels.shape[1:]
        for _ in range(per_image):
            side = (0.3 + 0.7 * torch.rand((), generator=generator).item()) ** 0.5
            h, w = int(side * height), int(side * width)
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            flip = bool(torch.rand((), generator=generator) < 0.5)
            crop = TF.resized_crop(pixels, top, left, h, w, [crop_size, crop_size], antialias=True)
            if flip:
                crop = TF.horizontal_flip(crop)
            box = torch.tensor([[top / height, left / width, (top + h) / height, (left + w) / width]])
            yield index, _normalized(crop), box, torch.tensor([flip])


def _agreement(cache, net, files, crop_size, per_image=4):
    generator = torch.Generator().manual_seed(0)
    agree, corr = [], []
    for index, crop, box, flip in _random_crops(files, generator, per_image, crop_size):
        with torch.no_grad():
            direct = scda_saliency(net(crop))
        mapped = cache.crop_saliency(torch.tensor([index]), box, flip)
        agree.append((direct.foreground == mapped.foreground).float().mean().item())
        corr.append(np.corrcoef(direct.cells.flatten().numpy(), mapped.cells.flatten().numpy())[0, 1])
    return float(np.mean(agree)), float(np.nanmean(corr))


def test_cached_maps_of_an_equivariant_network_match_the_crops_closely(toy_world, tmp_path):
    files = _toy_files(toy_world, 8)
    net = BlockBrightness()
    cache = build_saliency_cache(tmp_path, files, net, "block-brightness", image_size=448, progress=False)
    assert cache.grid == 14 and len(cache) == len(files)
    agree, corr = _agreement(cache, net, files, crop_size=224)
    assert corr > 0.95 and agree > 0.9, (agree, corr)


@pytest.mark.slow
def test_cached_maps_of_a_resnet_agree_with_the_saliency_of_the_crop(toy_world, tmp_path):
    torch.manual_seed(0)
    net = layer4_extractor(build_resnet("resnet18")).eval()
    files = _toy_files(toy_world, 10)
    cache = build_saliency_cache(tmp_path, files, net, "random-resnet18", image_size=448, progress=False)
    agree, corr = _agreement(cache, net, files, crop_size=224)
    # A CNN is not exactly crop-equivariant (padding, receptive fields), hence the tolerance.
    assert agree > 0.75 and corr > 0.6, (agree, corr)


def test_build_is_reused_resumed_and_keyed_by_its_inputs(toy_world, tmp_path):
    files = _toy_files(toy_world, 6)
    net = BlockBrightness()
    first = build_saliency_cache(tmp_path, files, net, "w1", image_size=128, batch_size=2, progress=False)
    maps = np.array(first.maps)
    # Simulate a build killed after the first batch: it continues and ends with the same maps.
    meta_path = first.directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(done=2, complete=False)
    meta_path.write_text(json.dumps(meta))
    np.lib.format.open_memmap(first.directory / "maps.npy", mode="r+")[2:] = -1
    with pytest.raises(RuntimeError, match="incomplete"):
        SaliencyCache(first.directory)
    resumed = build_saliency_cache(tmp_path, files, net, "w1", image_size=128, batch_size=2, progress=False)
    assert resumed.directory == first.directory and np.array_equal(np.array(resumed.maps), maps)
    assert cache_key(files, "w2", 128) != cache_key(files, "w1", 128), "other weights, other cache"
    assert cache_key(files[:-1], "w1", 128) != cache_key(files, "w1", 128), "other files, other cache"
    assert cache_key(files, "w1", 224) != cache_key(files, "w1", 128)
    assert cache_key(files, "w1", 128, layer="layer3") != cache_key(files, "w1", 128), "other layer, other cache"


def test_unreadable_image_gets_a_uniform_map_and_one_warning(toy_world, tmp_path):
    files = _toy_files(toy_world, 3)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="broken.JPEG"):
        cache = build_saliency_cache(tmp_path / "c", [*files, broken], BlockBrightness(), "w", image_size=64,
                                     progress=False)
    saliency = cache.crop_saliency(torch.tensor([3]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]))
    assert saliency.foreground.all()
    assert json.loads((cache.directory / "meta.json").read_text())["unreadable"] == [str(broken)]
