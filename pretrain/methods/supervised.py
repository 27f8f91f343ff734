"""Supervised baseline: cross-entropy training of the same ResNet on the pretraining set's labels.

The "Supervised" row of the paper's tables: the torchvision-style recipe (SGD with momentum, weight
decay, cosine schedule, RandomResizedCrop + horizontal flip, one view per image and step) on
ImageNet-100, saved in the suite's checkpoint format (``method: supervised``, the trunk without the
classifier), so the converter and every transfer runner take it like the self-supervised models.

The loader produces two crops per image for every method; this one trains on the first (the query
crop) and ignores the second. Its configs switch off aug+'s photometric jitter, grey and blur
(``augment.*_p: 0``) and use crop scale 0.08-1, i.e. torchvision's training transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import distributed
from pretrain.augment import TwoViewBatch
from pretrain.backbones import FEATURE_DIMS, build_resnet
from pretrain.methods.base import Method
from pretrain.stepping import StepOutput


@dataclass
class SupervisedConfig:
    label_smoothing: float = 0.0  # torchvision's classic recipe: none
    sync_bn: bool = False  # SyncBatchNorm across CUDA processes (torchvision's recipe: off)


class Supervised(Method):
    name = "supervised"
    Config = SupervisedConfig
    uses_labels = True

    def __init__(self, cfg: Any, world: distributed.World, num_classes: int):
        super().__init__(cfg, world, num_classes)
        if cfg.masking.name != "none":
            raise ValueError(f"the supervised baseline does not mask: masking.name must be 'none', got "
                             f"'{cfg.masking.name}'")
        if num_classes < 2:
            raise ValueError(f"supervised training needs at least 2 classes, found {num_classes}")
        self.label_smoothing = float(self.options.label_smoothing)
        self.trunk = build_resnet(self.arch, zero_init_residual=bool(cfg.model.zero_init_residual))
        self.classifier = nn.Linear(FEATURE_DIMS[self.arch], num_classes)
        self.sync_bn = bool(self.options.sync_bn) and world.distributed and world.device.type == "cuda"
        if self.sync_bn:
            self.trunk = nn.SyncBatchNorm.convert_sync_batchnorm(self.trunk)

    def backbone(self) -> nn.Module:
        return self.trunk

    def forward(self, batch: TwoViewBatch, phase: str = "main") -> StepOutput:
        with self.timer("query_forward"):
            logits = self.classifier(self.trunk(self.input_filter(batch.query)))
        with self.timer("loss"):
            loss = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == batch.labels).float().mean() * 100.0
        return StepOutput(loss, {"train_top1": accuracy})

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "num_classes": self.num_classes, "sync_bn": self.sync_bn}

    def describe(self) -> list[str]:
        return [f"supervised cross-entropy over {self.num_classes} classes (one view per image, "
                f"label smoothing {self.label_smoothing})"]

    @torch.no_grad()
    def pictures(self, batch: TwoViewBatch, generator: torch.Generator) -> dict[str, Any]:
        return {"training view": self.input_filter(batch.query)}
