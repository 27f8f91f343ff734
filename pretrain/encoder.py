"""A ResNet trunk with a projection head: the encoder every contrastive method trains.

Besides the projected embedding the encoder can return an activation map (channel sum of a stage's
features, (B, h, w)): by default layer4's, the last conv map SCDA uses; ``saliency_layer="layer3"``
takes the stage before it (twice as fine), for small images where layer4 is only 2x2. That is what saliency
is computed from, so the momentum source gets the key view's saliency from the forward pass the method
does anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import FEATURE_DIMS, build_resnet


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> nn.Sequential:
    """MoCo v2's 2-layer MLP (Linear-ReLU-Linear); with ``batch_norm`` SimCLR's Linear-BN-ReLU-Linear."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


# Stages whose channel-summed map can define saliency (saliency.feature_layer).
SALIENCY_LAYERS = ("layer4", "layer3")


def trunk_features(trunk: nn.Module, x: torch.Tensor, until: str = "layer4") -> torch.Tensor:
    """A torchvision ResNet up to ``until`` (``layer4`` or ``layer3``), (B, C, h, w)."""
    if until not in SALIENCY_LAYERS:
        raise ValueError(f"unknown feature layer '{until}', expected one of {SALIENCY_LAYERS}")
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    x = trunk.layer3(trunk.layer2(trunk.layer1(x)))
    return x if until == "layer3" else trunk.layer4(x)


class Encoder(nn.Module):
    """``trunk`` (torchvision ResNet, fc = Identity) followed by ``head``."""

    def __init__(self, arch: str, head_hidden_dim: int | None, head_out_dim: int, head_bn: bool = False,
                 zero_init_residual: bool = False, saliency_layer: str = "layer4"):
        super().__init__()
        self.saliency_layer = saliency_layer  # checked by trunk_features (configs: pretrain.config.validate)
        self.trunk = build_resnet(arch, zero_init_residual=zero_init_residual)
        feature_dim = FEATURE_DIMS[arch]
        self.head = projection_head(feature_dim, head_hidden_dim or feature_dim, head_out_dim, head_bn)

    def forward(self, x: torch.Tensor, with_activation: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized embedding; with ``with_activation`` also the detached (B, h, w) activation map of
        ``saliency_layer``."""
        stage3 = trunk_features(self.trunk, x, until="layer3")
        features = self.trunk.layer4(stage3)
        embedding = F.normalize(self.head(torch.flatten(self.trunk.avgpool(features), 1)), dim=1)
        if with_activation:
            mapped = stage3 if self.saliency_layer == "layer3" else features
            return embedding, mapped.detach().float().sum(1)
        return embedding

    @torch.no_grad()
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w) activation map of ``saliency_layer`` only (no head, no gradient)."""
        return trunk_features(self.trunk, x, until=self.saliency_layer).float().sum(1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features (the representation transfer tasks use)."""
        return self.trunk(x)


@contextlib.contextmanager
def batch_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Forward in training mode (batch statistics) without updating the BN running statistics.

    Used for the extra, side-effect-free passes (saliency of a view, SimCLR's hard negatives), so they
    leave the exported running statistics as plain training would.
    """
    saved = []
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            saved.append((layer, layer.momentum, layer.num_batches_tracked.clone() if layer.num_batches_tracked
                          is not None else None))
            layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum, tracked in saved:
            layer.momentum = momentum
            if tracked is not None:
                layer.num_batches_tracked.copy_(tracked)
