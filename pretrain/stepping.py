"""The mechanics of one optimization step, shared by every method.

A method's ``train_step`` receives a :class:`StepRunner` and uses it to run its forward pass (through
the DDP wrapper, under autocast), to back-propagate a loss into one of its optimizers (AMP scaler,
gradient clipping) and to time phases. A method with several optimizers (e.g. ADIOS's occlusion
network) calls ``backward_and_step`` once per optimizer with its own loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pretrain.optim import build_optimizer, lr_at
from pretrain.timing import NULL_TIMER, PhaseTimer


@dataclass
class StepOutput:
    """What a method's forward returns: the loss to minimize and scalar metrics (tensors or floats)."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    """One optimizer of a method: its (named) parameters and the config sections that set it up."""

    parameters: list[tuple[str, nn.Parameter]]
    optim: Any  # an ``optim:``-like section (name, lr, momentum, weight_decay, ...)
    schedule: Any  # a ``schedule:``-like section (name, warmup_epochs, final_lr_fraction)


def amp_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None means full fp32 (always on CPU)."""
    if device.type != "cuda" or requested == "off":
        return None
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[requested]


class StepRunner:
    def __init__(self, method: nn.Module, wrapped: nn.Module, specs: dict[str, OptimizerSpec], *,
                 device: torch.device, amp: torch.dtype | None, total_steps: int, steps_per_epoch: int,
                 timer: PhaseTimer = NULL_TIMER):
        self.method, self.wrapped = method, wrapped
        self.specs = specs
        self.device, self.amp = device, amp
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.timer = timer
        self.global_step = 0
        self.optimizers = {name: build_optimizer(spec.parameters, spec.optim) for name, spec in specs.items()}
        fp16 = amp == torch.float16
        self.scalers = {name: torch.amp.GradScaler("cuda", enabled=fp16) for name in specs}

    # ------------------------------------------------------------------------------------------ forward

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def forward(self, batch: Any, phase: str = "main") -> StepOutput:
        """The method's forward through the DDP wrapper (so gradients are synchronized) under autocast."""
        self.method.timer = self.timer
        with self.autocast():
            return self.wrapped(batch, phase=phase)

    # ----------------------------------------------------------------------------------------- backward

    def backward_and_step(self, loss: torch.Tensor, name: str = "main") -> None:
        optimizer, scaler = self.optimizers[name], self.scalers[name]
        optimizer.zero_grad(set_to_none=True)
        with self.timer("backward"):
            scaler.scale(loss).backward()
        with self.timer("optimizer"):
            clip = self.specs[name].optim.get("grad_clip")
            if clip:
                scaler.unscale_(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            scaler.step(optimizer)
            scaler.update()

    def set_learning_rates(self) -> dict[str, float]:
        """Set every optimizer's lr for the current global step; returns them (for logging)."""
        rates = {}
        for name, optimizer in self.optimizers.items():
            spec = self.specs[name]
            lr = lr_at(self.global_step, self.total_steps, self.steps_per_epoch, float(spec.optim.lr), spec.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            rates[name] = lr
        return rates

    @property
    def progress(self) -> float:
        """Fraction of training done (0 at the first step): for schedules a method keeps itself."""
        return self.global_step / max(1, self.total_steps)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.optimizers) - set(state.get("optimizers", {}))
        if missing:
            raise KeyError(f"checkpoint has no state for optimizer(s) {sorted(missing)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            scaler_state = state.get("scalers", {}).get(name)
            if scaler_state:
                self.scalers[name].load_state_dict(scaler_state)
        self.global_step = int(state["global_step"])
