"""The ImageNet-100 MoCo linear probe end to end on the toy layout: records, frozen backbone, resume, torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.backbones import expected_trunk_keys
from pretrain.checkpoint import safe_torch_load
from tests.transfer.linear_support import PROBE_OVERRIDES, write_moco_layout
from transfer import records
from transfer.checkpoints import load_backbone
from transfer.classification_data import find_dataset_root, read_imagenet_subset
from transfer.distributed import DistContext
from transfer.eval_transforms import normalization_of
from transfer.frozen_encoder import BackboneChangedError, FrozenEncoder
from transfer.linear import main, run_linear
from transfer.linear_probe import PROBE_CHECKPOINT, PROBE_FC, ProbeSettings, ProbeStateError, evaluate

REPO = Path(__file__).resolve().parents[2]


def _probe(weights, toy_world, out, **kwargs):
    kwargs.setdefault("overrides", PROBE_OVERRIDES)
    return run_linear("imagenet100", weights, data_root=toy_world, config="toy", out=out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def moco_layout_checkpoint(toy_pretrained_checkpoint, tmp_path_factory):
    return write_moco_layout(toy_pretrained_checkpoint, tmp_path_factory.mktemp("moco") / "moco_v2_800ep.pth.tar")


@pytest.fixture(scope="module")
def reference_run(moco_layout_checkpoint, toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_reference")
    return out, _probe(moco_layout_checkpoint, toy_world, out, name="moco-release", preset="toy")


def test_probe_end_to_end_from_a_moco_release(reference_run, moco_layout_checkpoint):
    out, record = reference_run
    assert records.read_record(out / records.record_filename("linear_imagenet100", "moco-release", 0)) == record
    assert record["task"] == "linear_imagenet100"
    # overrides that change the protocol are named in it, so the tables never mix it with the plain toy one
    assert record["protocol"] == ("toy_moco_linear_in100_64px_5ep+preprocess.crop_size=32+preprocess.resize_size=36"
                                  "+probe.batch_size=32+probe.epochs=3+probe.milestones=[1,2]")
    top1, top5 = record["metrics"]["imagenet100_top1"], record["metrics"]["imagenet100_top5"]
    assert 0.0 <= top1 <= top5 <= 100.0
    assert record["model"]["base"] == "external" and record["model"]["name"] == "moco-release"
    extra = record["extra"]
    assert [h["epoch"] for h in extra["history"]] == [1, 2, 3]
    assert [h["lr"] for h in extra["history"]] == pytest.approx([30.0, 3.0, 0.3])  # x0.1 at the milestones
    assert extra["backbone_sanity_check"] == f"{len(expected_trunk_keys('resnet18'))} tensors unchanged" and extra["resumed_from_epoch"] == 0
    assert extra["data"]["images"] == {"train": 360, "val": 72} and extra["preset"] == "toy"
    fc = safe_torch_load(out / PROBE_FC)
    assert fc["fc"]["weight"].shape == (8, 512) and fc["top1"] == top1
    assert record["config"]["probe"]["lr"] == 30.0 and "runtime" not in record["config"]


def test_probe_from_random_init(random_checkpoint_factory, toy_world, tmp_path):
    record = _probe(random_checkpoint_factory(), toy_world, tmp_path, preset="toy")
    assert record["model"]["base"] == "random" and record["model"]["name"] == "random"
    assert 0.0 <= record["metrics"]["imagenet100_top1"] <= record["metrics"]["imagenet100_top5"] <= 100.0


def test_interrupted_probe_resumes_where_it_stopped(reference_run, moco_layout_checkpoint, toy_world, tmp_path):
    _, reference = reference_run

    def stop_after_first_epoch(epoch, stats):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _probe(moco_layout_checkpoint, toy_world, tmp_path, name="moco-release", on_epoch_end=stop_after_first_epoch)
    assert safe_torch_load(tmp_path / PROBE_CHECKPOINT)["epoch"] == 1
    assert not list(tmp_path.glob("linear_imagenet100__*.json"))  # no record for an unfinished run
    resumed = _probe(moco_layout_checkpoint, toy_world, tmp_path, name="moco-release")
    assert resumed["extra"]["resumed_from_epoch"] == 1
    # re-seeded per epoch: the resumed run is the uninterrupted one
    assert resumed["metrics"] == pytest.approx(reference["metrics"])
    assert [h["loss"] for h in resumed["extra"]["history"]] == pytest.approx([h["loss"] for h in reference["extra"]["history"]])


def test_probe_state_of_another_run_is_not_mixed_in(reference_run, moco_layout_checkpoint, toy_world, tmp_path):
    reference_out, _ = reference_run
    (tmp_path / PROBE_CHECKPOINT).write_bytes((reference_out / PROBE_CHECKPOINT).read_bytes())
    with pytest.raises(ProbeStateError, match="another probe run"):
        _probe(moco_layout_checkpoint, toy_world, tmp_path, overrides=[*PROBE_OVERRIDES, "probe.lr=10"])
    record = _probe(moco_layout_checkpoint, toy_world, tmp_path, overrides=[*PROBE_OVERRIDES, "probe.lr=10"], force=True)
    assert record["extra"]["resumed_from_epoch"] == 0 and record["config"]["probe"]["lr"] == 10.0


def test_frozen_encoder_stays_frozen(random_checkpoint_factory):
    encoder = FrozenEncoder(load_backbone(random_checkpoint_factory()))
    encoder.train()
    assert not encoder.training and not encoder.trunk.training  # BN keeps its running statistics
    encoder(torch.randn(4, 3, 32, 32))
    assert encoder.assert_unchanged() == len(expected_trunk_keys("resnet18"))
    encoder.trunk.layer1[0].bn1.running_mean += 0.5
    with pytest.raises(BackboneChangedError, match="layer1.0.bn1.running_mean"):
        encoder.assert_unchanged()


def test_probe_settings_are_checked():
    probe = {"epochs": 100, "batch_size": 256, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "milestones": [80, 60],
             "gamma": 0.1, "init_std": 0.01}
    with pytest.raises(ValueError, match="milestones"):
        ProbeSettings.from_config(probe, {"crop_size": 224, "resize_size": 256})
    with pytest.raises(ValueError, match="larger than resize_size"):
        ProbeSettings.from_config({**probe, "milestones": [60, 80]}, {"crop_size": 224, "resize_size": 200})


def test_probe_command_line(toy_world, random_checkpoint_factory, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "torchrun" in capsys.readouterr().out
    assert main(["--dataset", "imagenet100", "--weights", str(tmp_path / "missing.pth"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--dataset", "imagenet100", "--weights", str(random_checkpoint_factory()), "--data-root",
                 str(toy_world / "caltech101"), "--quiet"]) == 2
    assert "no imagenet100 dataset" in capsys.readouterr().err
    assert main(["--dataset", "imagenet100", "--weights", str(random_checkpoint_factory()), "--config", "nope"]) == 2
    assert "config 'nope' not found" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_under_torchrun_with_two_processes(moco_layout_checkpoint, toy_world, tmp_path):
    """The real multi-process path (gloo on CPU): the sharded validation equals a one-process evaluation."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "transfer.linear", "--dataset", "imagenet100", "--weights", str(moco_layout_checkpoint), "--data-root",
               str(toy_world), "--config", "toy", "--out", str(tmp_path), "--name", "ddp", "--quiet",
               *PROBE_OVERRIDES, "probe.epochs=2", "probe.batch_size=64"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = records.read_record(tmp_path / records.record_filename("linear_imagenet100", "ddp", 0))
    assert record["extra"]["world_size"] == 2 and "x2 processes" in record["device"]
    assert len(record["extra"]["history"]) == 2
    backbone = load_backbone(moco_layout_checkpoint)
    fc = torch.nn.Linear(512, 8)
    fc.load_state_dict(safe_torch_load(tmp_path / PROBE_FC)["fc"])
    data = read_imagenet_subset(find_dataset_root(toy_world, "imagenet100"))
    settings = ProbeSettings(crop_size=32, resize_size=36, batch_size=64)
    top1, top5 = evaluate(FrozenEncoder(backbone), fc, data.splits["val"], settings, normalization_of(backbone.meta),
                          DistContext(), num_workers=0, progress=False)
    assert (top1, top5) == pytest.approx((record["metrics"]["imagenet100_top1"], record["metrics"]["imagenet100_top5"]))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_killed_command_says_how_to_continue_in_one_line(monkeypatch, capsys, tmp_path, signum):
    def killed_mid_run(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr("transfer.linear.run_linear", killed_mid_run)
    before = signal.getsignal(signal.SIGTERM)
    expected = 143 if signum == signal.SIGTERM else 130
    assert main(["--dataset", "imagenet100", "--weights", str(tmp_path / "w.pth")]) == expected
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: no record written; rerun the same command")
    assert signal.getsignal(signal.SIGTERM) == before  # the Python API keeps the caller's handlers


def test_a_resumed_probe_says_so(moco_layout_checkpoint, toy_world, tmp_path, capsys):
    def stop_after_first_epoch(epoch, stats):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _probe(moco_layout_checkpoint, toy_world, tmp_path, on_epoch_end=stop_after_first_epoch)
    capsys.readouterr()
    _probe(moco_layout_checkpoint, toy_world, tmp_path)
    assert f"resuming the linear probe from {tmp_path / PROBE_CHECKPOINT} (epoch 1 of" in capsys.readouterr().out
