"""Split batch-norm (MoCo's single-process shuffle-BN substitute)."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.backbones import build_resnet, trunk_state_dict
from pretrain.encoder import batch_stats_frozen
from pretrain.split_bn import SplitBatchNorm2d, convert_to_split_bn


def test_each_interleaved_sub_batch_is_normalized_on_its_own():
    torch.manual_seed(0)
    split = SplitBatchNorm2d(3, num_splits=2).train()
    x = torch.randn(6, 3, 4, 4) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    out = split(x)
    plain = nn.BatchNorm2d(3).train()
    for part in (0, 1):
        assert torch.allclose(out[part::2], plain(x[part::2]), atol=1e-5)
    reference = [nn.BatchNorm2d(3).train() for _ in range(2)]
    for part, bn in enumerate(reference):
        bn(x[part::2])
    expected_mean = (reference[0].running_mean + reference[1].running_mean) / 2
    assert torch.allclose(split.running_mean, expected_mean, atol=1e-6)
    split.eval()
    assert torch.allclose(split(x), nn.functional.batch_norm(x, split.running_mean, split.running_var,
                                                             split.weight, split.bias, False, 0.0, split.eps))


def test_converted_trunk_keeps_torchvision_keys_and_weights():
    torch.manual_seed(1)
    trunk = build_resnet("resnet18")
    before = trunk_state_dict(trunk)
    convert_to_split_bn(trunk, 4)
    assert any(isinstance(m, SplitBatchNorm2d) for m in trunk.modules())
    after = trunk_state_dict(trunk)
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_batch_stats_leave_running_statistics_alone():
    bn = nn.BatchNorm2d(2).train()
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with batch_stats_frozen(bn):
        bn(torch.randn(4, 2, 3, 3) + 5)
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    assert bn.momentum == 0.1
