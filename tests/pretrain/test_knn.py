"""The weighted kNN monitor against a direct computation, and on a folder with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain import distributed
from pretrain.config import load_config
from pretrain.knn import KnnMonitor, knn_accuracy, weighted_knn_predict
from tests.pretrain.engine_helpers import REPO, TOY_CONFIGS, make_image_folder


def test_weighted_votes_match_direct_formula():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(30, 6, generator=g), dim=1)
    labels = torch.randint(0, 3, (30,), generator=g)
    query = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    scores = weighted_knn_predict(query, bank, labels, 3, k=5, temperature=0.1)
    for i in range(4):
        sims = bank @ query[i]
        top = sims.argsort(descending=True)[:5]
        expected = torch.zeros(3)
        for j in top:
            expected[labels[j]] += torch.exp(sims[j] / 0.1)
        assert torch.allclose(scores[i], expected, rtol=1e-5)


def test_accuracy_on_separable_features():
    bank = F.normalize(torch.eye(3).repeat(4, 1) + 0.01 * torch.randn(12, 3), dim=1)
    labels = torch.arange(3).repeat(4)
    result = knn_accuracy(bank[:3], labels[:3], bank, labels, 3, k=4)
    assert result == {"knn_top1": 100.0}


def test_monitor_scores_a_feature_that_knows_the_class(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, {"a": 5, "b": 5, "c": 5}, size=36)
    # Recolour each class so the mean colour identifies it.
    from PIL import Image

    for index, name in enumerate("abc"):
        for split in ("train", "val"):
            for path in (root / split / name).glob("*.png"):
                pixels = torch.zeros(36, 36, 3, dtype=torch.uint8)
                pixels[..., index] = 255
                Image.fromarray(pixels.numpy()).save(path)
    cfg = load_config(TOY_CONFIGS[0], [f"data.root={root}", "augment.image_size=32", "knn.k=3", "data.num_workers=0"])
    monitor = KnnMonitor(cfg, distributed.World())
    result = monitor.evaluate(lambda images: images.mean(dim=(2, 3)))
    assert result["knn_top1"] == pytest.approx(100.0)


def test_knn_command_scores_a_random_initialisation(tmp_path, capsys):
    from pretrain.knn import main

    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=36)
    code = main([str(TOY_CONFIGS[0]), "--random", f"data.root={root}", "augment.image_size=32", "knn.k=3",
                 "data.num_workers=0"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("knn_top1=")
    assert 0 <= float(out.split()[0].split("=")[1]) <= 100


def test_knn_random_baseline_sees_the_configs_input_filter_like_the_monitors_epoch_zero(tmp_path, capsys):
    from pretrain.knn import main

    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=36)
    common = ["--random", f"data.root={root}", "augment.image_size=32", "knn.k=3", "data.num_workers=0"]
    filters = {}
    for name in ("mocov2", "mocov2_hp", "mocov2_mscn", "mocov2_blur"):
        assert main([str(REPO / "configs" / "pretrain" / "toy" / f"{name}.yaml"), *common]) == 0
        filters[name] = capsys.readouterr().out.split("input_filter=")[1].strip()
    assert filters == {"mocov2": "none", "mocov2_hp": "highpass", "mocov2_mscn": "highpass", "mocov2_blur": "none"}


def test_knn_command_names_and_counts_an_unreadable_image(tmp_path, capsys):
    from pretrain.knn import main

    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=36)
    broken = sorted((root / "val" / "a").iterdir())[0]
    broken.write_bytes(b"not an image")
    code = main([str(TOY_CONFIGS[0]), "--random", f"data.root={root}", "augment.image_size=32", "knn.k=3",
                 "data.num_workers=0"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped_images=1" in captured.out
    assert str(broken) in captured.err and captured.err.count("unreadable image") == 1


def test_train_and_val_with_other_classes_name_the_folders_and_the_way_out(tmp_path):
    from pretrain.data import DataError

    root = make_image_folder(tmp_path / "data", {"a": 2, "b": 2}, size=36)
    (root / "val" / "b").rename(root / "val" / "c")
    cfg = load_config(TOY_CONFIGS[0], [f"data.root={root}", "augment.image_size=32", "data.num_workers=0"])
    with pytest.raises(DataError, match=r"only in train: \['b'\]; only in val: \['c'\].*knn.enabled=false"):
        KnnMonitor(cfg, distributed.World())
