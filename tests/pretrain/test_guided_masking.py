"""The masking step of a method: which branch is masked, the key stays clean, saliency is reused."""

from __future__ import annotations

import pytest
import torch

from pretrain.augment import TwoViewBatch
from pretrain.config import load_config
from pretrain.filters import highpass
from pretrain.guided_masking import GuidedMasking
from tests.pretrain.engine_helpers import TOY_CONFIGS

CONFIG = {p.stem: p for p in TOY_CONFIGS}


def _batch(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    return TwoViewBatch(query=torch.randn(n, 3, size, size, generator=g), key=torch.randn(n, 3, size, size, generator=g),
                        query_box=box, key_box=box, query_flip=torch.zeros(n, dtype=torch.bool),
                        key_flip=torch.zeros(n, dtype=torch.bool), labels=torch.zeros(n, dtype=torch.long),
                        index=torch.arange(n))


class _KeyEncoder:
    """Records what the method's key branch was asked to encode."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, need_activation):
        self.calls.append((images.clone(), need_activation))
        return "key-embedding", (images[:, 0, ::16, ::16] if need_activation else None)


def _masking(name, *overrides, activation=None):
    cfg = load_config(CONFIG[name], ["data.root=/x", *overrides])
    calls = []

    def extra_forward(images):
        calls.append(images.shape[0])
        return images[:, 1, ::16, ::16]

    return GuidedMasking(cfg, activation or extra_forward, torch.device("cpu")), calls


@pytest.mark.parametrize("name", ["mocov2_hp", "mocov2_blur", "mocov2_mean"])
def test_query_branch_masks_only_the_query_and_reuses_the_key_forward(name):
    masking, extra_calls = _masking(name)
    batch, encoder = _batch(), _KeyEncoder()
    prepared = masking.prepare(batch, encoder, torch.Generator().manual_seed(0))
    filtered_key = masking.input_filter(batch.key)
    assert len(encoder.calls) == 1 and encoder.calls[0][1] is True  # the saliency came with the key forward
    assert extra_calls == []
    assert torch.equal(encoder.calls[0][0], filtered_key) and torch.equal(prepared.key, filtered_key)  # key untouched
    assert prepared.query_masked is not None and prepared.query_masked.pixels.any()
    changed = prepared.query != masking.input_filter(batch.query)
    assert not (changed & ~prepared.query_masked.pixels).any()  # nothing outside the mask moved
    negatives = prepared.negatives_masked
    assert prepared.negatives.shape == batch.key.shape  # one hard negative per sample
    fg = prepared.key_maps.foreground
    grid_cells = negatives.cells.any(1)  # (B, G, G) cells masked in any channel
    assert not (grid_cells & ~fg).any()  # hard negatives touch FG cells only
    metrics = prepared.metrics()
    assert 0 < metrics["masked_fraction"] < 0.5 and 0 < metrics["fg_ratio"] <= 1


def test_hp_filters_both_branches_with_the_recorded_filter():
    masking, _ = _masking("mocov2_hp")
    spec = masking.input_filter_spec
    assert spec == {"name": "highpass", "kernel_size": 5, "sigma": 1.5}
    batch = _batch()
    assert torch.allclose(masking.input_filter(batch.key), highpass(batch.key, 5, 1.5))
    assert masking.meta()["input_filter"] == spec
    plain, _ = _masking("mocov2_blur")
    assert plain.input_filter_spec == {"name": "none"} and torch.equal(plain.input_filter(batch.key), batch.key)


@pytest.mark.parametrize("branch", ["key", "both"])
def test_key_branch_needs_a_saliency_pass_then_encodes_the_masked_key(branch):
    masking, extra_calls = _masking("mocov2_mean", f"masking.branch={branch}")
    batch, encoder = _batch(), _KeyEncoder()
    prepared = masking.prepare(batch, encoder, torch.Generator().manual_seed(1))
    assert extra_calls == [4]  # saliency of the unmasked key by the key encoder, no grad
    assert len(encoder.calls) == 1 and encoder.calls[0][1] is False
    assert torch.equal(encoder.calls[0][0], prepared.key_masked.images)
    assert prepared.key_masked.pixels.any()
    if branch == "key":
        assert prepared.query_masked is None and torch.equal(prepared.query, batch.query)
    else:
        assert prepared.query_masked.pixels.any()
    assert masking.meta()["mask_branch"] == branch


def test_no_masking_only_encodes_the_key():
    masking, _ = _masking("mocov2")
    batch, encoder = _batch(), _KeyEncoder()
    prepared = masking.prepare(batch, encoder)
    assert prepared.negatives is None and torch.equal(prepared.query, batch.query)
    assert masking.meta() == {"masking": "none", "strategy": None, "mask_branch": None, "saliency_source": None,
                              "input_filter": {"name": "none"}}


def test_uniform_source_and_no_hard_negatives():
    masking, extra_calls = _masking("mocov2_hp", "saliency.source=none", "masking.num_hard_negatives=0")
    prepared = masking.prepare(_batch(), _KeyEncoder(), torch.Generator().manual_seed(2))
    assert prepared.negatives is None and prepared.key_maps.foreground.all() and extra_calls == []
    assert masking.meta()["saliency_source"] == "none"


def test_same_generator_state_gives_the_same_masks():
    masking, _ = _masking("mocov2_hp")
    batch = _batch()
    a = masking.prepare(batch, _KeyEncoder(), torch.Generator().manual_seed(5))
    b = masking.prepare(batch, _KeyEncoder(), torch.Generator().manual_seed(5))
    assert torch.equal(a.query, b.query) and torch.equal(a.negatives, b.negatives)
