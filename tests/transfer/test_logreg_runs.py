"""Caltech-101 and Flowers-102 end to end on the toy layouts: records, split, feature cache, input filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pretrain.backbones import build_resnet
from pretrain.checkpoint import make_meta, save_checkpoint
from pretrain.filters import highpass
from tests.transfer.linear_support import CALTECH_OVERRIDES, LOGREG_OVERRIDES, TEST_SIZE, overrides_for
from transfer import records
from transfer.classification_data import find_dataset_root, read_flowers102
from transfer.eval_transforms import center_crop_transform, normalization_of
from transfer.feature_cache import FeatureCache, feature_key
from transfer.linear import SPLIT_FILE, LinearEvalError, main, run_linear


def _run(dataset, weights, toy_world, out, **kwargs):
    kwargs.setdefault("overrides", overrides_for(dataset))
    return run_linear(dataset, weights, data_root=toy_world, config="toy", out=out, progress=False, **kwargs)


@pytest.mark.parametrize("dataset", ["caltech101", "flowers102"])
def test_logreg_end_to_end_from_pretrained_and_random(dataset, toy_world, toy_pretrained_checkpoint,
                                                      random_checkpoint_factory, tmp_path):
    metric = {"caltech101": "caltech101_acc", "flowers102": "flowers102_acc"}[dataset]
    results = {}
    for label, weights in (("pretrained", toy_pretrained_checkpoint), ("random", random_checkpoint_factory())):
        record = _run(dataset, weights, toy_world, tmp_path / label, preset="toy")
        path = tmp_path / label / records.record_filename(f"logreg_{dataset}", record["model"]["name"], 0)
        assert records.read_record(path) == record
        assert record["task"] == f"logreg_{dataset}" and record["status"] == "ok"
        assert record["protocol"].startswith(f"toy_ericsson_logreg_{dataset}_64px+logreg.wd_count=12+preprocess.crop_size=32")
        assert record["extra"]["preset"] == "toy"
        assert 0.0 <= record["metrics"][metric] <= 100.0
        assert record["weights"]["sha256"] and record["config"]["preprocess"]["crop_size"] == TEST_SIZE
        logreg = record["extra"]["logreg"]
        assert logreg["best_C"] == pytest.approx(1.0 / logreg["best_wd"])
        result = json.loads((tmp_path / label / "logreg_result.json").read_text())
        assert len(result["val_scores"]) == 12 and result["test_score"] == record["metrics"][metric]
        assert record["extra"]["feature_dim"] == 512
        results[label] = record
    assert results["pretrained"]["model"]["base"] == "supervised" and results["random"]["model"]["base"] == "random"
    assert results["pretrained"]["weights"]["sha256"] != results["random"]["weights"]["sha256"]


def test_caltech_split_is_written_and_reused(toy_world, random_checkpoint_factory, tmp_path):
    weights = random_checkpoint_factory()
    first = _run("caltech101", weights, toy_world, tmp_path / "a")
    split = json.loads((tmp_path / "a" / SPLIT_FILE).read_text())
    assert split["train_per_class"] == 8 and split["seed"] == 0 and len(split["classes"]) == 9
    assert len(split["train"]) == 9 * 6 and len(split["val"]) == 9 * 2
    assert first["extra"]["data"]["split_file"] == str(tmp_path / "a" / SPLIT_FILE)
    _run("caltech101", weights, toy_world, tmp_path / "b")
    assert json.loads((tmp_path / "b" / SPLIT_FILE).read_text()) == split  # fixed seed: the same split
    reused = _run("caltech101", weights, toy_world, tmp_path / "c",
                  overrides=[*CALTECH_OVERRIDES, f"runtime.split_file={tmp_path / 'a' / SPLIT_FILE}"])
    assert reused["metrics"] == first["metrics"] and reused["extra"]["data"]["split_source"].endswith(SPLIT_FILE)
    with pytest.raises(Exception, match="drawn with train_per_class=8"):
        _run("caltech101", weights, toy_world, tmp_path / "d",
             overrides=[*CALTECH_OVERRIDES, "split.train_per_class=7", f"runtime.split_file={tmp_path / 'a' / SPLIT_FILE}"])


def test_feature_cache_is_reused_and_keyed(toy_world, toy_pretrained_checkpoint, random_checkpoint_factory, tmp_path):
    cache = tmp_path / "cache"
    first = _run("flowers102", toy_pretrained_checkpoint, toy_world, tmp_path / "a", cache_dir=cache)
    assert not any(entry["cached"] for entry in first["extra"]["feature_cache"].values())
    assert len(list(cache.glob("flowers102_*.npz"))) == 3
    again = _run("flowers102", toy_pretrained_checkpoint, toy_world, tmp_path / "b", cache_dir=cache)
    assert all(entry["cached"] for entry in again["extra"]["feature_cache"].values())
    assert again["metrics"] == first["metrics"] and again["extra"]["backbone_sanity_check"] == "features from cache"
    other_weights = _run("flowers102", random_checkpoint_factory(), toy_world, tmp_path / "c", cache_dir=cache)
    other_size = _run("flowers102", toy_pretrained_checkpoint, toy_world, tmp_path / "d", cache_dir=cache,
                      overrides=[*LOGREG_OVERRIDES, "preprocess.resize_size=40"])
    for run in (other_weights, other_size):
        assert not any(entry["cached"] for entry in run["extra"]["feature_cache"].values())
    assert len(list(cache.glob("flowers102_*.npz"))) == 9
    # a damaged cache file is recomputed, not trusted
    victim = next(iter(first["extra"]["feature_cache"].values()))["file"]
    with open(victim, "r+b") as handle:
        handle.truncate(100)
    healed = _run("flowers102", toy_pretrained_checkpoint, toy_world, tmp_path / "e", cache_dir=cache)
    assert healed["metrics"] == first["metrics"]
    assert [e["cached"] for e in healed["extra"]["feature_cache"].values()].count(False) == 1


def test_feature_cache_key_covers_every_input(tmp_path):
    base = dict(weights_sha256="a" * 64, arch="resnet18", dataset="flowers102", split="train", data_fingerprint="f",
                preprocessing={"resize": 64}, input_filter={"name": "none"})
    cache = FeatureCache(tmp_path)
    cache.save(feature_key(**base), np.ones((2, 3), np.float32), np.array([0, 1]))
    assert cache.load(feature_key(**base)) is not None
    for field, value in (("weights_sha256", "b" * 64), ("arch", "resnet50"), ("split", "val"), ("data_fingerprint", "g"),
                         ("preprocessing", {"resize": 72}), ("input_filter", {"name": "highpass", "kernel_size": 11,
                                                                               "sigma": 5.0})):
        assert cache.load(feature_key(**{**base, field: value})) is None, field


def test_highpass_checkpoint_features_are_filtered(toy_world, tmp_path):
    torch.manual_seed(3)
    model = build_resnet("resnet18").eval()
    from pretrain.backbones import trunk_state_dict

    weights = tmp_path / "hp.pth"
    save_checkpoint(weights, trunk_state_dict(model), make_meta(arch="resnet18", method="mocov2", masking="saliency",
                                                              strategy="hp", mask_branch="query", input_filter="highpass"))
    record = _run("flowers102", weights, toy_world, tmp_path / "run")
    assert record["model"]["input_filter"] == {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    assert record["extra"]["input_filter"]["name"] == "highpass"
    assert record["model"]["name"] == "mocov2+saliency+hp"
    stored = np.load(record["extra"]["feature_cache"]["test"]["file"])["features"]
    data = read_flowers102(find_dataset_root(toy_world, "flowers102"))
    transform = center_crop_transform(TEST_SIZE, TEST_SIZE, "bicubic", normalization_of({}))
    from transfer.classification_data import load_rgb

    image = transform(load_rgb(data.root / data.splits["test"].paths[0]))[None]
    with torch.no_grad():
        filtered, plain = model(highpass(image)), model(image)
    assert np.allclose(stored[0], filtered[0].numpy(), atol=1e-4)
    assert not np.allclose(stored[0], plain[0].numpy(), atol=1e-2)


def test_finished_run_is_skipped_unless_forced(toy_world, random_checkpoint_factory, tmp_path, monkeypatch):
    weights = random_checkpoint_factory()
    first = _run("flowers102", weights, toy_world, tmp_path)
    import transfer.logreg_eval as logreg_eval

    def explode(*args, **kwargs):
        raise AssertionError("a valid record must be reused, not recomputed")

    monkeypatch.setattr(logreg_eval, "evaluate_logreg", explode)
    assert _run("flowers102", weights, toy_world, tmp_path) == first
    with pytest.raises(AssertionError, match="must be reused"):
        _run("flowers102", weights, toy_world, tmp_path, force=True)
    with pytest.raises(LinearEvalError, match="other weights or another config"):
        _run("flowers102", weights, toy_world, tmp_path, overrides=[*LOGREG_OVERRIDES, "logreg.max_iter=50"])


def test_bad_input_fails_before_any_work(toy_world, random_checkpoint_factory, tmp_path, capsys):
    weights = random_checkpoint_factory()
    flowers = tmp_path / "data" / "flowers-102"
    flowers.mkdir(parents=True)
    (flowers / "jpg").mkdir()
    out = tmp_path / "out"
    code = main(["--dataset", "flowers102", "--weights", str(weights), "--data-root", str(tmp_path / "data"),
                 "--config", "toy", "--out", str(out), "--quiet"])
    assert code == 2
    message = capsys.readouterr().err
    assert "imagelabels.mat is missing" in message and message.count("\n") == 1
    assert not (out / "features").exists()
    vit = tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, vit)
    assert main(["--dataset", "caltech101", "--weights", str(vit), "--data-root", str(toy_world), "--quiet"]) == 2
    assert "cannot evaluate" in capsys.readouterr().err
    assert main(["--dataset", "caltech101", "--weights", str(weights), "--data-root", str(toy_world), "--config", "toy",
                 "--out", str(out), "--quiet", "split.nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["--dataset", "caltech101", "--weights", str(weights), "--data-root", str(toy_world), "--config", "toy",
                 "--out", str(out), "--quiet"]) == 2  # 30 per class is more than the test world has
    assert "lower split.train_per_class" in capsys.readouterr().err
