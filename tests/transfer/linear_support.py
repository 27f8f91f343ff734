"""Helpers for the linear-evaluation tests: a quickly trained backbone and tiny protocol overrides."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TEST_SIZE = 32  # px: every protocol's crop in the tests (the toy configs use 64)

PROBE_OVERRIDES = [f"preprocess.crop_size={TEST_SIZE}", f"preprocess.resize_size={TEST_SIZE + 4}", "probe.epochs=3",
                   "probe.milestones=[1,2]", "probe.batch_size=32", "runtime.num_workers=0", "runtime.device=cpu"]
LOGREG_OVERRIDES = [f"preprocess.crop_size={TEST_SIZE}", f"preprocess.resize_size={TEST_SIZE}", "runtime.num_workers=0",
                    "runtime.device=cpu", "logreg.wd_count=12"]
CALTECH_OVERRIDES = [*LOGREG_OVERRIDES, "split.train_per_class=8"]  # the test world has 14 per class, 9 background


def overrides_for(dataset: str) -> list[str]:
    return {"imagenet100": PROBE_OVERRIDES, "caltech101": CALTECH_OVERRIDES, "flowers102": LOGREG_OVERRIDES}[dataset]


def train_toy_supervised(toy_root: Path, path: Path, epochs: int = 2, seed: int = 0) -> Path:
    """A ResNet-18 briefly trained with labels on the toy ImageNet-100 train split at 32 px, saved in the
    suite's format: trained (not random) weights and BN statistics, as a pretrained checkpoint has. Too
    short to beat random init reliably at 32 px; that comparison is the benchmark's job
    (``python -m transfer.linear_bench``, full toy world, 64 px)."""
    from pretrain.backbones import build_resnet, trunk_state_dict
    from pretrain.checkpoint import IMAGENET_NORMALIZE, make_meta, save_checkpoint
    from transfer.classification_data import ImageListDataset, read_imagenet_subset
    from transfer.eval_transforms import random_crop_transform
    from transfer.linear import torch_threads

    torch.manual_seed(seed)
    data = read_imagenet_subset(toy_root / "imagenet100")
    transform = random_crop_transform(TEST_SIZE, "bilinear", IMAGENET_NORMALIZE)
    transform.transforms[0].scale = (0.35, 1.0)
    loader = torch.utils.data.DataLoader(ImageListDataset(data.splits["train"], transform), batch_size=32,
                                         shuffle=True, drop_last=True)
    model, head = build_resnet("resnet18"), nn.Linear(512, len(data.classes))
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=epochs * len(loader))
    model.train()
    with torch_threads(1):  # as the toy configs: a busy 2-core machine is much faster with one thread
        for _ in range(epochs):
            for images, labels in loader:
                loss = nn.functional.cross_entropy(head(model(images)), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    save_checkpoint(path, trunk_state_dict(model), make_meta(arch="resnet18", method="supervised", image_size=TEST_SIZE,
                                                             seed=seed, epoch=epochs, epochs=epochs, finished=True))
    return path


def write_moco_layout(suite_checkpoint: Path, path: Path) -> Path:
    """The same trunk as a MoCo v2 release stores it: ``state_dict`` with ``module.encoder_q.`` (+ its MLP
    head), a momentum copy ``module.encoder_k.`` and the queue; no metadata."""
    from pretrain.checkpoint import load_checkpoint

    trunk = load_checkpoint(suite_checkpoint)["backbone"]
    state = {}
    for encoder in ("encoder_q", "encoder_k"):
        state.update({f"module.{encoder}.{k}": v.clone() for k, v in trunk.items()})
        state[f"module.{encoder}.fc.0.weight"] = torch.randn(512, 512)
        state[f"module.{encoder}.fc.2.weight"] = torch.randn(128, 512)
    state["module.queue"] = torch.randn(128, 64)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    return path
