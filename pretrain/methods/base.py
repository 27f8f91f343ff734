"""The contract between the training engine and a pretraining method.

A method is an ``nn.Module`` that owns everything it trains and keeps (encoders, heads, queues, extra
networks such as an occlusion model). The engine builds it, wraps it in DDP, and calls:

* ``train_step(runner, batch) -> metrics``: one optimization step. The default runs ``forward`` (through
  ``runner.forward``, i.e. DDP + autocast), back-propagates the loss into the ``main`` optimizer and
  calls ``after_step``. Override it for several optimizers or a min-max step (ADIOS).
* ``forward(batch, phase) -> StepOutput``: the loss and scalar metrics of one batch.
* ``optimizer_specs()``: ``{name: OptimizerSpec}``; the default is one ``main`` optimizer over every
  trainable parameter, set up from the ``optim:``/``schedule:`` sections. Each optimizer gets its own
  AMP scaler and lr schedule and is checkpointed and resumed by the engine.
* ``backbone()``: the torchvision ResNet trunk that ``final.pth`` exports.
* ``features(images)``: representation for the kNN monitor (default: the backbone on filtered input).
* ``meta()``: the checkpoint-metadata fields that place the model in the paper's tables.
* ``pictures(batch, generator)``: panels for the per-epoch picture (optional).
* ``attach_dataset(files, build)``: the training files in index order, once (per-image caches).
* ``generators``: torch.Generators the method draws from; the engine saves and restores their states
  per process, so a resumed run draws exactly what the uninterrupted one would have.

Everything else a method must keep across a resume lives in its ``state_dict`` (parameters, buffers, or
``get_extra_state``); ``uses_labels`` says whether the method may read ``batch.labels``.

Config sections: ``Config`` becomes the section ``config_section`` (default: the method's ``name``), so a
variant of a method (ADIOS on MoCo v2) can keep its base's section (``mocov2:``); ``extra_sections`` adds
further typed sections (``adios:``). ``own_masking`` names a ``masking.name`` the method implements itself
(ADIOS's occlusion network) instead of the saliency-guided machinery; only that method accepts it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pretrain.backbones import check_arch
from pretrain.distributed import World
from pretrain.filters import NO_FILTER, InputFilter
from pretrain.stepping import OptimizerSpec, StepOutput, StepRunner
from pretrain.timing import NULL_TIMER, PhaseTimer


class Method(nn.Module):
    name: ClassVar[str] = "base"
    Config: ClassVar[type | None] = None  # dataclass of the method's own config section (``<name>:``)
    uses_labels: ClassVar[bool] = False
    find_unused_parameters: ClassVar[bool] = False  # for DDP, when a forward phase leaves parameters unused
    config_section: ClassVar[str | None] = None  # the section holding ``Config`` (default: ``name``)
    extra_sections: ClassVar[dict[str, type]] = {}  # further typed config sections: {section name: dataclass}
    own_masking: ClassVar[str | None] = None  # a ``masking.name`` this method implements itself (e.g. adios)

    def __init__(self, cfg: Any, world: World, num_classes: int):
        super().__init__()
        self.cfg, self.world, self.num_classes = cfg, world, num_classes
        self.arch = check_arch(cfg.model.arch)
        self.options = cfg.get(self.config_section or self.name) if self.Config is not None else None
        self.generators: dict[str, torch.Generator] = {}
        self.timer: PhaseTimer = NULL_TIMER
        self.input_filter = InputFilter(dict(NO_FILTER))

    # ------------------------------------------------------------------------------ what to implement

    def forward(self, batch: Any, phase: str = "main") -> StepOutput:
        raise NotImplementedError

    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"method": self.name, "masking": "none", "strategy": None, "mask_branch": None,
                "saliency_source": None, "input_filter": dict(self.input_filter.spec)}

    # ----------------------------------------------------------------------------------- sensible defaults

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return {"main": OptimizerSpec(named, self.cfg.optim, self.cfg.schedule)}

    def train_step(self, runner: StepRunner, batch: Any) -> dict[str, Any]:
        output = runner.forward(batch)
        runner.backward_and_step(output.loss, "main")
        with self.timer("momentum_update"):
            self.after_step(runner)
        return {"loss": output.loss.detach(), **output.metrics}

    def after_step(self, runner: StepRunner) -> None:
        """Called after the optimizer step (MoCo's momentum update)."""

    def attach_dataset(self, files: list[str], build: bool) -> None:
        """Called once with the training files in dataset-index order (e.g. to build a per-image cache;
        ``build`` is True on the main process, the others open what it built)."""

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone()(self.input_filter(images))

    def pictures(self, batch: Any, generator: torch.Generator) -> dict[str, Any] | None:
        return None

    def describe(self) -> list[str]:
        """Lines for the run log (e.g. which shuffle-BN substitute is in use)."""
        return []

    # ------------------------------------------------------------------------------------ RNG handling

    def make_generator(self, name: str, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.world.device)
        generator.manual_seed(seed)
        self.generators[name] = generator
        return generator

    def generator_states(self) -> dict[str, torch.Tensor]:
        return {name: gen.get_state() for name, gen in self.generators.items()}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        for name, state in states.items():
            if name in self.generators:
                self.generators[name].set_state(state.to("cpu") if state.device.type != "cpu" else state)
