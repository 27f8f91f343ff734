"""+ MSCN: random masking on the hp machinery: uniform cells, high-pass views, noise fill, no hard negatives."""

from __future__ import annotations

import pytest
import torch

from pretrain import distributed
from pretrain.augment import TwoViewBatch
from pretrain.config import ConfigError, load_config
from pretrain.filters import highpass
from pretrain.methods import METHODS
from tests.pretrain.engine_helpers import REPO

TOY = REPO / "configs" / "pretrain" / "toy"
PAPER = REPO / "configs" / "pretrain" / "paper"


def _method(name: str, size: int = 64, **extra):
    overrides = ["data.root=/unused", f"augment.image_size={size}", "model.arch=resnet18", "data.batch_size=8",
                 *(f"{k}={v}" for k, v in extra.items())]
    cfg = load_config(TOY / f"{name}.yaml", overrides)
    return cfg, METHODS[cfg.method](cfg, distributed.World(), num_classes=4)


def _batch(query: torch.Tensor, key: torch.Tensor) -> TwoViewBatch:
    n = query.shape[0]
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)
    flip = torch.zeros(n, dtype=torch.bool)
    return TwoViewBatch(query, key, box, box.clone(), flip, flip.clone(), torch.zeros(n, dtype=torch.long),
                        torch.arange(n))


class KeyEncoderSpy:
    def __init__(self):
        self.calls = []

    def __call__(self, images, need_activation):
        self.calls.append(need_activation)
        return torch.zeros(images.shape[0], 4), None


@pytest.mark.parametrize("name", ["mocov2_mscn", "simclr_mscn"])
def test_mscn_configs_and_meta_say_random_hp_masking_without_hard_negatives(name):
    for path in (PAPER / f"{name}.yaml", TOY / f"{name}.yaml"):
        cfg = load_config(path, ["data.root=/x"])
        assert (cfg.method, cfg.masking.name, cfg.masking.strategy, cfg.masking.branch) == (
            name.split("_")[0], "mscn", "hp", "query")
        assert (cfg.saliency.source, cfg.masking.num_hard_negatives, cfg.masking.grid) == ("none", 0, 7)
    paper = load_config(PAPER / f"{name}.yaml", ["data.root=/x"])
    assert dict(paper.masking.input_filter) == {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    assert (paper.augment.image_size, paper.masking.noise_std_query, paper.masking.focal_p,
            paper.masking.focal_query_window, paper.masking.channelwise_p) == (224, 0.18, 0.2, 200, 0.7)
    _, method = _method(name)
    meta = method.meta()
    assert (meta["method"], meta["masking"], meta["strategy"], meta["mask_branch"]) == (
        name.split("_")[0], "mscn", "hp", "query")
    assert (meta["saliency_source"], meta["hard_negatives"]) == ("none", 0)
    assert meta["input_filter"] == {"name": "highpass", "kernel_size": 5, "sigma": 1.5}  # scaled to 64 px


def test_mscn_views_are_highpass_filtered_noise_filled_and_the_key_is_untouched():
    cfg, method = _method("mocov2_mscn", size=64)
    torch.manual_seed(0)
    query, key = torch.randn(64, 3, 64, 64), torch.randn(64, 3, 64, 64)
    spy = KeyEncoderSpy()
    prepared = method.masking.prepare(_batch(query, key), spy, torch.Generator().manual_seed(1))
    assert spy.calls == [False]  # no saliency forward: the key is encoded once, for its embedding only
    assert prepared.negatives is None and prepared.negatives_masked is None
    assert bool(prepared.key_maps.foreground.all()) and torch.equal(prepared.key_maps.fg_ratio, torch.ones(64))
    assert torch.equal(prepared.key, highpass(key, 5, 1.5))
    filtered = highpass(query, 5, 1.5)
    masked = prepared.query_masked
    assert torch.equal(prepared.query[~masked.pixels], filtered[~masked.pixels])
    fill = prepared.query[masked.pixels]
    assert fill.numel() > 10_000
    assert abs(float(fill.mean())) < 0.01 and float(fill.std()) == pytest.approx(0.18, rel=0.05)
    grid_rows = ~masked.focal
    cells = masked.cells[grid_rows].flatten(2).sum(-1)  # (rows, C) masked cells per channel
    assert bool((cells >= round(0.05 * 49)).all() and (cells <= round(0.25 * 49)).all())
    assert 0.05 <= float(masked.masked_fraction[grid_rows].min()) and float(masked.masked_fraction.max()) < 0.35
    assert 0 < int(masked.focal.sum()) < 64 and 0 < int((masked.cells[:, 0] != masked.cells[:, 1]).any(-1).any(-1).sum())


def test_mscn_cells_are_uniform_and_ignore_the_image_content():
    _, method = _method("simclr_mscn", size=56, **{"masking.focal_p": 0.0})
    salient = torch.zeros(512, 3, 56, 56)
    salient[:, :, 20:36, 20:36] = 5.0  # a bright object in the centre
    noise = torch.randn(512, 3, 56, 56)
    draws = []
    for images in (salient, noise):
        prepared = method.masking.prepare(_batch(images, images), KeyEncoderSpy(), torch.Generator().manual_seed(3))
        draws.append(prepared.query_masked.cells)
    assert torch.equal(draws[0], draws[1])  # the same random draws mask the same cells whatever the image
    frequency = draws[0].float().mean(dim=(0, 1)).flatten()  # per cell, over images and channels
    expected = frequency.mean()
    assert 0.1 < float(expected) < 0.2
    assert float((frequency - expected).abs().max()) < 0.04  # every cell about equally likely


@pytest.mark.parametrize("override,message", [
    ({"saliency.source": "momentum"}, "saliency.source must be 'none'"),
    ({"masking.num_hard_negatives": 1}, "no hard negatives"),
    ({"masking.strategy": "blur"}, "must be 'hp'"),
    ({"masking.branch": "both"}, "masks one branch"),
])
def test_mscn_refuses_settings_that_make_it_something_else(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TOY / "mocov2_mscn.yaml", ["data.root=/x", *(f"{k}={v}" for k, v in override.items())])
