"""ADIOS (Shi et al., ICML 2022, "Adversarial Masking for Self-Supervised Learning") on MoCo v2 and SimCLR.

An occlusion network (:mod:`pretrain.occlusion`) splits each query view into ``N`` soft masks; the
encoder learns to match the masked views ``x * (1 - m_n)`` to the unmasked key view while the
occlusion network learns masks that make this hard. Every step alternates (min-max):

1. encoder step (optimizer ``main``: ``optim:``/``schedule:``): minimize the SSL loss summed over the
   ``N`` masked views, masks detached (the occlusion network runs without gradient);
2. occlusion step (optimizer ``masker``: ``adios.mask_optim``/``adios.mask_schedule``): with the encoder
   frozen (no parameter gradients, BN statistics untouched), maximize
   ``SSL loss - alpha_sparsity * sum_n mean_b 1 / sin(pi * s_bn)``.

``adios.single_mask`` is ADIOS-s: each sample uses one of its ``N`` masks, drawn at random per step
(the same draw in both halves of the step), so a step costs one masked forward instead of ``N``; the
sparsity penalty still covers all ``N`` masks.

The MoCo v2 version is a port (ADIOS's code has SimCLR, BYOL and SimSiam only): the masked views take
the query role in the query encoder; the key is the unmasked key view through the momentum encoder
(shuffle-BN as in MoCo), computed once per step and shared by the ``N`` masked queries and by both
halves of the step, with one queue snapshot; the key is enqueued once, after the occlusion step, and
the momentum update follows the encoder step (it does not depend on the occlusion step).
With ``mocov2.symmetric`` the port takes the form of ADIOS's own momentum method (its BYOL code): each
masked view is also a key, of the unmasked key view as query, so the encoder sees clean images as well
as masked ones. Per mask n the loss is the mean of L(q(masked_n), k(key view)) and L(q(key view),
k(masked_n)); the masked keys come from the momentum encoder without gradient, so the second direction
does not depend on the masks and the occlusion step uses the first only (the same gradient as ADIOS's
code, which also evaluates the second); the queue takes the unmasked keys only.
The SimCLR version follows ADIOS's code: NT-Xent between the unmasked view and each masked view, the
occlusion network seeing the view it masks. Checkpoints hold both networks and both optimizers; the
exported backbone is the encoder's trunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pretrain import distributed
from pretrain.augment import TwoViewBatch
from pretrain.checkpoint import IMAGENET_NORMALIZE
from pretrain.config import OptimConfig, ScheduleConfig
from pretrain.encoder import batch_stats_frozen
from pretrain.losses import contrastive_accuracy, contrastive_loss, moco_logits, nt_xent_logits
from pretrain.methods.mocov2 import MoCoV2
from pretrain.methods.simclr import SimCLR
from pretrain.occlusion import NORMS, OcclusionNetwork, mask_fractions, occlude, pick_masks, sparsity_penalty
from pretrain.stepping import OptimizerSpec, StepOutput, StepRunner

# Colours of the mask-assignment panel (one per mask, cycled).
MASK_COLOURS = ((0.9, 0.2, 0.2), (0.2, 0.7, 0.2), (0.2, 0.4, 0.95), (0.95, 0.8, 0.1), (0.7, 0.3, 0.8),
                (0.1, 0.8, 0.8))


@dataclass
class AdiosConfig:
    """The ``adios:`` section (defaults: ADIOS's code; the configs set the recipe)."""

    num_masks: int = 4  # N masks partitioning each image
    single_mask: bool = False  # ADIOS-s: one random mask per sample and step
    alpha_sparsity: float = 1.0  # weight of the sparsity penalty in the occlusion objective
    width: int = 32  # base width of the UNet (ADIOS's mask_fbase)
    norm: str = "gn"  # gn (GroupNorm, 8 groups) | in (InstanceNorm) | none
    bottleneck_dim: int = 128  # hidden units of the UNet's MLP bottleneck
    mask_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.1))
    mask_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class AdiosInputs:
    """What both halves of one step share."""

    batch: TwoViewBatch
    key_view: torch.Tensor  # the unmasked key view through the input filter, once per step
    choice: torch.Tensor | None  # ADIOS-s: (B,) mask index per sample
    keys: torch.Tensor | None  # MoCo: the step's keys (momentum encoder, no gradient)
    # MoCo, computed once for both halves: the keys (and tracked image indices) of every process, which
    # the queue stores after the step, and the negatives with their own-image mask
    gathered: tuple[torch.Tensor, torch.Tensor | None] | None = None
    negatives: tuple[torch.Tensor, torch.Tensor | None] | None = None


