"""Optimizers and learning-rate schedules of the pretraining methods.

* ``sgd``: torch SGD with momentum, weight decay on every parameter (as MoCo v2's reference code).
* ``lars``: SGD whose step for each weight tensor is scaled by the LARS trust ratio
  ``eta * ||w|| / (||g|| + wd * ||w||)`` (You et al. 2017); with ``clip`` the adapted rate is capped at
  the global rate (``min(trust / lr, 1)``), the usual SimCLR-on-ImageNet-100 recipe. With ``lars_exclude_bias_and_norm`` biases and norm parameters get neither adaptation nor
  weight decay (SimCLR practice).
* ``adamw``: torch AdamW (MoCo v3's optimizer; betas from ``adam_betas``); with
  ``lars_exclude_bias_and_norm`` biases and norm parameters get no weight decay. The toy configs use it:
  at a few hundred steps from scratch it is the optimizer under which the toy runs learn (docs/pretraining.md).
* Schedules are a function of the global step (cosine with optional linear warm-up), so a resumed run
  continues exactly without a scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 clip: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                decay = group["weight_decay"]
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = group["eta"] * w_norm / (g_norm + decay * w_norm + 1e-12)
                    if group["clip"]:  # the adapted rate never exceeds the global one
                        trust = torch.clamp(trust / max(group["lr"], 1e-12), max=1.0)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    grad = grad.add(p, alpha=decay) * trust
                elif decay:
                    grad = grad.add(p, alpha=decay)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def is_bias_or_norm(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim <= 1 or name.endswith(".bias")


def _split_bias_and_norm(params: list[tuple[str, nn.Parameter]], exclude: bool
                         ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and norm parameters); with ``exclude`` False everything is in the first list."""
    excluded = [exclude and is_bias_or_norm(n, p) for n, p in params]
    return ([p for (_, p), out in zip(params, excluded) if not out],
            [p for (_, p), out in zip(params, excluded) if out])


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], optim_cfg) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    if not params:
        raise ValueError("the method has no trainable parameters for this optimizer")
    lr, wd = float(optim_cfg.lr), float(optim_cfg.weight_decay)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD([p for _, p in params], lr=lr, momentum=float(optim_cfg.momentum),
                               weight_decay=wd, nesterov=bool(optim_cfg.nesterov))
    if optim_cfg.name == "lars":
        adapted, plain = _split_bias_and_norm(params, bool(optim_cfg.lars_exclude_bias_and_norm))
        groups = [{"params": adapted}]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0, "lars": False})
        return LARS(groups, lr=lr, momentum=float(optim_cfg.momentum), weight_decay=wd,
                    eta=float(optim_cfg.lars_eta))
    if optim_cfg.name == "adamw":
        decayed, undecayed = _split_bias_and_norm(params, bool(optim_cfg.lars_exclude_bias_and_norm))
        groups = [{"params": decayed}] + ([{"params": undecayed, "weight_decay": 0.0}] if undecayed else [])
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(float(b) for b in optim_cfg.adam_betas), weight_decay=wd)
    raise ValueError(f"unknown optimizer '{optim_cfg.name}': choose sgd, lars or adamw")


def lr_at(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, schedule_cfg) -> float:
    """Learning rate for a global step (0-based) of ``total_steps``."""
    warmup = int(round(float(schedule_cfg.warmup_epochs) * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule_cfg.name == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    final = base_lr * float(schedule_cfg.final_lr_fraction)
    return final + (base_lr - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
