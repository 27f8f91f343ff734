"""torchvision <-> detectron2 ResNet names follow SPEC section 4 exactly, for both block types."""

from __future__ import annotations

import pytest

from pretrain.backbones import expected_trunk_keys
from transfer.d2names import (
    detectron2_to_torchvision_name,
    torchvision_to_detectron2_name,
    torchvision_to_detectron2_names,
)

TRUNK_TENSORS = {"resnet18": 100, "resnet34": 180, "resnet50": 265, "resnet101": 520}


@pytest.mark.parametrize(("source", "target"), [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_var", "stem.conv1.norm.running_var"),
    ("layer1.0.conv3.weight", "res2.0.conv3.weight"),
    ("layer4.2.bn3.bias", "res5.2.conv3.norm.bias"),
    ("layer2.0.downsample.0.weight", "res3.0.shortcut.weight"),
    ("layer3.0.downsample.1.running_mean", "res4.0.shortcut.norm.running_mean"),
    ("layer3.22.bn2.weight", "res4.22.conv2.norm.weight"),
])
def test_spec_rules(source, target):
    assert torchvision_to_detectron2_name(source) == target
    assert detectron2_to_torchvision_name(target) == source


@pytest.mark.parametrize("name", ["fc.weight", "bn1.num_batches_tracked", "layer1.0.se.fc1.weight", "conv1.bias"])
def test_keys_outside_the_mapping(name):
    assert torchvision_to_detectron2_name(name) is None


@pytest.mark.parametrize("arch", list(TRUNK_TENSORS))
def test_mapping_is_total_and_invertible(arch):
    keys = expected_trunk_keys(arch)
    mapping = torchvision_to_detectron2_names(dict.fromkeys(keys), arch)
    weights = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert len(mapping) == len(weights) == TRUNK_TENSORS[arch]
    assert len(set(mapping.values())) == len(mapping)
    assert all(detectron2_to_torchvision_name(d2) == tv for tv, d2 in mapping.items())


def test_incomplete_or_foreign_dicts_are_refused():
    keys = expected_trunk_keys("resnet18")
    with pytest.raises(ValueError, match="missing"):
        torchvision_to_detectron2_names(dict.fromkeys(keys[1:]), "resnet18")
    with pytest.raises(ValueError, match="not part of"):
        torchvision_to_detectron2_names(dict.fromkeys([*keys, "layer1.0.se.fc1.weight"]), "resnet18")
    mapping = torchvision_to_detectron2_names(dict.fromkeys([*keys, "fc.weight", "fc.bias"]), "resnet18")
    assert "fc.weight" not in mapping
