"""Saliency sources: frozen checkpoints (accepted and refused), mapped vs forward query maps."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.backbones import build_resnet
from pretrain.checkpoint import CheckpointError
from pretrain.encoder import trunk_features
from pretrain.saliency import scda_saliency
from pretrain.saliency_sources import (
    FrozenSource,
    SaliencyGuide,
    UniformSource,
    build_source,
    load_frozen_resnet,
)


def test_suite_checkpoint_and_plain_state_dicts_load(random_checkpoint_factory, tmp_path):
    suite = random_checkpoint_factory("resnet18", seed=3, input_filter="highpass")
    trunk, arch, spec = load_frozen_resnet(suite)
    assert arch == "resnet18" and spec["name"] == "highpass"
    torch.manual_seed(0)
    model = build_resnet("resnet18")
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
    trunk, arch, spec = load_frozen_resnet(plain)
    assert arch == "resnet18" and spec is None
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.allclose(trunk.eval()(x), model(x))


def test_non_resnet_and_missing_checkpoints_are_refused(tmp_path):
    vit = tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, vit)
    with pytest.raises(CheckpointError, match="does not hold a torchvision ResNet.*not a ViT"):
        load_frozen_resnet(vit)
    with pytest.raises(CheckpointError, match="saliency checkpoint not found.*LOCAL"):
        load_frozen_resnet(tmp_path / "absent.pth")
    junk = tmp_path / "list.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(CheckpointError, match="not a ResNet state_dict"):
        load_frozen_resnet(junk)


def test_frozen_source_uses_its_own_filter_on_the_unfiltered_view(random_checkpoint_factory):
    path = random_checkpoint_factory("resnet18", seed=1, input_filter="highpass")
    source = FrozenSource(path, torch.device("cpu"))
    unfiltered = torch.randn(2, 3, 64, 64)
    trunk, _, _ = load_frozen_resnet(path)
    expected = trunk_features(trunk.eval(), source.input_filter(unfiltered)).sum(1)
    assert torch.allclose(source.activation(torch.zeros_like(unfiltered), unfiltered), expected, atol=1e-5)
    info = source.describe()
    assert info["saliency_source"] == "frozen" and len(info["saliency_checkpoint_sha256"]) == 64


class _Batch:
    def __init__(self, query_box, key_box, query_flip, key_flip):
        self.query_box, self.key_box, self.query_flip, self.key_flip = query_box, key_box, query_flip, key_flip


def test_query_map_mapped_from_identical_crop_equals_key_map_and_forward_is_exact():
    calls = []

    def activation(images):
        calls.append(images.shape[0])
        return images[:, 0, ::8, ::8]  # any deterministic (B, h, w) map

    source = build_source(OmegaConf.create({"source": "momentum"}), activation, torch.device("cpu"))
    box = torch.tensor([[0.1, 0.2, 0.9, 0.8]] * 3)
    flips = torch.tensor([False, True, False])
    batch = _Batch(box, box, flips, flips)
    views = torch.randn(3, 3, 56, 56)
    mapped = SaliencyGuide(source, 7, 0.6, "mapped", released_code=False)
    key_maps = mapped.maps(views, views)
    assert calls == [3]
    query_maps = mapped.query_from_key(key_maps, batch, views, views)
    assert calls == [3]  # no extra forward
    assert torch.allclose(query_maps.cells, key_maps.cells) and torch.equal(query_maps.foreground, key_maps.foreground)
    exact = SaliencyGuide(source, 7, 0.6, "forward", released_code=False)
    other = torch.randn(3, 3, 56, 56)
    forward_maps = exact.query_from_key(key_maps, batch, other, other)
    assert calls == [3, 3]
    assert torch.allclose(forward_maps.cells, scda_saliency(activation(other)[:, None], 7).cells)


def test_given_activation_is_reused_and_released_code_flag_reaches_thresholding():
    source = build_source(OmegaConf.create({"source": "momentum"}), lambda x: pytest.fail("no forward expected"),
                          torch.device("cpu"))
    activation = torch.rand(4, 7, 7)
    views = torch.zeros(4, 3, 32, 32)
    paper = SaliencyGuide(source, 7, 0.6, "mapped", released_code=False).maps(views, views, activation)
    released = SaliencyGuide(source, 7, 0.6, "mapped", released_code=True).maps(views, views, activation)
    assert torch.equal(paper.foreground, scda_saliency(activation[:, None], 7).foreground)
    assert torch.equal(released.foreground, scda_saliency(activation[:, None], 7, released_code=True).foreground)
    assert not torch.equal(paper.foreground, released.foreground)


def test_uniform_source_marks_every_cell_foreground():
    guide = SaliencyGuide(UniformSource(), 7, 0.6, "mapped", released_code=False)
    maps = guide.maps(torch.zeros(5, 3, 32, 32), torch.zeros(5, 3, 32, 32))
    assert maps.foreground.all() and torch.all(maps.fg_ratio == 1)


@pytest.mark.parametrize("layer, stride", [("layer4", 32), ("layer3", 16)])
def test_saliency_feature_layer_sets_the_map_the_encoder_returns(layer, stride):
    from pretrain.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder("resnet18", 64, 16, saliency_layer=layer).eval()
    images = torch.randn(3, 3, 64, 64)
    _, activation = encoder(images, with_activation=True)
    assert activation.shape == (3, 64 // stride, 64 // stride)
    expected = trunk_features(encoder.trunk, images, until=layer).sum(1)
    assert torch.allclose(activation, expected, atol=1e-4)
    assert torch.allclose(encoder.activation(images), expected, atol=1e-4)
    # the embedding does not depend on which map saliency reads
    reference = Encoder("resnet18", 64, 16).eval()
    reference.load_state_dict(encoder.state_dict())
    assert torch.allclose(encoder(images), reference(images), atol=1e-6)


def test_frozen_source_reads_the_configured_layer_and_records_it(random_checkpoint_factory):
    path = random_checkpoint_factory("resnet18", seed=1)
    config = OmegaConf.create({"source": "frozen", "checkpoint": str(path), "feature_layer": "layer3"})
    source = build_source(config, None, torch.device("cpu"))
    unfiltered = torch.randn(2, 3, 64, 64)
    assert source.activation(unfiltered, unfiltered).shape == (2, 4, 4)
    assert source.describe()["saliency_layer"] == "layer3"
    momentum = build_source(OmegaConf.create({"source": "momentum"}), lambda x: x, torch.device("cpu"))
    assert momentum.describe() == {"saliency_source": "momentum", "saliency_layer": "layer4"}


def test_unknown_saliency_layer_is_refused():
    from pretrain.config import ConfigError, load_config
    from tests.pretrain.engine_helpers import REPO

    with pytest.raises(ConfigError, match="saliency.feature_layer must be one of"):
        load_config(REPO / "configs/pretrain/toy/mocov2_hp.yaml", ["saliency.feature_layer=layer2"])


def test_resnet_with_another_stem_is_refused_not_a_traceback(tmp_path):
    cifar = build_resnet("resnet18")
    cifar.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR-style stem: same keys, other shapes
    torch.save(cifar.state_dict(), tmp_path / "cifar.pth")
    with pytest.raises(CheckpointError, match=r"another shape, e.g. conv1.weight \(64, 3, 3, 3\)"):
        load_frozen_resnet(tmp_path / "cifar.pth")
