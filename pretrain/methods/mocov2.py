"""MoCo v2 (Chen et al. 2020) with the paper's saliency-guided masking and hard negatives.

Query encoder (trained) and momentum key encoder, 2-layer MLP head, InfoNCE over the positive key and a
queue of past keys, temperature 0.2. With masking the query (or the key) view is masked by saliency and
each sample adds ``num_hard_negatives`` FG-masked copies of its key view, encoded by the key encoder,
to its negatives with weight ``alpha`` (SPEC 1.2).

Shuffle-BN: on several processes the key batch is shuffled across processes before the key forward
(MoCo's recipe); on one process both encoders use split batch-norm over ``bn_splits`` sub-batches and
the key batch is shuffled before its forward, the standard single-device substitute. ``shuffle_bn``
picks it (``auto``: across processes when there are several, else split); the choice is logged and
recorded in the checkpoint meta (``shuffle_bn``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import distributed
from pretrain.augment import TwoViewBatch
from pretrain.encoder import Encoder, batch_stats_frozen
from pretrain.guided_masking import GuidedMasking
from pretrain.losses import contrastive_accuracy, contrastive_loss, moco_logits
from pretrain.methods.base import Method
from pretrain.split_bn import convert_to_split_bn
from pretrain.stepping import StepOutput, StepRunner


@dataclass
class MoCoV2Config:
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    head_hidden_dim: int | None = None  # default: the trunk's feature dimension (2048 for R50)
    head_out_dim: int = 128
    queue_init: str = "random"  # random: K random unit vectors (MoCo) | empty: only real keys, the queue grows
    head_bn: bool = False  # MoCo v2's head has no BN; BN (as in MoCo v3/SimCLR) stabilizes tiny-scale runs
    shuffle_bn: str = "auto"  # auto | ddp (shuffle across processes) | split (split BN) | none
    bn_splits: int = 8
    # An older key of the query's own image still in the queue is a false negative: about (K/N)^2/2 of
    # the queries meet one (13% for the paper's 65,536 keys on ImageNet-100's 126,689 images, 40% on the
    # toy set), and it pushes a query away from its own image once the encoder settles. True drops those
    # entries from the query's negatives.
    exclude_own_keys: bool = False
    # The other keys of the current batch join the negatives (as in MoCo v3) besides the queue. Without
    # them every negative comes from an older key encoder than the positive does, and on a short run the
    # encoder can match query and positive by "made by the newest encoder" alone: the loss sits near
    # ln(K+1) with contrastive accuracy near 100% and the embeddings collapse into a drifting cone.
    batch_negatives: bool = False
    # Symmetric loss (as MoCo v3 and the MoCo authors' CIFAR demo): each view is also the query of the other,
    # the two directions' losses are averaged and both key sets are enqueued. Twice the encoder passes per
    # step for twice the training signal; MoCo v2 as published is asymmetric (false). With ADIOS: the unmasked
    # key view is also the query of each masked view (ADIOS's BYOL form; methods/adios.py).
    symmetric: bool = False
    # queue_size: 0 keeps no queue: the negatives are the current batch's keys only (MoCo v3's negatives;
    # needs batch_negatives). The toy configs use it: on a few hundred steps the queued keys of older
    # encoders are told apart from the current key by age alone and the run does not learn (docs/pretraining.md).


@dataclass
class _Direction:
    """One query -> key direction of a step."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    prepared: Any
    batch_keys: torch.Tensor  # this step's keys of every process (gathered)
    batch_index: torch.Tensor | None
    own: torch.Tensor | None


def swap_views(batch: TwoViewBatch) -> TwoViewBatch:
    """The same batch with query and key views (and their geometry) exchanged."""
    return dataclasses.replace(batch, query=batch.key, key=batch.query, query_box=batch.key_box,
                               key_box=batch.query_box, query_flip=batch.key_flip, key_flip=batch.query_flip)


