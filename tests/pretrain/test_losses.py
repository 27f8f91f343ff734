"""The contrastive objectives against formulas written out sample by sample."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import contrastive_accuracy, contrastive_loss, moco_logits, nt_xent_logits


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("per_sample", [0, 1, 3])
def test_moco_logits_match_direct_formula(per_sample):
    batch, dim, queue_size, temperature, alpha = 5, 8, 11, 0.2, 2.0
    q, k, queue = _unit(batch, dim, seed=1), _unit(batch, dim, seed=2), _unit(queue_size, dim, seed=3)
    hard = _unit(batch * per_sample, dim, seed=4) if per_sample else None
    logits, labels = moco_logits(q, k, queue, temperature, hard_negatives=hard, alpha=alpha)
    assert logits.shape == (batch, 1 + queue_size + per_sample)
    assert labels.tolist() == [0] * batch
    for b in range(batch):
        expected = [float(q[b] @ k[b])] + [float(q[b] @ queue[j]) for j in range(queue_size)]
        expected += [alpha * float(q[b] @ hard[b * per_sample + n]) for n in range(per_sample)]
        assert torch.allclose(logits[b], torch.tensor(expected, dtype=torch.float64) / temperature)
    direct = sum(-math.log(math.exp(logits[b, 0].item()) / logits[b].exp().sum().item()) for b in range(batch)) / batch
    assert contrastive_loss(logits, labels).item() == pytest.approx(direct, rel=1e-5)


def test_released_code_uses_sample_zero_negative_for_every_query():
    batch, dim = 4, 6
    q, k, queue, hard = _unit(batch, dim, seed=1), _unit(batch, dim, seed=2), _unit(7, dim, seed=3), _unit(batch, dim, seed=4)
    paper, _ = moco_logits(q, k, queue, 0.2, hard_negatives=hard, alpha=2.0)
    released, _ = moco_logits(q, k, queue, 0.2, hard_negatives=hard, alpha=2.0, sample0_negative=True)
    assert torch.equal(paper[:, :-1], released[:, :-1])  # positives and queue untouched
    for b in range(batch):
        assert released[b, -1].item() == pytest.approx(2.0 * float(q[b] @ hard[0]) / 0.2)
        assert paper[b, -1].item() == pytest.approx(2.0 * float(q[b] @ hard[b]) / 0.2)


def test_hard_negatives_must_split_over_the_batch():
    q = _unit(4, 3)
    with pytest.raises(ValueError, match="split evenly"):
        moco_logits(q, q, _unit(5, 3), 0.2, hard_negatives=_unit(6, 3))


def _nt_xent_direct(zq, zk, temperature, hard=None, alpha=1.0):
    """NT-Xent written per anchor: positive = the other view, negatives = every other view."""
    views = torch.cat([zq, zk])
    n = zq.shape[0]
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        logits = [float(views[i] @ views[j]) / temperature for j in range(2 * n) if j != i]
        index_of_positive = positive if positive < i else positive - 1
        if hard is not None and i < n:
            per = hard.shape[0] // n
            logits += [alpha * float(views[i] @ hard[i * per + m]) / temperature for m in range(per)]
        logits = torch.tensor(logits, dtype=torch.float64)
        losses.append(-(logits[index_of_positive] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("with_hard", [False, True])
def test_nt_xent_matches_direct_formula(with_hard):
    zq, zk = _unit(6, 5, seed=1), _unit(6, 5, seed=2)
    hard = _unit(12, 5, seed=3) if with_hard else None
    logits, labels = nt_xent_logits(zq, zk, 0.5, hard_negatives=hard, alpha=2.0)
    assert contrastive_loss(logits, labels).item() == pytest.approx(
        _nt_xent_direct(zq, zk, 0.5, hard, 2.0).item(), rel=1e-6)


def test_nt_xent_split_over_processes_equals_global_batch():
    """Each process's anchors against the gathered global batch: the mean over processes is the loss of
    the whole batch on one process, and so are the gradients (what the all-gather with grad provides)."""
    zq, zk = _unit(8, 4, seed=5).requires_grad_(), _unit(8, 4, seed=6).requires_grad_()
    full = contrastive_loss(*nt_xent_logits(zq, zk, 0.3))
    full_grad = torch.autograd.grad(full, [zq, zk])
    parts = []
    for rank in range(2):
        rows = slice(rank * 4, rank * 4 + 4)
        parts.append(contrastive_loss(*nt_xent_logits(zq[rows], zk[rows], 0.3, all_query=zq, all_key=zk,
                                                      offset=rank * 4)))
    split = sum(parts) / 2
    assert split.item() == pytest.approx(full.item(), rel=1e-9)
    for a, b in zip(full_grad, torch.autograd.grad(split, [zq, zk])):
        assert torch.allclose(a, b)


def test_accuracy_counts_the_positive_winning():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert contrastive_accuracy(logits, torch.tensor([0, 0])).item() == 50.0


def test_moco_entries_marked_not_negative_drop_out_of_the_loss():
    batch, dim, queue_size, temperature = 4, 8, 6, 0.2
    q, k, queue = _unit(batch, dim, seed=1), _unit(batch, dim, seed=2), _unit(queue_size, dim, seed=3)
    not_negative = torch.zeros(batch, queue_size, dtype=torch.bool)
    not_negative[0, 2] = not_negative[3, [0, 5]] = True
    logits, labels = moco_logits(q, k, queue, temperature, not_negative=not_negative)
    loss = contrastive_loss(logits, labels)
    # the same loss as with each query's own queue lacking the marked entries
    direct = []
    for b in range(batch):
        kept = queue[~not_negative[b]]
        row, _ = moco_logits(q[b:b + 1], k[b:b + 1], kept, temperature)
        direct.append(contrastive_loss(row, labels[:1]))
    assert torch.isclose(loss, torch.stack(direct).mean())
    assert torch.isinf(logits[0, 1 + 2]) and torch.isfinite(logits[1]).all()
