"""MoCo v2 internals: shuffle-BN keeps keys aligned with queries, the queue ring, the momentum update."""

from __future__ import annotations

import torch

from pretrain import distributed
from pretrain.config import load_config
from pretrain.methods.mocov2 import MoCoV2
from tests.pretrain.engine_helpers import TOY_CONFIGS

CONFIG = {p.stem: p for p in TOY_CONFIGS}


def _moco(*overrides):
    cfg = load_config(CONFIG["mocov2"], ["data.root=/x", "mocov2.queue_size=10", "mocov2.bn_splits=2",
                                         "data.batch_size=4", *overrides])
    return MoCoV2(cfg, distributed.World(), num_classes=3)


def test_shuffled_key_forward_returns_keys_in_sample_order():
    torch.manual_seed(0)
    moco = _moco().eval()  # eval: BN uses running statistics, so a key depends on its own image only
    images = torch.randn(4, 3, 32, 32)
    keys, activation = moco._encode_keys(images, need_activation=True)
    direct, direct_activation = moco.encoder_k(images, with_activation=True)
    assert torch.allclose(keys, direct, atol=1e-5) and torch.allclose(activation, direct_activation, atol=1e-4)
    shuffled, inverse = distributed.shuffle_across_processes(torch.arange(8.0)[:, None],
                                                            torch.Generator().manual_seed(3))
    assert not torch.equal(shuffled[:, 0], torch.arange(8.0))
    assert torch.equal(distributed.unshuffle_across_processes(shuffled, inverse)[:, 0], torch.arange(8.0))


def test_queue_is_a_ring_buffer():
    moco = _moco()
    keys = torch.arange(12.0)[:, None].expand(12, moco.queue.shape[1])
    moco._enqueue(keys[:4])
    moco._enqueue(keys[4:8])
    moco._enqueue(keys[8:12])  # wraps around a queue of 10
    assert int(moco.queue_ptr) == 2
    assert moco.queue[:, 0].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_momentum_update_moves_the_key_encoder_towards_the_query_encoder():
    moco = _moco("mocov2.momentum=0.75")
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    moco._momentum_update()
    for q, k0, k in zip(moco.encoder_q.parameters(), before_k, moco.encoder_k.parameters()):
        assert torch.allclose(k, 0.75 * k0 + 0.25 * q)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


def test_single_process_uses_split_batch_norm_and_says_so():
    moco = _moco()
    assert moco.shuffle_bn == "split" and moco.meta()["shuffle_bn"] == "split"
    assert "split batch-norm over 2 sub-batches" in moco.describe()[0]


def test_released_code_flag_reaches_thresholding_and_the_loss(monkeypatch):
    """compat.released_code: SPEC 1.1 (row-sorted threshold) in the saliency guide, SPEC 1.2 in the loss."""
    import pretrain.methods.mocov2 as module
    from pretrain.augment import TwoViewBatch

    cfg_overrides = ["masking.name=saliency", "masking.strategy=mean", "compat.released_code=true"]
    moco = _moco(*cfg_overrides)
    assert moco.masking.guide.released_code is True and moco.meta()["released_code"] is True
    seen = {}
    original = module.moco_logits

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "moco_logits", spy)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    no_flip = torch.zeros(4, dtype=torch.bool)
    batch = TwoViewBatch(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), box, box, no_flip, no_flip,
                         torch.zeros(4, dtype=torch.long), torch.arange(4))
    moco(batch)
    assert seen["sample0_negative"] is True and seen["hard_negatives"].shape[0] == 4
    assert _moco().masking.enabled is False and _moco().meta()["released_code"] is False


def test_empty_queue_start_uses_only_real_keys_as_negatives(monkeypatch):
    import pretrain.methods.mocov2 as module
    from pretrain.augment import TwoViewBatch

    moco = _moco("mocov2.queue_init=empty")
    assert int(moco.queue_filled) == 0 and int(_moco().queue_filled) == 10
    widths = []
    original = module.moco_logits

    def spy(q, k, queue, *args, **kwargs):
        widths.append(queue.shape[0])
        return original(q, k, queue, *args, **kwargs)

    monkeypatch.setattr(module, "moco_logits", spy)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    no_flip = torch.zeros(4, dtype=torch.bool)
    batch = TwoViewBatch(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), box, box, no_flip, no_flip,
                         torch.zeros(4, dtype=torch.long), torch.arange(4))
    for _ in range(4):
        moco(batch)
    assert widths == [0, 4, 8, 10]  # the queue grows by one batch per step up to its size