class MoCoV2(Method):
    name = "mocov2"
    Config = MoCoV2Config

    def __init__(self, cfg: Any, world: distributed.World, num_classes: int):
        super().__init__(cfg, world, num_classes)
        opts = self.options
        if int(opts.queue_size) < 0 or (int(opts.queue_size) == 0 and not bool(opts.batch_negatives)):
            raise ValueError(f"mocov2.queue_size must be positive, or 0 with mocov2.batch_negatives=true (negatives "
                             f"from the current batch only), got {opts.queue_size}")
        self.temperature, self.momentum = float(opts.temperature), float(opts.momentum)
        self.symmetric = bool(opts.symmetric)
        self.encoder_q = Encoder(self.arch, opts.head_hidden_dim, int(opts.head_out_dim), head_bn=bool(opts.head_bn),
                                 zero_init_residual=bool(cfg.model.zero_init_residual),
                                 saliency_layer=str(cfg.saliency.feature_layer))
        self.shuffle_bn = self._choose_shuffle_bn(str(opts.shuffle_bn), world)
        if self.shuffle_bn == "split":
            convert_to_split_bn(self.encoder_q, int(opts.bn_splits))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        queue = F.normalize(torch.randn(int(opts.queue_size), int(opts.head_out_dim)), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Dataset index of the image behind each queue entry (-1: the random initial entries).
        self.register_buffer("queue_index", torch.full((int(opts.queue_size),), -1, dtype=torch.long))
        self.exclude_own_keys = bool(opts.exclude_own_keys)
        self.batch_negatives = bool(opts.batch_negatives)
        # Which image each key came from is only needed (and only gathered across processes) when used.
        self.tracks_images = self.exclude_own_keys or self.batch_negatives
        self.dataset_size = 0  # set by attach_dataset
        if str(opts.queue_init) not in ("random", "empty"):
            raise ValueError(f"mocov2.queue_init must be 'random' or 'empty', got '{opts.queue_init}'")
        filled = int(opts.queue_size) if opts.queue_init == "random" else 0
        self.register_buffer("queue_filled", torch.tensor(filled, dtype=torch.long))
        self.masking = GuidedMasking(cfg, self._saliency_activation, world.device)
        self.input_filter = self.masking.input_filter
        base_seed = int(cfg.seed) * 1000 + world.rank
        self.mask_generator = self.make_generator("masking", base_seed + 1)
        self.shuffle_generator = torch.Generator().manual_seed(int(cfg.seed) * 1000 + 7)  # same on all ranks
        self.generators["shuffle"] = self.shuffle_generator

    def _choose_shuffle_bn(self, requested: str, world: distributed.World) -> str:
        if requested == "auto":
            requested = "ddp" if world.distributed else "split"
        if requested == "ddp" and not world.distributed:
            raise ValueError("mocov2.shuffle_bn=ddp needs several processes (torchrun); use auto or split")
        if requested not in ("ddp", "split", "none"):
            raise ValueError(f"mocov2.shuffle_bn must be auto, ddp, split or none, got '{requested}'")
        if requested == "split" and self.cfg.data.batch_size // world.world_size % int(self.options.bn_splits):
            raise ValueError(f"split batch-norm needs the per-process batch divisible by mocov2.bn_splits "
                             f"({self.options.bn_splits}); change data.batch_size or mocov2.bn_splits")
        return requested

    # ------------------------------------------------------------------------------------------ pieces

    def backbone(self) -> nn.Module:
        return self.encoder_q.trunk

    def _saliency_activation(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), batch_stats_frozen(self.encoder_k):
            return self.encoder_k.activation(images)

    @torch.no_grad()
    def _encode_keys(self, images: torch.Tensor, need_activation: bool):
        """Key forward with shuffle-BN (or its substitute); outputs in the original sample order."""
        if self.shuffle_bn == "none":
            if need_activation:
                return self.encoder_k(images, with_activation=True)
            return self.encoder_k(images), None
        # One process ("split"): the permutation is local and only moves samples between BN sub-batches.
        shuffled, inverse = distributed.shuffle_across_processes(images, self.shuffle_generator)
        keys, activation = self.encoder_k(shuffled, with_activation=True)
        keys = distributed.unshuffle_across_processes(keys, inverse)
        activation = distributed.unshuffle_across_processes(activation, inverse) if need_activation else None
        return keys, activation

    def _gather_batch(self, keys: torch.Tensor, image_index: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's keys of every process and, when tracked, their image indices (one gather each)."""
        gathered_index = (distributed.gather_no_grad(image_index.to(self.queue_index.device))
                          if self.tracks_images else None)
        return distributed.gather_no_grad(keys.detach()), gathered_index

    def _queue_negatives(self, image_index: torch.Tensor, batch_keys: torch.Tensor | None = None,
                         batch_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negatives of this step's queries and which of them are a query's own image (or None).

        The filled part of the queue, plus with ``batch_negatives`` the gathered keys of the current global
        batch (``batch_keys``/``batch_index`` from :meth:`_gather_batch`); entries of the query's own image
        are marked when either option is on (its current key is the positive, so it must not also be a
        negative).
        """
        filled = int(self.queue_filled)
        queue, queue_index = self.queue[:filled].clone().detach(), self.queue_index[:filled]
        if self.batch_negatives and batch_keys is not None:
            queue = torch.cat([queue, batch_keys.to(queue.dtype)])
            queue_index = torch.cat([queue_index, batch_index])
        if not self.tracks_images:
            return queue, None
        own = queue_index.unsqueeze(0) == image_index.to(queue_index.device).unsqueeze(1)
        return queue, own

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for q, k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            k.mul_(self.momentum).add_(q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, image_index: torch.Tensor | None = None) -> None:
        """Push this process's keys (and image indices) after gathering them from every process."""
        if image_index is None:
            self._store(distributed.gather_no_grad(keys), None)
        else:
            self._store(*self._gather_batch(keys, image_index))

    @torch.no_grad()
    def _store(self, keys: torch.Tensor, image_index: torch.Tensor | None) -> None:
        """Write already gathered keys into the ring (image index -1 when not tracked)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        ptr = int(self.queue_ptr)
        index = (torch.arange(keys.shape[0], device=keys.device) + ptr) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_index[index] = -1 if image_index is None else image_index
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + keys.shape[0]))

    # ------------------------------------------------------------------------------------------- step

    def forward(self, batch: Any, phase: str = "main") -> StepOutput:
        queued = int(self.queue_filled)
        directions = [batch, swap_views(batch)] if self.symmetric else [batch]
        # every direction contrasts against the queue as it was before this step; the keys join it after
        results = [self._contrast(views) for views in directions]
        with self.timer("loss"):
            loss = torch.stack([r.loss for r in results]).mean()
            self._store(torch.cat([r.batch_keys for r in results]),
                        None if results[0].batch_index is None else torch.cat([r.batch_index for r in results]))
        first = results[0]
        metrics = {"contrastive_acc": sum(r.accuracy for r in results) / len(results), **first.prepared.metrics()}
        if first.own is not None:  # share of queries with an older key of their own image in the queue
            metrics["own_keys_in_queue"] = float(first.own[:, :queued].any(dim=1).float().mean()) * 100
        return StepOutput(loss, metrics)

    def _contrast(self, batch: Any) -> _Direction:
        """InfoNCE of ``batch.query`` (masked as configured) against ``batch.key`` and the negatives."""
        timer = self.timer
        prepared = self.masking.prepare(batch, self._encode_keys, self.mask_generator, timer)
        keys = prepared.key_embedding
        hard = None
        if prepared.negatives is not None:
            with timer("hard_negative_forward"), torch.no_grad():
                hard = self.encoder_k(prepared.negatives)
        with timer("query_forward"):
            queries = self.encoder_q(prepared.query)
        with timer("loss"):
            batch_keys, batch_index = self._gather_batch(keys, batch.index)
            queue, own = self._queue_negatives(batch.index, batch_keys, batch_index)
            logits, labels = moco_logits(
                queries.float(), keys.float(), queue, self.temperature,
                hard_negatives=None if hard is None else hard.float(), alpha=self.masking.alpha,
                sample0_negative=bool(self.cfg.compat.released_code), not_negative=own,
            )
            loss = contrastive_loss(logits, labels)
        return _Direction(loss, contrastive_accuracy(logits.detach(), labels), prepared, batch_keys, batch_index, own)

    def after_step(self, runner: StepRunner) -> None:
        self._momentum_update()

    # ------------------------------------------------------------------------------------ reporting

    def attach_dataset(self, files: list[str], build: bool) -> None:
        self.masking.attach_dataset(files, self.cfg, self.world.device, build)
        self.dataset_size = len(files)

    def own_key_share(self) -> float:
        """Expected share of queries that meet an older key of their own image in the queue (no exclusion).

        With the data reshuffled every epoch, an image's previous key is still queued when fewer than
        ``queue_size`` samples passed since: probability (K/N)^2 / 2 for a queue of K keys and N images,
        1 once the queue holds a whole epoch.
        """
        if not self.dataset_size:
            return 0.0
        ratio = self.queue.shape[0] / self.dataset_size
        return 1.0 if ratio >= 1 else ratio * ratio / 2

    def meta(self) -> dict[str, Any]:
        return {"method": self.name, **self.masking.meta(), "shuffle_bn": self.shuffle_bn,
                "released_code": bool(self.cfg.compat.released_code)}

    def describe(self) -> list[str]:
        lines = {
            "ddp": "shuffle-BN: key batch shuffled across processes (MoCo's recipe)",
            "split": f"shuffle-BN substitute on one process: split batch-norm over {self.options.bn_splits} "
                     "sub-batches in both encoders + key batch shuffled before its forward",
            "none": "shuffle-BN off: plain batch-norm (not recommended: MoCo can cheat through BN)",
        }
        out = [lines[self.shuffle_bn]]
        if self.symmetric:
            out.append("symmetric loss: each view is also the query of the other (mocov2.symmetric)")
        share = self.own_key_share()
        if self.queue.shape[0] == 0:
            out.append("negatives: the current batch's keys only (mocov2.queue_size=0, no queue)")
        elif self.exclude_own_keys:
            out.append("queue: older keys of a query's own image are left out of its negatives (mocov2.exclude_own_keys)")
        elif share > 0.05:
            out.append(f"note: the queue ({self.queue.shape[0]} keys) spans {self.queue.shape[0] / self.dataset_size:.0%} "
                       f"of the {self.dataset_size} training images, so about {share:.0%} of the queries meet an older "
                       "key of their own image among their negatives (as in MoCo v2 as published); "
                       "mocov2.exclude_own_keys=true leaves them out, a smaller mocov2.queue_size makes them rarer")
        return out

    @torch.no_grad()
    def pictures(self, batch: Any, generator: torch.Generator) -> dict[str, Any]:
        was_training = self.training
        self.eval()
        try:
            return self.masking.preview(batch, self.encoder_k.activation, generator)
        finally:
            self.train(was_training)
