"""A checkpoint's ResNet trunk, frozen, behind the input filter it was pretrained with.

Both linear evaluations see a backbone only through :class:`FrozenEncoder`: eval mode (BatchNorm uses its
running statistics and never updates them), no gradients, the checkpoint's input filter (e.g. high-pass)
applied to the normalized batch, output = the global-average-pooled last stage (2048-d for R50, 512-d
for R18/34). :meth:`FrozenEncoder.assert_unchanged` is the MoCo linear protocol's sanity check that the
backbone did not change while the classifier trained.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.backbones import FEATURE_DIMS
from pretrain.filters import InputFilter
from transfer.checkpoints import Backbone


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics differ from the checkpoint after training."""


class FrozenEncoder(nn.Module):
    def __init__(self, backbone: Backbone, device: torch.device | str = "cpu"):
        super().__init__()
        self.arch = backbone.arch
        self.feature_dim = FEATURE_DIMS[backbone.arch]
        self.input_filter = InputFilter(backbone.input_filter)
        self.trunk = backbone.build_module()
        self.trunk.requires_grad_(False)
        self._reference = {k: v.detach().clone() for k, v in backbone.state_dict.items()}
        self.to(device)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen for good: a caller's model.train() must not switch BatchNorm to batch statistics.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.input_filter(images))

    def assert_unchanged(self) -> int:
        """Raise :class:`BackboneChangedError` unless every trunk tensor equals the checkpoint's; return the count."""
        current = self.trunk.state_dict()
        changed = [k for k, ref in self._reference.items() if not torch.equal(current[k].detach().cpu(), ref)]
        if changed:
            raise BackboneChangedError(f"the frozen backbone changed during linear evaluation: {len(changed)} tensors "
                                       f"differ from the checkpoint, e.g. {changed[:3]}")
        if any(p.requires_grad for p in self.trunk.parameters()):
            raise BackboneChangedError("backbone parameters have requires_grad=True; the probe must train fc only")
        return len(self._reference)
