"""The training loop end to end on tiny runs: run directory, resume, refusal to overwrite, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain import rundir
from pretrain.checkpoint import load_checkpoint, safe_torch_load
from pretrain.config import load_config
from pretrain.engine import train
from tests.pretrain.engine_helpers import REPO, TOY_CONFIGS, make_image_folder, tiny_overrides

CONFIG = {p.stem: p for p in TOY_CONFIGS}


class Interrupt(Exception):
    pass


def _cfg(name, data_root, out_dir, **extra):
    method = name.split("_")[0]
    return load_config(CONFIG[name], tiny_overrides(data_root, out_dir, method, **extra))


@pytest.fixture(scope="module")
def toy_root(toy_world):
    return toy_world / "imagenet100"


def test_run_directory_has_everything_the_other_parts_read(toy_root, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("mocov2_hp", toy_root, out, **{"knn.enabled": True, "knn.k": 5, "visualize.enabled": True,
                                             "visualize.num_images": 2, "data.limit_train_images": 16})
    final = train(cfg)
    assert final == out / "final.pth"
    for name in ("config.yaml", "checkpoint_last.pth", "final.pth", "metrics.jsonl", "log.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == ["epoch_000.png", "epoch_001.png"]
    checkpoint = load_checkpoint(final)
    meta = checkpoint["meta"]
    assert "training" not in checkpoint and meta["finished"] is True
    assert (meta["method"], meta["masking"], meta["strategy"], meta["mask_branch"], meta["saliency_source"]) == (
        "mocov2", "saliency", "hp", "query", "momentum")
    assert meta["input_filter"] == {"name": "highpass", "kernel_size": 5, "sigma": 1.5}
    assert (meta["arch"], meta["image_size"], meta["epoch"], meta["epochs"]) == ("resnet18", 32, 1, 1)
    assert meta["shuffle_bn"] == "split" and meta["config"]["masking"]["strategy"] == "hp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert 0 <= rows[0]["knn_top1"] <= 100 and 0 <= rows[1]["knn_top1"] <= 100
    assert {"loss", "contrastive_acc", "lr", "fg_ratio", "masked_fraction", "images_per_s"} <= set(rows[1])
    assert "training" in safe_torch_load(out / "checkpoint_last.pth")
    assert "shuffle-BN substitute" in (out / "log.txt").read_text()


def test_finished_run_is_kept_unless_forced(toy_root, tmp_path):
    out = tmp_path / "run"
    train(_cfg("simclr", toy_root, out))
    stamp = (out / "final.pth").stat().st_mtime_ns
    assert train(_cfg("simclr", toy_root, out)) == out / "final.pth"  # same config: nothing to do
    assert (out / "final.pth").stat().st_mtime_ns == stamp
    with pytest.raises(rundir.RunDirError, match="finished run with a different config.*optim.lr"):
        train(_cfg("simclr", toy_root, out, **{"optim.lr": 0.01}))
    train(_cfg("simclr", toy_root, out, **{"optim.lr": 0.01}), force=True)
    assert load_checkpoint(out / "final.pth")["meta"]["config"]["optim"]["lr"] == 0.01


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(toy_root, tmp_path):
    extra = {"train.epochs": 2, "data.limit_train_images": 32, "checkpoint.every_steps": 3,
             "train.deterministic": True}
    reference = train(_cfg("mocov2_hp", toy_root, tmp_path / "a", **extra))

    def crash_at_step_7(trainer):  # 4 steps per epoch: the last checkpoint is mid-epoch 2, after step 6
        if trainer.runner.global_step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg("mocov2_hp", toy_root, tmp_path / "b", **extra), step_hook=crash_at_step_7)
    interrupted = load_checkpoint(tmp_path / "b" / "checkpoint_last.pth")["meta"]
    assert (interrupted["epoch"], interrupted["step_in_epoch"], interrupted["finished"]) == (1, 2, False)
    with pytest.raises(rundir.RunDirError, match="unfinished run"):
        train(_cfg("mocov2_hp", toy_root, tmp_path / "b", resume="never", **extra))
    with pytest.raises(rundir.RunDirError, match="config differs.*optim.lr"):
        train(_cfg("mocov2_hp", toy_root, tmp_path / "b", **{**extra, "optim.lr": 0.5}))
    resumed = train(_cfg("mocov2_hp", toy_root, tmp_path / "b", **extra))
    a, b = load_checkpoint(reference)["backbone"], load_checkpoint(resumed)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = safe_torch_load(tmp_path / "a" / "checkpoint_last.pth")["training"]
    last_b = safe_torch_load(tmp_path / "b" / "checkpoint_last.pth")["training"]
    assert torch.equal(last_a["method"]["queue"], last_b["method"]["queue"])
    assert torch.equal(last_a["method"]["encoder_k.trunk.conv1.weight"], last_b["method"]["encoder_k.trunk.conv1.weight"])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize("name", ["mocov2_hp", "simclr_blur"])
def test_a_few_steps_lower_the_loss(toy_root, tmp_path, name):
    """Training on one fixed batch must fit it: the loss falls step after step."""
    from pretrain import distributed
    from pretrain.augment import to_device_batch
    from pretrain.engine import Trainer

    # the toy configs train with AdamW: 0.003 is a high rate for it (SGD would need about 0.05)
    overrides = {"optim.lr": 0.003, "data.batch_size": 16, "data.limit_train_images": 16}
    if name.startswith("mocov2"):
        overrides["mocov2.queue_size"] = 4096  # mostly random negatives: the batch's own keys barely enter
    trainer = Trainer(_cfg(name, toy_root, tmp_path / "run", **overrides), distributed.World())
    trainer._build_data()
    trainer._build_method()
    trainer._wrap()
    torch.manual_seed(0)
    batch = to_device_batch(next(iter(trainer.loader)), torch.device("cpu"))
    losses = []
    for _ in range(8):
        trainer.runner.set_learning_rates()
        losses.append(float(trainer.method.train_step(trainer.runner, batch)["loss"]))
        trainer.runner.global_step = 0  # keep the learning rate at its peak
    assert losses[-1] < losses[0] - 0.2, losses


def test_unreadable_image_is_skipped_once_with_a_warning_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=40)
    broken = root / "train" / "b" / "img_2.png"
    broken.write_bytes(b"\x89PNG truncated")
    cfg = load_config(CONFIG["mocov2"], tiny_overrides(root, tmp_path / "run", "mocov2", **{
        "data.limit_train_images": "null", "train.epochs": 2, "data.batch_size": 4}))
    final = train(cfg)
    warnings = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if "cannot read image" in line]
    assert len(warnings) == 1 and str(broken) in warnings[0]  # one warning, naming the file, over 2 epochs
    assert load_checkpoint(final)["meta"]["skipped_images"] == 1
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["skipped_images"] == 1


def test_unreadable_image_seen_by_the_knn_monitor_is_warned_about_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=40)
    broken = root / "val" / "a" / "img_1.png"
    broken.write_bytes(b"\x89PNG truncated")
    cfg = load_config(CONFIG["mocov2"], tiny_overrides(root, tmp_path / "run", "mocov2", **{
        "data.limit_train_images": "null", "knn.enabled": True, "knn.k": 3}))
    final = train(cfg)
    warnings = [line for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if "cannot read image" in line]
    assert len(warnings) == 1 and str(broken) in warnings[0]  # evaluated twice (epochs 0 and 1), warned once
    assert load_checkpoint(final)["meta"]["skipped_images"] == 1


def test_cli_help_and_clear_errors_for_bad_input(tmp_path, toy_root, capsys):
    from pretrain.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "torchrun" in help_text and "--force" in help_text
    config = CONFIG["mocov2_hp"]

    def error_of(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    root = make_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "train" / "empty_class").mkdir()
    code, err = error_of(config, f"data.root={root}", f"out_dir={tmp_path / 'o2'}")
    assert code == 2 and "empty_class holds no images" in err
    vit = tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4), "blocks.0.mlp.fc1.weight": torch.zeros(4, 4)}, vit)
    code, err = error_of(config, *tiny_overrides(toy_root, tmp_path / "o3"), "saliency.source=frozen",
                         f"saliency.checkpoint={vit}")
    assert code == 2 and "does not hold a torchvision ResNet" in err
    code, err = error_of(config, "data.root=/x", "train.epoch=3")
    assert code == 2 and "epoch" in err
    # The real command line: one line on stderr, exit status 2, no traceback.
    missing = subprocess.run([sys.executable, "-m", "pretrain", str(config), f"data.root={tmp_path / 'nope'}",
                              f"out_dir={tmp_path / 'o1'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert missing.returncode == 2 and "data directory not found" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("mode", ["forward", "cache"])
def test_frozen_saliency_source_trains_and_is_recorded(toy_root, tmp_path, random_checkpoint_factory, mode):
    weights = random_checkpoint_factory("resnet18", seed=2)
    extra = {"saliency.source": "frozen", "saliency.checkpoint": str(weights), "data.limit_train_images": 16}
    if mode == "forward":
        extra["saliency.query_map"] = "forward"
    else:
        extra.update({"saliency.cache_dir": str(tmp_path / "cache"), "saliency.cache_image_size": 64})
    meta = load_checkpoint(train(_cfg("mocov2_blur", toy_root, tmp_path / "run", **extra)))["meta"]
    assert meta["saliency_source"] == "frozen"
    assert meta["saliency_checkpoint"] == str(weights) and len(meta["saliency_checkpoint_sha256"]) == 64
    if mode == "forward":
        assert meta["saliency_query_map"] == "forward" and "saliency_cache" not in meta
    else:
        cache = meta["saliency_cache"]
        assert cache.startswith(str(tmp_path / "cache")) and meta["saliency_cache_image_size"] == 64
        assert json.loads((tmp_path / "cache" / cache.rsplit("/", 1)[-1] / "meta.json").read_text())["count"] == 16


def test_every_minutes_checkpoints_mid_epoch(toy_root, tmp_path):
    extra = {"train.epochs": 1, "data.limit_train_images": 32, "checkpoint.every_minutes": 1e-9}

    def crash_at_step_3(trainer):  # the hook runs after the step's checkpoint
        if trainer.runner.global_step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg("mocov2", toy_root, tmp_path / "run", **extra), step_hook=crash_at_step_3)
    meta = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 3)
