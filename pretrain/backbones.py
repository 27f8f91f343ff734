"""torchvision ResNet trunks: the encoders every method trains and every transfer task reads."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
BLOCKS_PER_STAGE = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
BOTTLENECK_ARCHS = ("resnet50", "resnet101")


def check_arch(arch: str) -> str:
    if arch not in FEATURE_DIMS:
        raise ValueError(f"unknown backbone '{arch}': choose one of {', '.join(FEATURE_DIMS)}")
    return arch


def build_resnet(arch: str, zero_init_residual: bool = False) -> nn.Module:
    """A randomly initialised torchvision ResNet whose ``fc`` is an identity (output: pooled features)."""
    model = getattr(models, check_arch(arch))(weights=None, zero_init_residual=zero_init_residual)
    model.fc = nn.Identity()
    return model


def trunk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's parameters and BN buffers in torchvision names (no ``fc``), detached on the CPU."""
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith("fc.")
    }


def expected_trunk_keys(arch: str) -> list[str]:
    """Every key a complete torchvision trunk of ``arch`` has (excluding ``fc``)."""
    return list(trunk_state_dict(build_resnet(arch)).keys())


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Recognise a torchvision ResNet trunk from its keys and shapes; None if it is not one."""
    if "conv1.weight" not in state_dict:
        return None
    bottleneck = any(k.endswith(".conv3.weight") for k in state_dict if k.startswith("layer1."))
    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()})
        for stage in range(1, 5)
    )
    for arch, expected in BLOCKS_PER_STAGE.items():
        if expected == blocks and bottleneck == (arch in BOTTLENECK_ARCHS):
            return arch
    return None


def layer4_extractor(model: nn.Module) -> nn.Sequential:
    """The trunk of a torchvision ResNet up to ``layer4`` (no pooling): its last convolutional feature map,
    sharing the model's modules."""
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)