@contextlib.contextmanager
def parameters_frozen(modules: list[nn.Module]) -> Iterator[None]:
    """No parameter gradients in ``modules`` (the occlusion step needs gradients w.r.t. the input only)."""
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AdiosMixin:
    """The occlusion network and the min-max step; the SSL method it is mixed into supplies the loss."""

    own_masking = "adios"
    extra_sections = {"adios": AdiosConfig}
    find_unused_parameters = True  # the occlusion net is idle in the encoder half and vice versa
    base_method: str = ""

    def __init__(self, cfg: Any, world: distributed.World, num_classes: int):
        super().__init__(cfg, world, num_classes)  # the SSL method (next in the MRO) first
        self._build_occluder()

    def _build_occluder(self) -> None:
        cfg = self.cfg
        opts = cfg.adios
        if cfg.masking.branch != "query":
            raise ValueError(f"ADIOS masks the query view only: masking.branch must be 'query', got "
                             f"'{cfg.masking.branch}'")
        if opts.norm not in NORMS:
            raise ValueError(f"adios.norm must be one of {NORMS}, got '{opts.norm}'")
        self.num_masks = int(opts.num_masks)
        self.single_mask = bool(opts.single_mask)
        self.alpha_sparsity = float(opts.alpha_sparsity)
        self.occluder = OcclusionNetwork(int(cfg.augment.image_size), self.num_masks, int(opts.width), str(opts.norm),
                                         int(opts.bottleneck_dim))
        self.choice_generator = self.make_generator("adios", int(cfg.seed) * 1000 + self.world.rank + 11)

    # ----------------------------------------------------------------------- what the SSL side supplies

    def _trained_encoders(self) -> list[nn.Module]:
        raise NotImplementedError

    def _step_keys(self, key_view: torch.Tensor) -> torch.Tensor | None:
        return None

    def _ssl_losses(self, views: list[torch.Tensor], inputs: AdiosInputs, train_encoder: bool
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        raise NotImplementedError

    def _finish_step(self, inputs: AdiosInputs) -> None:
        """After both halves (MoCo: enqueue the keys, momentum update)."""

    # ------------------------------------------------------------------------------------ optimizers

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        occluder = {id(p) for p in self.occluder.parameters()}
        encoder = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in occluder]
        masker = [(f"occluder.{n}", p) for n, p in self.occluder.named_parameters() if p.requires_grad]
        opts = self.cfg.adios
        return {"main": OptimizerSpec(encoder, self.cfg.optim, self.cfg.schedule),
                "masker": OptimizerSpec(masker, opts.mask_optim, opts.mask_schedule)}

    # ------------------------------------------------------------------------------------------- step

    def _masked_views(self, query: torch.Tensor, masks: torch.Tensor, choice: torch.Tensor | None
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The masked query views and the (B, V) fractions of the masks they use."""
        fractions = mask_fractions(masks)
        if choice is not None:
            used = fractions.gather(1, choice.view(-1, 1).to(fractions.device))
            return [occlude(query, pick_masks(masks, choice))], used
        return [occlude(query, masks[:, n]) for n in range(masks.shape[1])], fractions

    def forward(self, inputs: AdiosInputs, phase: str = "encoder") -> StepOutput:
        timer = self.timer
        query = self.input_filter(inputs.batch.query)
        if phase == "encoder":
            with timer("masks"), torch.no_grad():
                masks = self.occluder(query)
            views, used = self._masked_views(query, masks, inputs.choice)
            with timer("query_forward"):
                losses, accuracies = self._ssl_losses(views, inputs, train_encoder=True)
            fractions = mask_fractions(masks)
            metrics = {"contrastive_acc": torch.stack(accuracies).mean(), "masked_fraction": used.mean(),
                       "mask_fraction_min": fractions.min(dim=1).values.mean(),
                       "mask_fraction_max": fractions.max(dim=1).values.mean()}
            return StepOutput(torch.stack(losses).sum(), metrics)
        if phase == "masker":
            with timer("masks"):
                masks = self.occluder(query)
            views, _ = self._masked_views(query, masks, inputs.choice)
            with timer("masker_forward"), contextlib.ExitStack() as stack:
                for encoder in self._trained_encoders():
                    stack.enter_context(batch_stats_frozen(encoder))
                losses, _ = self._ssl_losses(views, inputs, train_encoder=False)
            ssl = torch.stack(losses).sum()
            penalty = sparsity_penalty(mask_fractions(masks))
            objective = ssl - self.alpha_sparsity * penalty  # what the occlusion network maximizes
            return StepOutput(-objective, {"masker_ssl_loss": ssl.detach(), "sparsity_penalty": penalty.detach(),
                                           "masker_objective": objective.detach()})
        raise ValueError(f"unknown ADIOS phase '{phase}' (encoder | masker)")

    def step_inputs(self, runner: StepRunner, batch: TwoViewBatch) -> AdiosInputs:
        choice = None
        if self.single_mask:
            choice = torch.randint(self.num_masks, (batch.size,), generator=self.choice_generator,
                                   device=self.choice_generator.device).to(batch.query.device)
        key_view = self.input_filter(batch.key)
        with runner.autocast(), self.timer("key_forward"):
            keys = self._step_keys(key_view)
        return AdiosInputs(batch, key_view, choice, keys)

    def encoder_step(self, runner: StepRunner, inputs: AdiosInputs) -> StepOutput:
        output = runner.forward(inputs, phase="encoder")
        runner.backward_and_step(output.loss, "main")
        return output

    def masker_step(self, runner: StepRunner, inputs: AdiosInputs) -> StepOutput:
        with parameters_frozen(self._trained_encoders()):
            output = runner.forward(inputs, phase="masker")
            runner.backward_and_step(output.loss, "masker")
        return output

    def train_step(self, runner: StepRunner, batch: TwoViewBatch) -> dict[str, Any]:
        inputs = self.step_inputs(runner, batch)
        encoder_out = self.encoder_step(runner, inputs)
        masker_out = self.masker_step(runner, inputs)
        with self.timer("momentum_update"):
            self._finish_step(inputs)
        return {"loss": encoder_out.loss.detach(), **encoder_out.metrics, **masker_out.metrics}

    # ------------------------------------------------------------------------------------ reporting

    def meta(self) -> dict[str, Any]:
        meta = super().meta()
        meta.update({
            "method": self.base_method, "masking": "adios", "strategy": None, "mask_branch": "query",
            "saliency_source": None,
            "adios": {"num_masks": self.num_masks, "single_mask": self.single_mask,
                      "alpha_sparsity": self.alpha_sparsity, "width": int(self.cfg.adios.width),
                      "norm": str(self.cfg.adios.norm), "mask_lr": float(self.cfg.adios.mask_optim.lr)},
        })
        meta.pop("hard_negatives", None)
        return meta

    def describe(self) -> list[str]:
        kind = "ADIOS-s (one random mask per sample)" if self.single_mask else f"ADIOS (all {self.num_masks} masks)"
        params = sum(p.numel() for p in self.occluder.parameters())
        return [*super().describe(),
                f"{kind}: UNet occlusion network ({params / 1e6:.2f} M parameters, {self.num_masks} masks, "
                f"alpha_sparsity {self.alpha_sparsity}), encoder and occlusion steps alternate every step"]

    @torch.no_grad()
    def pictures(self, batch: TwoViewBatch, generator: torch.Generator) -> dict[str, Any]:
        was_training = self.training
        self.eval()
        try:
            query = self.input_filter(batch.query)
            masks = self.occluder(query)
            panels: dict[str, Any] = {"query view": query, "key view": self.input_filter(batch.key),
                                      "mask assignment": _assignment_image(masks)}
            for n in range(masks.shape[1]):
                panels[f"masked by mask {n + 1}"] = occlude(query, masks[:, n])
            return panels
        finally:
            self.train(was_training)


def _assignment_image(masks: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) masks -> normalized (B, 3, H, W) image colouring each pixel by its strongest mask."""
    colours = torch.tensor([MASK_COLOURS[n % len(MASK_COLOURS)] for n in range(masks.shape[1])],
                           device=masks.device, dtype=torch.float32)
    rgb = colours[masks.argmax(dim=1)].permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_NORMALIZE["mean"], device=masks.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"], device=masks.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


class MoCoV2Adios(AdiosMixin, MoCoV2):
    """ADIOS on MoCo v2 (a port; see the module docstring). Config sections ``mocov2:`` and ``adios:``."""

    name = "mocov2_adios"
    config_section = "mocov2"
    base_method = "mocov2"

    def _trained_encoders(self) -> list[nn.Module]:
        return [self.encoder_q]

    def _step_keys(self, key_view: torch.Tensor) -> torch.Tensor:
        keys, _ = self._encode_keys(key_view, False)
        return keys.float()

    def step_inputs(self, runner: StepRunner, batch: TwoViewBatch) -> AdiosInputs:
        inputs = super().step_inputs(runner, batch)
        # one gather and one negative set per step, shared by both halves and the enqueue; the queue holds
        # only real keys with mocov2.queue_init=empty, and the current batch joins only with batch_negatives
        inputs.gathered = self._gather_batch(inputs.keys, batch.index)
        inputs.negatives = self._queue_negatives(batch.index, *inputs.gathered)
        return inputs

    def _ssl_losses(self, views, inputs, train_encoder):
        queue, own = inputs.negatives
        # the reverse direction (clean query, masked key) does not depend on the masks: encoder half only
        reverse = self.symmetric and train_encoder
        clean_queries = self.encoder_q(inputs.key_view).float() if reverse else None
        losses, accuracies = [], []
        for view in views:
            queries = self.encoder_q(view).float()
            logits, labels = moco_logits(queries, inputs.keys, queue, self.temperature, not_negative=own)
            loss, accuracy = contrastive_loss(logits, labels), contrastive_accuracy(logits.detach(), labels)
            if reverse:
                masked_keys = self._encode_keys(view, False)[0].float()
                reverse_queue, reverse_own = self._queue_negatives(
                    inputs.batch.index, *self._gather_batch(masked_keys, inputs.batch.index))
                logits, labels = moco_logits(clean_queries, masked_keys, reverse_queue, self.temperature,
                                             not_negative=reverse_own)
                loss = (loss + contrastive_loss(logits, labels)) / 2
                accuracy = (accuracy + contrastive_accuracy(logits.detach(), labels)) / 2
            losses.append(loss)
            accuracies.append(accuracy)
        return losses, accuracies

    def _finish_step(self, inputs: AdiosInputs) -> None:
        self._store(*inputs.gathered)
        self._momentum_update()


class SimCLRAdios(AdiosMixin, SimCLR):
    """ADIOS on SimCLR (as ADIOS's code). Config sections ``simclr:`` and ``adios:``."""

    name = "simclr_adios"
    config_section = "simclr"
    base_method = "simclr"

    def _trained_encoders(self) -> list[nn.Module]:
        return [self.encoder]

    def _ssl_losses(self, views, inputs, train_encoder):
        key = inputs.key_view
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            z_key = self.encoder(key).float()
        all_key = distributed.gather_with_grad(z_key)
        offset = distributed.rank() * z_key.shape[0]
        losses, accuracies = [], []
        for view in views:
            z_query = self.encoder(view).float()
            logits, labels = nt_xent_logits(z_query, z_key, self.temperature,
                                            all_query=distributed.gather_with_grad(z_query), all_key=all_key,
                                            offset=offset)
            losses.append(contrastive_loss(logits, labels))
            accuracies.append(contrastive_accuracy(logits.detach(), labels))
        return losses, accuracies
