"""Contrastive objectives as pure functions: MoCo's InfoNCE and SimCLR's NT-Xent, with hard negatives.

Embeddings are L2-normalized (B, D) tensors. Hard negatives come sample-major: rows ``b*n .. b*n+n-1``
belong to sample ``b`` (``n`` per sample). They enter each query's logits with weight ``alpha``:
``logits = [q.k+, q.negatives, alpha * q.t] / T``, label = the positive (SPEC 1.2).

``sample0_negative=True`` reproduces the released code (SPEC 1.2, discrepancy 2): every query of a
process uses sample 0's hard negatives instead of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _hard_negative_logits(
    anchors: torch.Tensor, hard_negatives: torch.Tensor, alpha: float, sample0_negative: bool
) -> torch.Tensor:
    batch, dim = anchors.shape
    if hard_negatives.shape[0] % batch != 0:
        raise ValueError(
            f"{hard_negatives.shape[0]} hard negatives do not split evenly over a batch of {batch} queries"
        )
    per_sample = hard_negatives.view(batch, -1, dim)
    if sample0_negative:
        per_sample = per_sample[:1].expand(batch, -1, -1)
    return alpha * torch.einsum("bd,bnd->bn", anchors, per_sample)


def moco_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    hard_negatives: torch.Tensor | None = None,
    alpha: float = 1.0,
    sample0_negative: bool = False,
    not_negative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE logits (B, 1 + K [+ n]) and labels (all 0) for queries ``q``, keys ``k``, ``queue`` (K, D).

    ``not_negative`` (B, K) bool marks queue entries that must not count as a query's negatives (e.g. an
    older key of the same image); their logits are -inf, so they add nothing to the loss or its gradient.
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    queue_logits = q @ queue.t()
    if not_negative is not None:
        queue_logits = queue_logits.masked_fill(not_negative, float("-inf"))
    parts = [positive, queue_logits]
    if hard_negatives is not None and hard_negatives.numel():
        parts.append(_hard_negative_logits(q, hard_negatives, alpha, sample0_negative))
    logits = torch.cat(parts, dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return logits, labels


def nt_xent_logits(
    z_query: torch.Tensor,
    z_key: torch.Tensor,
    temperature: float,
    all_query: torch.Tensor | None = None,
    all_key: torch.Tensor | None = None,
    offset: int = 0,
    hard_negatives: torch.Tensor | None = None,
    alpha: float = 1.0,
    sample0_negative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent logits and labels for this process's 2B anchors against all 2N views of the global batch.

    ``all_query``/``all_key`` are the (N, D) embeddings of every process (this one's rows start at
    ``offset``); omitted on a single process. Each anchor's positive is its other view; every other view
    of the global batch is a negative; an anchor never sees itself. Hard negatives join the negatives of
    the query-role (masked) anchors only, weighted by ``alpha``; key-role anchors get -inf there.
    """
    all_query = z_query if all_query is None else all_query
    all_key = z_key if all_key is None else all_key
    batch, total = z_query.shape[0], all_query.shape[0]
    anchors = torch.cat([z_query, z_key])
    candidates = torch.cat([all_query, all_key])
    logits = anchors @ candidates.t()
    local = torch.arange(batch, device=anchors.device) + offset
    self_index = torch.cat([local, local + total])
    labels = torch.cat([local + total, local])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * total).bool(), float("-inf"))
    if hard_negatives is not None and hard_negatives.numel():
        hard = _hard_negative_logits(z_query, hard_negatives, alpha, sample0_negative)
        filler = torch.full_like(hard, float("-inf"))
        logits = torch.cat([logits, torch.cat([hard, filler])], dim=1)
    return logits / temperature, labels


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32 (logits may come from an autocast region)."""
    return F.cross_entropy(logits.float(), labels)


def contrastive_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 of the positive among all candidates, in percent."""
    return (logits.argmax(dim=1) == labels).float().mean() * 100.0
