"""The built-in toy world: every layout loads, generation is deterministic, and bad use is refused."""

from __future__ import annotations

import hashlib
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision import datasets

from transfer.toydata import (
    LAYOUTS,
    MANIFEST,
    SHAPES,
    ToyWorldConfig,
    clip_polygon,
    coco_category_ids,
    generate_toy_world,
    imagenet_wnids,
    polygon_area,
)
from transfer.toydata import main as toydata_main

TINY = dict(scale=0.05)


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_every_layout_and_manifest_exist(toy_world: Path):
    for layout in LAYOUTS:
        assert (toy_world / layout).is_dir(), layout
    manifest = json.loads((toy_world / MANIFEST).read_text())
    assert manifest["classes"] == list(SHAPES[:8])
    assert not list(toy_world.glob(".toy-staging-*")), "staging directory left behind"


def test_imagenet_layout_reads_with_imagefolder(toy_world: Path):
    wnids = imagenet_wnids(8)
    for split in ("train", "val"):
        folder = datasets.ImageFolder(toy_world / "imagenet100" / split)
        assert sorted(folder.classes) == sorted(wnids)
        assert all(path.endswith(".JPEG") for path, _ in folder.samples)
        counts = np.bincount([label for _, label in folder.samples])
        assert counts.min() == counts.max() > 0
    image, _ = datasets.ImageFolder(toy_world / "imagenet100" / "train")[0]
    assert image.size == (96, 96)
    reference = [line.strip() for line in Path("transfer/resources/imagenet100.txt").read_text().split()]
    assert set(wnids) <= set(reference)


def test_caltech_layout_reads_with_torchvision(toy_world: Path):
    caltech = datasets.Caltech101(toy_world, target_type="category", download=False)
    assert caltech.categories == sorted(SHAPES[:8])
    image, label = caltech[0]
    assert image.mode in ("RGB", "L") and 0 <= label < 8
    background = sorted((toy_world / "caltech101" / "101_ObjectCategories" / "BACKGROUND_Google").glob("image_*.jpg"))
    assert background and background[0].name == "image_0001.jpg"
    modes = {Image.open(p).mode for p in (toy_world / "caltech101" / "101_ObjectCategories").rglob("*.jpg")}
    assert modes == {"RGB", "L"}, "greyscale images, as in the real Caltech-101, must be present"


def test_flowers_layout_matches_official_files(toy_world: Path):
    # torchvision's Flowers102 md5-checks the official .mat files, so the layout is checked directly.
    labels = scipy.io.loadmat(toy_world / "flowers-102" / "imagelabels.mat")["labels"].ravel()
    setid = scipy.io.loadmat(toy_world / "flowers-102" / "setid.mat")
    ids = {key: setid[key].ravel() for key in ("trnid", "valid", "tstid")}
    all_ids = np.concatenate(list(ids.values()))
    assert sorted(all_ids) == list(range(1, len(labels) + 1)), "split ids must cover every image exactly once"
    assert set(labels) == set(range(1, 9)), "labels are 1-based as in the official file"
    for key in ids:
        assert set(labels[ids[key] - 1]) == set(range(1, 9)), f"every class appears in {key}"
    for image_id in all_ids[:20]:
        assert Image.open(toy_world / "flowers-102" / "jpg" / f"image_{image_id:05d}.jpg").mode == "RGB"


def test_voc_annotations_carry_every_field(toy_world: Path):
    voc = toy_world / "VOCdevkit"
    classes = (voc / "classes.txt").read_text().split()
    assert classes == list(SHAPES[:8])
    for year, splits in (("2007", ("trainval", "test", "train", "val")), ("2012", ("trainval", "train", "val"))):
        for split in splits:
            ids = (voc / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
            assert ids
        for file_id in (voc / f"VOC{year}" / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:10]:
            tree = ET.parse(voc / f"VOC{year}" / "Annotations" / f"{file_id}.xml")
            width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
            assert Image.open(voc / f"VOC{year}" / "JPEGImages" / f"{file_id}.jpg").size == (width, height)
            for obj in tree.findall("object"):
                assert obj.findtext("name") in classes
                assert obj.findtext("pose") and obj.findtext("truncated") in ("0", "1")
                assert obj.findtext("difficult") in ("0", "1")
                x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= x0 < x1 <= width and 1 <= y0 < y1 <= height


def test_coco_annotations_are_consistent(toy_world: Path):
    from pycocotools.coco import COCO

    for split in ("train2017", "val2017"):
        coco = COCO(str(toy_world / "coco" / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == coco_category_ids(8)
        assert coco_category_ids(8) != list(range(1, 9)), "ids must be non-contiguous, as in COCO"
        assert len(coco.getAnnIds()) > len(coco.getImgIds())
        for ann in coco.loadAnns(coco.getAnnIds())[:40]:
            image = coco.loadImgs(ann["image_id"])[0]
            assert (toy_world / "coco" / split / image["file_name"]).is_file()
            mask = coco.annToMask(ann)
            assert mask.shape == (image["height"], image["width"])
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] + 1e-6 and y + h <= image["height"] + 1e-6
            assert ann["iscrowd"] == 0
            # The polygon's area agrees with its rasterised mask (within edge effects).
            assert abs(mask.sum() - ann["area"]) <= 0.25 * ann["area"] + 2 * (w + h)


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path, monkeypatch):
    generate_toy_world(tmp_path / "a", ToyWorldConfig(seed=3, **TINY))
    # A later wall clock must not leak into any file (scipy's .mat header carries a creation time).
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400 * 400)
    generate_toy_world(tmp_path / "b", ToyWorldConfig(seed=3, **TINY))
    monkeypatch.undo()
    generate_toy_world(tmp_path / "c", ToyWorldConfig(seed=4, **TINY))
    for layout in LAYOUTS:
        assert _digest(tmp_path / "a" / layout) == _digest(tmp_path / "b" / layout), layout
        assert _digest(tmp_path / "a" / layout) != _digest(tmp_path / "c" / layout), layout


def test_refuses_non_empty_directory_unless_forced(tmp_path: Path, capsys):
    out = tmp_path / "world"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert toydata_main([str(out), "--scale", "0.05"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert toydata_main([str(out), "--scale", "0.05", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "keep me", "--force must only replace the toy world's own entries"
    assert (out / MANIFEST).is_file()


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(num_classes=99), dict(scale=0)])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        ToyWorldConfig(**bad)


def test_polygon_clipping_keeps_inside_and_cuts_outside():
    square = np.array([[-10, -10], [10, -10], [10, 10], [-10, 10]], dtype=float)
    clipped = clip_polygon(square, 100, 100)
    assert polygon_area(clipped) == pytest.approx(100.0)
    inside = square + 50
    assert polygon_area(clip_polygon(inside, 100, 100)) == pytest.approx(polygon_area(inside))
    assert len(clip_polygon(square - 50, 100, 100)) == 0


def test_run_all_regenerates_a_toy_world_written_by_another_version(tmp_path: Path):
    from types import SimpleNamespace

    from transfer.benchmark_cells import ToyData

    root = tmp_path / "world"
    generate_toy_world(root, ToyWorldConfig(seed=0, **TINY))
    ws = SimpleNamespace(config=SimpleNamespace(toy_world={"seed": 0, "scale": TINY["scale"], "classes": 8}), data_root=root)
    assert ToyData().check(None, ws, {}, None) is None, "a current toy world with the preset's settings is kept"
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**manifest, "version": manifest["version"] - 1}))
    problem = ToyData().check(None, ws, {}, None)
    assert problem is not None and problem.kind == "missing" and "version" in problem.message
