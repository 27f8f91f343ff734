"""MoCo v2 internals: shuffle-BN keeps keys aligned with queries, the queue ring, the momentum update."""

from __future__ import annotations

import pytest
import torch

from pretrain import distributed
from pretrain.config import load_config
from pretrain.methods.mocov2 import MoCoV2
from tests.pretrain.engine_helpers import TOY_CONFIGS

CONFIG = {p.stem: p for p in TOY_CONFIGS}


def _moco(*overrides):
    # a queue of 10 and no in-batch negatives (MoCo v2 as published) unless a test says otherwise
    cfg = load_config(CONFIG["mocov2"], ["data.root=/x", "mocov2.queue_size=10", "mocov2.bn_splits=2",
                                         "mocov2.batch_negatives=false", "data.batch_size=4", *overrides])
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


def _batch_of(index):
    from pretrain.augment import TwoViewBatch

    n = len(index)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    no_flip = torch.zeros(n, dtype=torch.bool)
    return TwoViewBatch(torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32), box, box, no_flip, no_flip,
                        torch.zeros(n, dtype=torch.long), torch.tensor(index))


def test_exclude_own_keys_drops_older_keys_of_the_same_image_from_the_negatives(monkeypatch):
    import pretrain.methods.mocov2 as module

    seen = []
    original = module.moco_logits

    def spy(*args, **kwargs):
        seen.append(kwargs.get("not_negative"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "moco_logits", spy)
    moco = _moco("mocov2.exclude_own_keys=true", "mocov2.queue_init=empty")
    moco(_batch_of([0, 1, 2, 3]))
    out = moco(_batch_of([3, 7, 1, 9]))  # images 3 and 1 have a key from the first step in the queue
    assert moco.queue_index[:8].tolist() == [0, 1, 2, 3, 3, 7, 1, 9]
    own = seen[-1]
    assert own.shape == (4, 4)
    assert own.tolist() == [[False, False, False, True], [False] * 4, [False, True, False, False], [False] * 4]
    assert out.metrics["own_keys_in_queue"] == 50.0
    # off (MoCo v2 as published): every queue entry is a negative
    plain = _moco("mocov2.queue_init=empty", "mocov2.exclude_own_keys=false")
    plain(_batch_of([0, 1, 2, 3]))
    plain(_batch_of([3, 7, 1, 9]))
    assert seen[-1] is None and "own_keys_in_queue" not in plain(_batch_of([0, 1, 2, 3])).metrics


def test_a_queue_spanning_most_of_the_dataset_is_reported():
    moco = _moco("mocov2.queue_size=1024", "mocov2.exclude_own_keys=false")
    moco.attach_dataset([f"{i}.jpg" for i in range(1152)], build=True)
    assert abs(moco.own_key_share() - (1024 / 1152) ** 2 / 2) < 1e-9
    notes = [line for line in moco.describe() if line.startswith("note: the queue")]
    assert len(notes) == 1 and "40%" in notes[0] and "mocov2.exclude_own_keys=true" in notes[0]
    big = _moco("mocov2.queue_size=1024", "mocov2.exclude_own_keys=false")
    big.attach_dataset([f"{i}.jpg" for i in range(126_689)], build=True)  # ImageNet-100: negligible
    assert big.own_key_share() < 0.001 and not any(line.startswith("note: the queue") for line in big.describe())
    excluding = _moco("mocov2.queue_size=1024", "mocov2.exclude_own_keys=true")
    excluding.attach_dataset([f"{i}.jpg" for i in range(1152)], build=True)
    assert any("exclude_own_keys" in line for line in excluding.describe())
    assert not any(line.startswith("note: the queue") for line in excluding.describe())


def test_batch_negatives_add_the_other_current_keys_but_never_the_positive(monkeypatch):
    import pretrain.methods.mocov2 as module

    seen = []
    original = module.moco_logits

    def spy(q, k, queue, *args, **kwargs):
        seen.append((queue, kwargs.get("not_negative")))
        return original(q, k, queue, *args, **kwargs)

    monkeypatch.setattr(module, "moco_logits", spy)
    moco = _moco("mocov2.batch_negatives=true", "mocov2.exclude_own_keys=false", "mocov2.queue_init=empty")
    moco(_batch_of([0, 1, 2, 3]))
    queue, own = seen[-1]
    assert queue.shape[0] == 4 and own.tolist() == [[i == j for j in range(4)] for i in range(4)]
    moco(_batch_of([5, 6, 0, 8]))
    queue, own = seen[-1]
    assert queue.shape[0] == 8  # 4 queued keys + the 4 current ones
    assert own[:, 4:].tolist() == [[i == j for j in range(4)] for i in range(4)]  # the positive itself
    assert own[2, :4].tolist() == [True, False, False, False]  # image 0's older key also leaves
    # the toy configs take their negatives from the current batch only; MoCo v2's paper configs keep the queue
    toy_cfg = load_config(CONFIG["mocov2"], ["data.root=/x"])
    toy = toy_cfg.mocov2
    assert toy.queue_size == 0 and toy.batch_negatives is True
    paper_cfg = load_config(CONFIG["mocov2"].parents[1] / "paper" / "mocov2.yaml", ["data.root=/x"])
    paper = paper_cfg.mocov2
    assert paper.queue_size == 65536 and paper.batch_negatives is False and paper.exclude_own_keys is False
    # toy crops keep half the image; the paper keeps aug+'s 20%
    assert list(toy_cfg.augment.crop_scale) == [0.5, 1.0] and list(paper_cfg.augment.crop_scale) == [0.2, 1.0]


def test_without_a_queue_the_negatives_are_the_other_keys_of_the_current_batch(monkeypatch):
    import pretrain.methods.mocov2 as module

    seen = []
    original = module.moco_logits

    def spy(q, k, queue, *args, **kwargs):
        seen.append((queue.clone(), k.clone(), kwargs.get("not_negative")))
        return original(q, k, queue, *args, **kwargs)

    monkeypatch.setattr(module, "moco_logits", spy)
    moco = _moco("mocov2.queue_size=0", "mocov2.batch_negatives=true")
    assert moco.queue.shape[0] == 0
    assert any("current batch's keys only" in line for line in moco.describe())
    for index in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]):
        out = moco(_batch_of(index))
        queue, keys, own = seen[-1]
        assert torch.equal(queue, keys)  # nothing from earlier steps, only this step's keys
        assert own.tolist() == [[i == j for j in range(4)] for i in range(4)]  # never the positive itself
        assert torch.isfinite(out.loss) and out.loss > 0
    assert moco.queue.shape[0] == 0 and int(moco.queue_filled) == 0


