"""Split batch-norm: MoCo's single-process substitute for shuffle-BN.

On several processes MoCo shuffles the key batch across processes so a key's BN statistics come from
other samples than its query's. On one process there is nobody to shuffle with, so each BN layer
normalizes ``num_splits`` interleaved sub-batches separately (sample ``i`` is in sub-batch
``i % num_splits``) and the key batch is shuffled before its forward pass: the query and the key of an
image are normalized with statistics of different sample sets, as with real shuffle-BN.

``SplitBatchNorm2d`` keeps BatchNorm2d's parameters and buffers (same state_dict keys), so the trunk is
still a plain torchvision ResNet for export; in eval mode it is an ordinary BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        splits = self.num_splits
        if n % splits:
            raise ValueError(f"split batch-norm needs a batch divisible by {splits} sub-batches, got {n}")
        mean_split = self.running_mean.repeat(splits)
        var_split = self.running_var.repeat(splits)
        momentum = 0.0 if self.momentum is None else self.momentum
        out = F.batch_norm(
            x.reshape(n // splits, c * splits, h, w), mean_split, var_split,
            self.weight.repeat(splits) if self.weight is not None else None,
            self.bias.repeat(splits) if self.bias is not None else None,
            True, momentum, self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(splits, c).mean(0))
            self.running_var.copy_(var_split.view(splits, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` in place by a SplitBatchNorm2d sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            split.to(child.weight.device if child.weight is not None else child.running_mean.device)
            setattr(module, name, split)
        else:
            convert_to_split_bn(child, num_splits)
    return module
