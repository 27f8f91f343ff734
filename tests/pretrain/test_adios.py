"""ADIOS on MoCo v2 and SimCLR: the min-max step's directions, ADIOS-s, checkpoints of both networks."""

from __future__ import annotations

import pytest
import torch

from pretrain import distributed
from pretrain.augment import to_device_batch
from pretrain.checkpoint import load_checkpoint, safe_torch_load
from pretrain.config import ConfigError, load_config
from pretrain.engine import Trainer, train
from pretrain.losses import contrastive_loss, moco_logits
from pretrain.methods.adios import parameters_frozen
from pretrain.occlusion import occlude
from tests.pretrain.engine_helpers import REPO, tiny_overrides

TOY = REPO / "configs" / "pretrain" / "toy"
SMALL = {"adios.num_masks": 2, "adios.width": 4, "adios.bottleneck_dim": 16}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def toy_root(toy_world):
    return toy_world / "imagenet100"


def _cfg(name, data_root, out_dir, **extra):
    return load_config(TOY / f"{name}.yaml", tiny_overrides(data_root, out_dir, name.split("_")[0], **{**SMALL, **extra}))


def _built(cfg):
    trainer = Trainer(cfg, distributed.World())
    trainer._build_data()
    trainer._build_method()
    trainer._wrap()
    return trainer


def _flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# The occlusion network's softmax masks make the SSL loss very curved in its weights: a step stays in
# the first-order regime (loss change ~ lr * |grad|^2, measured) only for a tiny mask learning rate.
PLAIN_SGD = {"optim.name": "sgd", "optim.lr": 0.005, "optim.momentum": 0.0, "optim.weight_decay": 0.0,
             "schedule.name": "constant", "schedule.warmup_epochs": 0, "adios.mask_optim.lr": 1e-6,
             "adios.mask_optim.momentum": 0.0, "adios.mask_optim.weight_decay": 0.0,
             "adios.single_mask": False, "adios.alpha_sparsity": 0.0, "data.batch_size": 8,
             "data.limit_train_images": 8}


@pytest.mark.parametrize("name", ["mocov2_adios", "simclr_adios"])
def test_encoder_step_lowers_and_occlusion_step_raises_the_ssl_loss(toy_root, tmp_path, name):
    torch.manual_seed(0)  # the random initial queue too: the outcome must not depend on earlier tests
    trainer = _built(_cfg(name, toy_root, tmp_path, **PLAIN_SGD))
    method, runner = trainer.method, trainer.runner
    torch.manual_seed(0)
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    runner.set_learning_rates()
    inputs = method.step_inputs(runner, batch)
    encoder = method.backbone()
    occluder_params = list(method.occluder.parameters())
    encoder_params = [p for p in method.parameters() if p.requires_grad and all(p is not q for q in occluder_params)]

    def loss(phase):
        with torch.no_grad():
            return float(runner.forward(inputs, phase).loss)

    # Encoder half: the SSL loss (summed over the masked views) goes down; the occlusion net is untouched.
    grads = torch.autograd.grad(runner.forward(inputs, "encoder").loss, encoder_params, allow_unused=True)
    before, occluder_before = [p.detach().clone() for p in encoder_params], _flat(method.occluder)
    ssl_before = loss("encoder")
    method.encoder_step(runner, inputs)
    step = sum(float((g * (p.detach() - b)).sum()) for g, p, b in zip(grads, encoder_params, before) if g is not None)
    assert step < 0  # the update points down the SSL loss's gradient
    assert loss("encoder") < ssl_before
    assert torch.equal(_flat(method.occluder), occluder_before)

    # Occlusion half (alpha_sparsity 0: its objective is the SSL loss itself): the SSL loss goes up;
    # the encoder's weights and BN statistics are untouched.
    with parameters_frozen(method._trained_encoders()):
        masker_loss = runner.forward(inputs, "masker").loss  # = -(SSL loss)
        grads = torch.autograd.grad(masker_loss, occluder_params)
    before = [p.detach().clone() for p in occluder_params]
    encoder_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    ssl_before = -loss("masker")
    output = method.masker_step(runner, inputs)
    ascent = sum(float((g * (p.detach() - b)).sum()) for g, p, b in zip(grads, occluder_params, before))
    assert ascent < 0  # a descent step on -SSL: the occlusion network moved up the SSL loss
    assert -loss("masker") > ssl_before
    assert all(torch.equal(encoder_state[k], v) for k, v in encoder.state_dict().items())
    assert all(p.requires_grad for p in encoder_params)  # unfrozen again after the occlusion half
    assert float(output.metrics["masker_ssl_loss"]) == pytest.approx(ssl_before, rel=1e-5)


