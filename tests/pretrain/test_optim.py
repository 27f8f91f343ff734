"""Learning-rate schedules and the LARS update rule."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.optim import LARS, build_optimizer, lr_at


def test_cosine_with_warmup():
    schedule = OmegaConf.create({"name": "cosine", "warmup_epochs": 1, "final_lr_fraction": 0.0})
    rates = [lr_at(step, 40, 10, 1.0, schedule) for step in range(40)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert rates[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    constant = OmegaConf.create({"name": "constant", "warmup_epochs": 0, "final_lr_fraction": 0.0})
    assert lr_at(33, 40, 10, 0.3, constant) == 0.3


def _layer_with_gradients():
    """A weight and a bias with random values and gradients, plus copies of all four."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    return weight, bias, (weight.detach().clone(), weight.grad.clone(), bias.detach().clone(), bias.grad.clone())


def test_lars_step_matches_the_trust_ratio_formula():
    weight, bias, (w0, g0, b0, gb0) = _layer_with_gradients()
    cfg = OmegaConf.create({"name": "lars", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2, "lars_eta": 0.02,
                            "lars_exclude_bias_and_norm": True, "nesterov": False})
    optimizer = build_optimizer([("layer.weight", weight), ("layer.bias", bias)], cfg)
    assert isinstance(optimizer, LARS)
    optimizer.step()
    trust = 0.02 * w0.norm() / (g0.norm() + 1e-2 * w0.norm())
    expected = w0 - 0.5 * (g0 + 1e-2 * w0) * min(trust / 0.5, 1.0)
    assert torch.allclose(weight, expected, atol=1e-6)
    assert torch.allclose(bias, b0 - 0.5 * gb0, atol=1e-6)  # excluded: plain SGD, no decay


def test_adamw_decays_weights_but_not_biases_and_takes_adam_steps():
    weight, bias, (w0, g0, b0, gb0) = _layer_with_gradients()
    cfg = OmegaConf.create({"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "adam_betas": [0.9, 0.999],
                            "lars_exclude_bias_and_norm": True})
    optimizer = build_optimizer([("layer.weight", weight), ("layer.bias", bias)], cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    optimizer.step()
    # Adam's first step moves each entry by lr in the direction of -grad (bias-corrected m / sqrt(v) = sign)
    assert torch.allclose(weight, w0 * (1 - 0.01 * 0.1) - 0.01 * g0.sign(), atol=1e-6)
    assert torch.allclose(bias, b0 - 0.01 * gb0.sign(), atol=1e-6)


def test_unknown_optimizer_names_the_choices():
    cfg = OmegaConf.create({"name": "adam", "lr": 0.1, "weight_decay": 0.0})
    with pytest.raises(ValueError, match="sgd, lars or adamw"):
        build_optimizer([("w", torch.nn.Parameter(torch.ones(2)))], cfg)
