"""The MoCo linear-classification protocol on ImageNet-100 (``main_lincls.py`` of MoCo, He et al.).

The backbone is frozen in eval mode (:class:`FrozenEncoder`); only a new fc layer (weights N(0, 0.01),
bias 0) trains, with SGD (lr 30, momentum 0.9, weight decay 0), batch 256, 100 epochs, lr x0.1 at
epochs 60 and 80. Training images: RandomResizedCrop(224) + horizontal flip; validation: Resize(256) +
CenterCrop(224). Reported: top-1 and top-5 on val after the last epoch (no selection on val). After
training, the sanity check asserts that every backbone tensor still equals the checkpoint.

Under ``torchrun`` each process encodes its shard of every batch (global batch = ``batch_size``) and the
fc gradients are averaged by DistributedDataParallel; validation is sharded without padding and the
counts are summed, so the accuracy is exact for any world size.

Resumable: after every epoch the fc, optimizer, scheduler and history are written atomically to
``probe_last.pth`` in the work dir, tagged with the weights hash and config hash; a rerun with the same
inputs continues from the last finished epoch and reproduces the uninterrupted run (the augmentation
stream is re-seeded per epoch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pretrain.checkpoint import CheckpointError, safe_torch_load
from pretrain.fileio import atomic_torch_save
from transfer.classification_data import ClassificationData, ImageListDataset, LabelledImages
from transfer.distributed import DistContext
from transfer.eval_transforms import center_crop_transform, random_crop_transform
from transfer.frozen_encoder import FrozenEncoder

PROBE_FORMAT = "masked-ssl-probe/v1"
PROBE_CHECKPOINT = "probe_last.pth"
PROBE_FC = "linear_fc.pth"


class ProbeStateError(RuntimeError):
    """The work dir holds the probe state of a different run (other weights or config)."""


@dataclass
class ProbeSettings:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    init_std: float = 0.01
    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    eval_every: int = 0  # validate every N epochs as well as at the end (0: only at the end)

    @classmethod
    def from_config(cls, probe: dict[str, Any], preprocess: dict[str, Any]) -> ProbeSettings:
        settings = cls(
            epochs=int(probe["epochs"]), batch_size=int(probe["batch_size"]), lr=float(probe["lr"]),
            momentum=float(probe["momentum"]), weight_decay=float(probe["weight_decay"]),
            milestones=tuple(int(m) for m in probe["milestones"]), gamma=float(probe["gamma"]),
            init_std=float(probe["init_std"]), eval_every=int(probe.get("eval_every", 0)),
            crop_size=int(preprocess["crop_size"]), resize_size=int(preprocess["resize_size"]),
            interpolation=str(preprocess.get("interpolation", "bilinear")),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.init_std < 0:
            raise ValueError(f"probe needs epochs >= 1, batch_size >= 1, lr > 0, init_std >= 0; got {self}")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ValueError(f"probe.milestones must be increasing epoch numbers >= 1, got {list(self.milestones)}")
        if self.crop_size > self.resize_size:
            raise ValueError(f"crop_size {self.crop_size} is larger than resize_size {self.resize_size}")


@dataclass
class ProbeResult:
    top1: float
    top5: float
    epochs: int
    resumed_from_epoch: int  # 0 when the run started fresh
    history: list[dict[str, float]] = field(default_factory=list)
    backbone_tensors_checked: int = 0
    fc_path: str | None = None


def _accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[int, int]:
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels[:, None])
    return int(hits[:, :1].any(1).sum()), int(hits.any(1).sum())


def evaluate(encoder: FrozenEncoder, fc: nn.Linear, images: LabelledImages, settings: ProbeSettings,
             normalize: dict, ctx: DistContext, num_workers: int, progress: bool) -> tuple[float, float]:
    """Top-1 / top-5 (%) on ``images``; each rank takes every ``world_size``-th image, counts are summed.

    ``fc`` is the plain layer, not its DDP wrapper: the shards may differ in length by one batch, and a
    wrapper must not run collectives on one rank only."""
    transform = center_crop_transform(settings.resize_size, settings.crop_size, settings.interpolation, normalize)
    shard = images.subset(range(ctx.rank, len(images), ctx.world_size))
    loader = torch.utils.data.DataLoader(ImageListDataset(shard, transform), batch_size=max(1, settings.batch_size // ctx.world_size),
                                         shuffle=False, num_workers=num_workers)
    counts = torch.zeros(3, dtype=torch.float64)
    k = min(5, fc.out_features)
    with torch.no_grad():
        for batch, labels in tqdm(loader, desc="probe val", unit="batch", disable=not progress, leave=False):
            logits = fc(encoder(batch.to(ctx.device)))
            top1, top5 = _accuracy_counts(logits.cpu(), labels, k)
            counts += torch.tensor([top1, top5, len(labels)], dtype=torch.float64)
    counts = ctx.all_reduce_sum(counts.to(ctx.device)).cpu()
    return 100.0 * float(counts[0] / counts[2]), 100.0 * float(counts[1] / counts[2])


def _load_state(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = safe_torch_load(path)
    except CheckpointError:
        return None  # a killed save cannot leave this (writes are atomic); a damaged file restarts the probe
    if not isinstance(state, dict) or state.get("format") != PROBE_FORMAT:
        return None
    if state.get("identity") != identity:
        raise ProbeStateError(
            f"{path} belongs to another probe run (other weights, config or seed). Use a different --out, or "
            "--force to discard it and start over"
        )
    return state


def train_linear_probe(
    encoder: FrozenEncoder,
    data: ClassificationData,
    settings: ProbeSettings,
    *,
    normalize: dict,
    work_dir: str | os.PathLike,
    identity: dict[str, Any],
    seed: int,
    ctx: DistContext | None = None,
    num_workers: int = 0,
    progress: bool = True,
    tensorboard: bool = False,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> ProbeResult:
    """Run (or resume) the probe in ``work_dir``; see the module docstring.

    ``identity`` (weights hash, config hash, seed) tags the resumable state; ``on_epoch_end(epoch, stats)``
    is called on every rank after each epoch's state is saved (the tests interrupt a run there).
    """
    ctx = ctx or DistContext()
    if settings.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by the world size {ctx.world_size}")
    work_dir = Path(work_dir)
    state_path = work_dir / PROBE_CHECKPOINT
    train_images, val_images = data.splits["train"], data.splits["val"]

    fc = nn.Linear(encoder.feature_dim, len(data.classes))
    torch.manual_seed(seed)
    fc.weight.data.normal_(mean=0.0, std=settings.init_std)
    fc.bias.data.zero_()
    fc.to(ctx.device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(settings.milestones), gamma=settings.gamma)
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = _load_state(state_path, identity)
    if state is not None:
        fc.load_state_dict(state["fc"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        if ctx.is_main:
            print(f"resuming the linear probe from {state_path} (epoch {start_epoch} of {settings.epochs} done)",
                  flush=True)
    model: nn.Module = fc
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(fc, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    train_transform = random_crop_transform(settings.crop_size, settings.interpolation, normalize)
    sampler = torch.utils.data.DistributedSampler(ImageListDataset(train_images, train_transform), num_replicas=ctx.world_size,
                                                  rank=ctx.rank, shuffle=True, seed=seed, drop_last=False)
    loader = torch.utils.data.DataLoader(
        sampler.dataset, batch_size=settings.batch_size // ctx.world_size, sampler=sampler, num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda", drop_last=False,
    )
    writer = _tensorboard(work_dir / "tb", enabled=tensorboard and ctx.is_main)
    steps_left = (settings.epochs - start_epoch) * len(loader)
    bar = tqdm(total=steps_left, desc="linear probe", unit="it", disable=not (progress and ctx.is_main))
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 1_000_003 + epoch * 7919 + ctx.rank)  # augmentation stream of this epoch
        encoder.eval()
        model.train()
        loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            loss = criterion(model(encoder(images)), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"probe loss is {loss.item()} at epoch {epoch + 1}; lower probe.lr "
                                         f"(now {settings.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double().cpu() * len(labels)
            seen += len(labels)
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{loss.item():.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:g}")
        totals = ctx.all_reduce_sum(torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64).to(ctx.device)).cpu()
        stats = {"epoch": epoch + 1, "loss": float(totals[0] / max(totals[1], 1)), "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        last = epoch + 1 == settings.epochs
        if settings.eval_every and (epoch + 1) % settings.eval_every == 0 and not last:
            stats["val_top1"], stats["val_top5"] = evaluate(encoder, fc, val_images, settings, normalize, ctx,
                                                            num_workers, progress=False)
        history.append(stats)
        if writer is not None:
            for key, value in stats.items():
                if key != "epoch":
                    writer.add_scalar(f"probe/{key}", value, epoch + 1)
        if ctx.is_main:
            atomic_torch_save({"format": PROBE_FORMAT, "identity": identity, "epoch": epoch + 1, "fc": fc.state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "history": history}, state_path)
        ctx.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, stats)
    bar.close()
    top1, top5 = evaluate(encoder, fc, val_images, settings, normalize, ctx, num_workers, progress)
    if not (math.isfinite(top1) and math.isfinite(top5)):
        raise FloatingPointError("validation accuracy is not finite")
    checked = encoder.assert_unchanged()
    fc_path = None
    if ctx.is_main:
        fc_path = work_dir / PROBE_FC
        atomic_torch_save({"format": PROBE_FORMAT, "identity": identity, "fc": fc.state_dict(), "classes": data.classes,
                           "top1": top1, "top5": top5}, fc_path)
        if writer is not None:
            writer.add_scalar("probe/val_top1", top1, settings.epochs)
            writer.add_scalar("probe/val_top5", top5, settings.epochs)
            writer.close()
    return ProbeResult(top1=top1, top5=top5, epochs=settings.epochs, resumed_from_epoch=start_epoch, history=history,
                       backbone_tensors_checked=checked, fc_path=str(fc_path) if fc_path else None)


def _tensorboard(directory: Path, enabled: bool):
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory))
