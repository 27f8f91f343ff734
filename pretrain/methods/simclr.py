"""SimCLR (Chen et al. 2020) with the paper's saliency-guided masking and hard negatives (SPEC 1.5).

One encoder with a projection head (Linear-BN-ReLU-Linear), NT-Xent over the 2N views of the global
batch: embeddings are gathered across processes *with* gradients, so every process contrasts against
every view of the global batch. With masking the (masked) query view and the key view are the pair;
hard negatives (FG-masked copies of the key view) are encoded by the same encoder without gradient
and join the negatives of the query-role anchors with weight ``alpha``. The saliency source
``momentum`` means the online encoder itself here (SimCLR has no momentum encoder). Batch-norm is
synchronized across processes on CUDA (``sync_bn``), the usual SimCLR practice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretrain import distributed
from pretrain.encoder import Encoder, batch_stats_frozen
from pretrain.guided_masking import GuidedMasking
from pretrain.losses import contrastive_accuracy, contrastive_loss, nt_xent_logits
from pretrain.methods.base import Method
from pretrain.stepping import StepOutput


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    head_hidden_dim: int | None = 2048
    head_out_dim: int = 128
    head_bn: bool = True
    sync_bn: bool = True  # SyncBatchNorm when several CUDA processes train together


class SimCLR(Method):
    name = "simclr"
    Config = SimCLRConfig

    def __init__(self, cfg: Any, world: distributed.World, num_classes: int):
        super().__init__(cfg, world, num_classes)
        opts = self.options
        self.temperature = float(opts.temperature)
        self.encoder = Encoder(self.arch, opts.head_hidden_dim, int(opts.head_out_dim), head_bn=bool(opts.head_bn),
                               zero_init_residual=bool(cfg.model.zero_init_residual),
                               saliency_layer=str(cfg.saliency.feature_layer))
        self.sync_bn = bool(opts.sync_bn) and world.distributed and world.device.type == "cuda"
        if self.sync_bn:
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
        self.masking = GuidedMasking(cfg, self._saliency_activation, world.device)
        self.input_filter = self.masking.input_filter
        self.mask_generator = self.make_generator("masking", int(cfg.seed) * 1000 + world.rank + 1)

    def backbone(self) -> nn.Module:
        return self.encoder.trunk

    def _saliency_activation(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), batch_stats_frozen(self.encoder):
            return self.encoder.activation(images)

    def _encode_keys(self, images: torch.Tensor, need_activation: bool):
        if need_activation:
            return self.encoder(images, with_activation=True)
        return self.encoder(images), None

    def forward(self, batch: Any, phase: str = "main") -> StepOutput:
        timer = self.timer
        prepared = self.masking.prepare(batch, self._encode_keys, self.mask_generator, timer)
        hard = None
        if prepared.negatives is not None:
            with timer("hard_negative_forward"), torch.no_grad(), batch_stats_frozen(self.encoder):
                hard = self.encoder(prepared.negatives).float()
        with timer("query_forward"):
            z_query = self.encoder(prepared.query).float()
        with timer("loss"):
            z_key = prepared.key_embedding.float()
            logits, labels = nt_xent_logits(
                z_query, z_key, self.temperature,
                all_query=distributed.gather_with_grad(z_query), all_key=distributed.gather_with_grad(z_key),
                offset=distributed.rank() * z_query.shape[0], hard_negatives=hard, alpha=self.masking.alpha,
                sample0_negative=bool(self.cfg.compat.released_code),
            )
            loss = contrastive_loss(logits, labels)
        metrics = {"contrastive_acc": contrastive_accuracy(logits.detach(), labels), **prepared.metrics()}
        return StepOutput(loss, metrics)

    def attach_dataset(self, files: list[str], build: bool) -> None:
        self.masking.attach_dataset(files, self.cfg, self.world.device, build)

    def meta(self) -> dict[str, Any]:
        return {"method": self.name, **self.masking.meta(), "sync_bn": self.sync_bn,
                "released_code": bool(self.cfg.compat.released_code), "temperature": self.temperature}

    def describe(self) -> list[str]:
        return [f"NT-Xent over the global batch of {self.cfg.data.batch_size} pairs "
                f"({'synchronized' if self.sync_bn else 'per-process'} batch-norm)"]

    @torch.no_grad()
    def pictures(self, batch: Any, generator: torch.Generator) -> dict[str, Any]:
        was_training = self.training
        self.eval()
        try:
            return self.masking.preview(batch, self.encoder.activation, generator)
        finally:
            self.train(was_training)
