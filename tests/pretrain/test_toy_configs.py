"""Every toy config builds its method and trains a step on the toy world (tiny batch and size)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain import distributed
from pretrain.augment import to_device_batch
from pretrain.config import load_config
from pretrain.engine import Trainer
from tests.pretrain.engine_helpers import TOY_CONFIGS, tiny_overrides


@pytest.mark.parametrize("path", TOY_CONFIGS, ids=lambda p: p.stem)
def test_toy_config_trains_a_step(path, toy_world, tmp_path):
    method = path.stem.split("_")[0]
    overrides = tiny_overrides(toy_world / "imagenet100", tmp_path, method, **{"augment.image_size": 64})
    cfg = load_config(path, overrides)
    trainer = Trainer(cfg, distributed.World())
    trainer._build_data()
    trainer._build_method()
    trainer._wrap()
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.method.backbone().parameters()][:3]
    trainer.runner.set_learning_rates()
    metrics = trainer.method.train_step(trainer.runner, batch)
    assert math.isfinite(float(metrics["loss"]))
    after = list(trainer.method.backbone().parameters())[:3]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the step changed the weights
    meta = trainer.method.meta()
    if cfg.masking.name == "none":
        assert meta["masking"] == "none" and "masked_fraction" not in metrics
    else:
        assert meta["strategy"] == cfg.masking.strategy and meta["mask_branch"] == cfg.masking.branch
        assert 0 < float(metrics["masked_fraction"]) < 0.6
    panels = trainer.method.pictures(batch, torch.Generator().manual_seed(0))
    assert ("training view" if cfg.method == "supervised" else "key view") in panels  # supervised: one view