def test_sparsity_penalty_enters_the_occlusion_objective(toy_root, tmp_path):
    trainer = _built(_cfg("simclr_adios", toy_root, tmp_path, **{**PLAIN_SGD, "adios.alpha_sparsity": 0.7}))
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    metrics = trainer.method.train_step(trainer.runner, batch)
    assert float(metrics["masker_objective"]) == pytest.approx(
        float(metrics["masker_ssl_loss"]) - 0.7 * float(metrics["sparsity_penalty"]), rel=1e-5)
    assert float(metrics["sparsity_penalty"]) >= 2.0  # two masks, each term >= 1
    assert 0 < float(metrics["mask_fraction_min"]) <= 0.5 <= float(metrics["mask_fraction_max"]) < 1
    assert float(metrics["masked_fraction"]) == pytest.approx(0.5, abs=1e-5)  # all masks, partitioning


def test_adios_s_encodes_one_masked_view_per_sample(toy_root, tmp_path):
    counts = {}
    for single in (True, False):
        trainer = _built(_cfg("mocov2_adios", toy_root, tmp_path / str(single),
                              **{"adios.single_mask": single, "adios.num_masks": 3}))
        method = trainer.method
        calls: list[int] = []
        method.encoder_q.register_forward_hook(lambda module, args, out, seen=calls: seen.append(args[0].shape[0]))
        batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
        inputs = method.step_inputs(trainer.runner, batch)
        assert (inputs.choice is not None) == single
        method.encoder_step(trainer.runner, inputs)
        counts[single] = len(calls)
        if single:
            assert inputs.choice.min() >= 0 and inputs.choice.max() < 3
    assert counts == {True: 1, False: 3}


def test_moco_port_enqueues_the_unmasked_keys_once_per_step(toy_root, tmp_path):
    trainer = _built(_cfg("mocov2_adios", toy_root, tmp_path, **{"adios.single_mask": False, "adios.num_masks": 3,
                                                                "mocov2.queue_init": "empty"}))
    method = trainer.method
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    shuffle_state = method.shuffle_generator.get_state()  # the same key-batch shuffle (split-BN) in both calls
    keys = method.step_inputs(trainer.runner, batch).keys
    method.shuffle_generator.set_state(shuffle_state)
    method.train_step(trainer.runner, batch)
    assert int(method.queue_filled) == int(method.queue_ptr) == batch.size  # once, not once per mask
    torch.testing.assert_close(method.queue[:batch.size], keys)  # the keys of the unmasked key view


