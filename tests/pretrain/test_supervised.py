"""Supervised baseline: cross-entropy on the labels, one view, a checkpoint the converter reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain import distributed
from pretrain.augment import to_device_batch
from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_config
from pretrain.engine import Trainer, train
from tests.pretrain.engine_helpers import REPO, tiny_overrides

TOY = REPO / "configs" / "pretrain" / "toy" / "supervised.yaml"
PAPER = REPO / "configs" / "pretrain" / "paper" / "supervised.yaml"


@pytest.fixture(scope="module")
def toy_root(toy_world):
    return toy_world / "imagenet100"


def test_paper_config_is_the_torchvision_style_recipe():
    cfg = load_config(PAPER, ["data.root=/x"])
    assert (cfg.method, cfg.model.arch, cfg.augment.image_size, cfg.data.batch_size) == ("supervised", "resnet50", 224, 256)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert cfg.schedule.name == "cosine" and list(cfg.augment.crop_scale) == [0.08, 1.0]
    assert (cfg.augment.color_jitter_p, cfg.augment.grayscale_p, cfg.augment.blur_p, cfg.augment.flip_p) == (
        0.0, 0.0, 0.0, 0.5)  # RandomResizedCrop + flip only
    assert cfg.masking.name == "none"


def test_training_writes_a_checkpoint_the_converter_reads(toy_root, tmp_path):
    from transfer.checkpoints import load_backbone

    final = train(load_config(TOY, tiny_overrides(toy_root, tmp_path / "run", "supervised")))
    meta = load_checkpoint(final)["meta"]
    assert (meta["method"], meta["masking"], meta["strategy"], meta["finished"]) == ("supervised", "none", None, True)
    assert meta["input_filter"] == {"name": "none"} and meta["num_classes"] == 8
    backbone = load_backbone(final)
    assert backbone.arch == "resnet18" and backbone.meta["method"] == "supervised"
    assert not any(k.startswith(("classifier", "fc.")) for k in backbone.state_dict)  # the trunk only
    saved = load_checkpoint(final)["backbone"]
    assert all(torch.equal(saved[k], v) for k, v in backbone.state_dict.items())
    trunk = backbone.build_module().eval()
    assert trunk(torch.zeros(1, 3, 32, 32)).shape == (1, 512)


def test_loss_is_cross_entropy_on_the_labels_of_the_first_view(toy_root, tmp_path):
    trainer = Trainer(load_config(TOY, tiny_overrides(toy_root, tmp_path, "supervised", **{"data.batch_size": 16})),
                      distributed.World())
    trainer._build_data()
    trainer._build_method()
    trainer._wrap()
    method = trainer.method
    assert method.uses_labels
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    method.eval()  # BN in eval mode: the direct formula below sees the same statistics
    with torch.no_grad():
        output = method(batch)
        expected = F.cross_entropy(method.classifier(method.trunk(batch.query)), batch.labels)
        batch.key = torch.zeros_like(batch.key)  # the second view is not used
        assert float(method(batch).loss) == pytest.approx(float(output.loss), rel=1e-6)
        batch.labels = (batch.labels + 1) % 8
        shifted = float(method(batch).loss)
    assert float(output.loss) == pytest.approx(float(expected), rel=1e-6)
    assert shifted != pytest.approx(float(output.loss), rel=1e-3)
    method.train()
    batch.labels = (batch.labels - 1) % 8
    losses = []
    for _ in range(6):  # fitting one batch: the labels are learnable, the loss falls
        trainer.runner.set_learning_rates()
        trainer.runner.global_step = 10  # past the warm-up
        losses.append(float(method.train_step(trainer.runner, batch)["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses


def test_masking_is_refused(toy_root, tmp_path):
    cfg = load_config(TOY, tiny_overrides(toy_root, tmp_path, "supervised", **{"masking.name": "saliency",
                                                                                "masking.strategy": "mean"}))
    trainer = Trainer(cfg, distributed.World())
    trainer._build_data()
    with pytest.raises(ValueError, match="does not mask"):
        trainer._build_method()