def test_no_queue_needs_batch_negatives():
    with pytest.raises(ValueError, match="queue_size.*batch_negatives=true"):
        _moco("mocov2.queue_size=0")
    with pytest.raises(ValueError, match="queue_size"):
        _moco("mocov2.queue_size=-4", "mocov2.batch_negatives=true")


def test_symmetric_loss_is_the_mean_of_both_directions_and_enqueues_both_key_sets():
    from pretrain.methods.mocov2 import swap_views

    torch.manual_seed(0)
    batch = _batch_of([0, 1, 2, 3])
    swapped = swap_views(batch)
    assert torch.equal(swapped.query, batch.key) and torch.equal(swapped.key_box, batch.query_box)
    assert torch.equal(swap_views(swapped).query, batch.query)
    # plain BN (no shuffle) and no masking: a direction's loss depends on the weights, the queue and the views only
    symmetric = _moco("mocov2.symmetric=true", "mocov2.shuffle_bn=none")
    plain = _moco("mocov2.shuffle_bn=none")
    plain.load_state_dict(symmetric.state_dict())
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    forward = plain(batch).loss
    plain.load_state_dict(start)  # the same queue for the other direction, as in the symmetric step
    backward = plain(swapped).loss
    out = symmetric(batch)
    assert torch.allclose(out.loss, (forward + backward) / 2, atol=1e-5)
    assert int(symmetric.queue_ptr) == 8 and int(plain.queue_ptr) == 4  # both directions' keys are enqueued
    assert any("symmetric loss" in line for line in symmetric.describe())
    assert not any("symmetric loss" in line for line in plain.describe())


def test_default_split_bn_refuses_a_batch_it_cannot_split_by_naming_the_keys():
    # shuffle_bn=auto on one process is split batch-norm: 4 images do not split into 8 sub-batches
    with pytest.raises(ValueError, match="mocov2.bn_splits.*change data.batch_size or mocov2.bn_splits"):
        _moco("mocov2.bn_splits=8", "mocov2.shuffle_bn=auto")