def test_symmetric_moco_port_also_contrasts_the_clean_view_with_each_masked_key(toy_root, tmp_path):
    """mocov2.symmetric with ADIOS (ADIOS's BYOL form): per mask, the mean of masked-query -> clean-key and
    clean-query -> masked-key; the occlusion half keeps the first direction only (the second has no mask
    gradient)."""
    trainer = _built(_cfg("mocov2_adios", toy_root, tmp_path, **{
        "mocov2.symmetric": True, "mocov2.shuffle_bn": "none", "adios.single_mask": False,
        "adios.alpha_sparsity": 0.0}))
    method, runner = trainer.method, trainer.runner
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    inputs = method.step_inputs(runner, batch)

    def infonce(queries, keys, negatives):
        logits, labels = moco_logits(queries, keys, negatives[0], method.temperature, not_negative=negatives[1])
        return contrastive_loss(logits, labels)

    with torch.no_grad():
        query = method.input_filter(batch.query)
        masks = method.occluder(query)
        clean_queries = method.encoder_q(method.input_filter(batch.key))
        forward, reverse = [], []
        for n in range(masks.shape[1]):
            view = occlude(query, masks[:, n])
            forward.append(infonce(method.encoder_q(view), inputs.keys, inputs.negatives))
            masked_keys = method.encoder_k(view)
            negatives = method._queue_negatives(batch.index, *method._gather_batch(masked_keys, batch.index))
            reverse.append(infonce(clean_queries, masked_keys, negatives))
        encoder_loss = runner.forward(inputs, "encoder").loss
        masker_loss = runner.forward(inputs, "masker").loss
    expected = sum((f + r) / 2 for f, r in zip(forward, reverse))
    torch.testing.assert_close(encoder_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masker_loss, -sum(forward), rtol=1e-5, atol=1e-5)
    assert all(abs(float(f - r)) > 1e-4 for f, r in zip(forward, reverse))  # two distinct directions
    queued = int(method.queue_filled)
    method.train_step(runner, batch)
    assert int(method.queue_filled) == min(queued + batch.size, method.queue.shape[0])  # clean keys, once
    assert any("symmetric loss" in line for line in method.describe())


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(toy_root, tmp_path):
    extra = {"train.epochs": 2, "data.limit_train_images": 24, "checkpoint.every_steps": 2,
             "train.deterministic": True, "adios.single_mask": True}
    reference = train(_cfg("mocov2_adios", toy_root, tmp_path / "a", **extra))

    def crash_at_step_4(trainer):
        if trainer.runner.global_step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg("mocov2_adios", toy_root, tmp_path / "b", **extra), step_hook=crash_at_step_4)
    interrupted = load_checkpoint(tmp_path / "b" / "checkpoint_last.pth")["meta"]
    assert (interrupted["epoch"], interrupted["step_in_epoch"]) == (1, 1)  # mid-epoch, after step 4
    resumed = train(_cfg("mocov2_adios", toy_root, tmp_path / "b", **extra))
    a, b = load_checkpoint(reference)["backbone"], load_checkpoint(resumed)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = safe_torch_load(tmp_path / "a" / "checkpoint_last.pth")["training"]
    last_b = safe_torch_load(tmp_path / "b" / "checkpoint_last.pth")["training"]
    occluder_keys = [k for k in last_a["method"] if k.startswith("occluder.")]
    assert occluder_keys and all(torch.equal(last_a["method"][k], last_b["method"][k]) for k in occluder_keys)
    assert torch.equal(last_a["method"]["queue"], last_b["method"]["queue"])
    assert set(last_a["runner"]["optimizers"]) == {"main", "masker"}
    masker_a, masker_b = last_a["runner"]["optimizers"]["masker"], last_b["runner"]["optimizers"]["masker"]
    assert masker_a["state"] and all(torch.equal(masker_a["state"][i]["momentum_buffer"],
                                                 masker_b["state"][i]["momentum_buffer"]) for i in masker_a["state"])
    meta = load_checkpoint(resumed)["meta"]
    assert (meta["method"], meta["masking"], meta["mask_branch"], meta["strategy"]) == ("mocov2", "adios", "query", None)
    assert meta["adios"]["single_mask"] is True and meta["input_filter"] == {"name": "none"}
    assert not any(k.startswith(("occluder", "encoder_k", "fc.")) for k in a)  # the export is the trunk only


def test_adios_configs_refuse_what_adios_cannot_do(toy_root, tmp_path):
    with pytest.raises(ConfigError, match="does its own masking"):
        _cfg("mocov2_adios", toy_root, tmp_path, **{"masking.name": "saliency"})
    with pytest.raises(ConfigError, match="masking.name must be 'none' or one of"):
        load_config(TOY / "mocov2.yaml", tiny_overrides(toy_root, tmp_path, "mocov2", **{"masking.name": "adios"}))
    with pytest.raises(ValueError, match="masks the query view only"):
        _built(_cfg("simclr_adios", toy_root, tmp_path, **{"masking.branch": "key"}))
