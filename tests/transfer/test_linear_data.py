"""Layouts of the linear evaluations: readers, the Caltech split, ImageNet-100 from ImageNet, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from transfer.classification_data import (
    CALTECH_BACKGROUND,
    DataLayoutError,
    ImageListDataset,
    LabelledImages,
    apply_split,
    caltech_split,
    find_dataset_root,
    read_caltech101_classes,
    read_class_list,
    read_flowers102,
    read_imagenet_subset,
)
from transfer.imagenet100 import MANIFEST, build_imagenet100
from transfer.imagenet100 import main as make_imagenet100_main


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_imagenet_subset_reader_on_the_toy_layout(toy_world):
    data = read_imagenet_subset(find_dataset_root(toy_world, "imagenet100"))
    wnids = read_class_list()
    assert data.classes == sorted(wnids[:8])
    assert len(data.splits["train"]) == 8 * 45 and len(data.splits["val"]) == 8 * 9
    assert set(data.splits["train"].labels) == set(range(8))
    assert all(p.startswith("train/n") and p.endswith(".JPEG") for p in data.splits["train"].paths)
    assert any("subset of the ImageNet-100 list" in note for note in data.notes)


def test_dataset_roots_are_found_or_refused(toy_world, tmp_path):
    assert find_dataset_root(toy_world, "caltech101") == toy_world / "caltech101" / "101_ObjectCategories"
    assert find_dataset_root(toy_world, "flowers102") == toy_world / "flowers-102"
    assert find_dataset_root(toy_world / "imagenet100", "imagenet100") == toy_world / "imagenet100"  # the folder itself
    with pytest.raises(DataLayoutError, match="does not exist"):
        find_dataset_root(tmp_path / "nowhere", "flowers102")
    with pytest.raises(DataLayoutError, match="no flowers102 dataset"):
        find_dataset_root(tmp_path, "flowers102")
    (tmp_path / "caltech101").mkdir()
    with pytest.raises(DataLayoutError, match="101_ObjectCategories"):
        find_dataset_root(tmp_path, "caltech101")


def test_imagenet_layout_errors(toy_world, tmp_path):
    root = _copy(toy_world / "imagenet100", tmp_path / "imagenet100")
    empty = root / "train" / "n99999999"
    (root / "val" / "n99999999").mkdir(parents=True)
    empty.mkdir()
    with pytest.raises(DataLayoutError, match="n99999999 has no images"):
        read_imagenet_subset(root)
    shutil.rmtree(root / "val" / "n99999999")
    with pytest.raises(DataLayoutError, match="different classes"):
        read_imagenet_subset(root)
    shutil.rmtree(empty)
    flat = tmp_path / "flatval"
    (flat / "train" / "n01").mkdir(parents=True)
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataLayoutError, match="raw ILSVRC val"):
        read_imagenet_subset(flat)
    full = tmp_path / "full"
    for i in range(101):
        (full / "train" / f"n{i:08d}").mkdir(parents=True)
    (full / "val").mkdir()
    with pytest.raises(DataLayoutError, match="make-imagenet100"):
        read_imagenet_subset(full)


def test_caltech_split_is_deterministic_and_follows_the_protocol(toy_world):
    data = read_caltech101_classes(find_dataset_root(toy_world, "caltech101"))
    assert CALTECH_BACKGROUND in data.classes and len(data.classes) == 9  # background kept (Ericsson)
    split = caltech_split(data, train_per_class=8, val_fraction=0.2, seed=0)
    assert split == caltech_split(data, train_per_class=8, val_fraction=0.2, seed=0)
    assert split["train"] != caltech_split(data, train_per_class=8, val_fraction=0.2, seed=1)["train"]
    applied = apply_split(data, split)
    labels = {name: np.bincount(applied.splits[name].labels, minlength=9) for name in ("train", "val", "test")}
    assert (labels["val"] == 2).all() and (labels["train"] == 6).all()  # 20% of 8, drawn per class
    per_class = np.bincount(data.splits["all"].labels)
    assert (labels["test"] == per_class - 8).all()  # every other image is a test image
    everything = split["train"] + split["val"] + split["test"]
    assert sorted(everything) == sorted(data.splits["all"].paths) and len(set(everything)) == len(everything)
    without = read_caltech101_classes(find_dataset_root(toy_world, "caltech101"), keep_background=False)
    assert CALTECH_BACKGROUND not in without.classes


def test_caltech_split_refuses_small_classes_and_foreign_split_files(toy_world):
    data = read_caltech101_classes(find_dataset_root(toy_world, "caltech101"))
    with pytest.raises(DataLayoutError, match="BACKGROUND_Google' has 9 images"):
        caltech_split(data, train_per_class=30, val_fraction=0.2, seed=0)
    split = caltech_split(data, train_per_class=8, val_fraction=0.2, seed=0)
    with pytest.raises(DataLayoutError, match="other classes"):
        apply_split(data, {**split, "classes": split["classes"][:-1]})
    with pytest.raises(DataLayoutError, match="not in"):
        apply_split(data, {**split, "test": split["test"] + ["disc/image_9999.jpg"]})
    with pytest.raises(DataLayoutError, match="overlaps"):
        apply_split(data, {**split, "test": split["test"] + split["train"][:1]})


def test_caltech_class_folder_without_images_is_named(toy_world, tmp_path):
    root = _copy(find_dataset_root(toy_world, "caltech101"), tmp_path / "101_ObjectCategories")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(DataLayoutError, match="empty_class has no images"):
        read_caltech101_classes(root)


def test_flowers_reader_uses_the_official_split_files(toy_world):
    data = read_flowers102(find_dataset_root(toy_world, "flowers102"))
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [48, 24, 96]  # 20/10/40 per class at test scale
    assert data.classes == [str(c) for c in range(1, 9)]
    labels = scipy.io.loadmat(toy_world / "flowers-102" / "imagelabels.mat")["labels"].ravel()
    ids = scipy.io.loadmat(toy_world / "flowers-102" / "setid.mat")["tstid"].ravel()
    assert data.splits["test"].paths[0] == f"jpg/image_{ids[0]:05d}.jpg"
    assert data.splits["test"].labels[0] == labels[ids[0] - 1] - 1  # 1-based ids and labels -> 0-based


def test_flowers_bad_input(toy_world, tmp_path):
    root = _copy(toy_world / "flowers-102", tmp_path / "flowers-102")
    (root / "setid.mat").rename(root / "setid.bak")
    with pytest.raises(DataLayoutError, match="setid.mat is missing"):
        read_flowers102(root)
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]])})
    with pytest.raises(DataLayoutError, match="no 'tstid'"):
        read_flowers102(root)
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[9999]])})
    with pytest.raises(DataLayoutError, match="outside"):
        read_flowers102(root)
    (root / "setid.bak").rename(root / "setid.mat")
    (root / "imagelabels.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataLayoutError, match="cannot read"):
        read_flowers102(root)
    shutil.copy(toy_world / "flowers-102" / "imagelabels.mat", root / "imagelabels.mat")
    first = read_flowers102(root).splits["test"].paths[0]
    (root / first).unlink()
    with pytest.raises(DataLayoutError, match="missing from"):
        read_flowers102(root)


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    dataset = ImageListDataset(LabelledImages(tmp_path, ["a/broken.jpg"], [0]), transform=lambda image: image)
    with pytest.raises(DataLayoutError, match="broken.jpg"):
        dataset[0]


def test_fingerprint_follows_the_files(toy_world, tmp_path):
    root = _copy(toy_world / "flowers-102", tmp_path / "flowers-102")
    before = read_flowers102(root)
    prints = {split: before.splits[split].fingerprint() for split in ("train", "val")}
    assert before.fingerprint() == read_flowers102(root).fingerprint()
    Image.new("RGB", (40, 40), "red").save(root / before.splits["val"].paths[0])  # another image, another size
    after = read_flowers102(root)
    assert after.splits["val"].fingerprint() != prints["val"]
    assert after.splits["train"].fingerprint() == prints["train"]


def _fake_imagenet(root: Path, wnids: list[str], skip: str | None = None) -> Path:
    image = root / "shared.JPEG"
    root.mkdir(parents=True)
    Image.new("RGB", (16, 16), "blue").save(image)
    for split in ("train", "val"):
        for wnid in wnids:
            if (split, wnid) == ("val", skip):
                continue
            (root / split / wnid).mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                (root / split / wnid / f"{wnid}_{i}.JPEG").symlink_to(image)
    (root / "train" / "n99999999").mkdir()  # a class that is not in the list: left out
    (root / "train" / "n99999999" / "x.JPEG").symlink_to(image)
    return root


def test_make_imagenet100_links_or_copies_the_listed_classes(tmp_path):
    wnids = read_class_list()
    imagenet = _fake_imagenet(tmp_path / "ILSVRC", wnids)
    out = tmp_path / "imagenet100"
    manifest = build_imagenet100(imagenet, out, progress=False)
    assert manifest["images"] == {"train": 200, "val": 100} and manifest["mode"] == "symlink"
    assert (out / "train" / wnids[0]).is_symlink() and (out / MANIFEST).is_file()
    data = read_imagenet_subset(out)
    assert data.classes == sorted(wnids) and len(data.splits["train"]) == 200 and not data.notes
    with pytest.raises(FileExistsError, match="not empty"):
        build_imagenet100(imagenet, out, progress=False)
    copied = tmp_path / "copied"
    assert make_imagenet100_main([str(imagenet), str(copied), "--copy"]) == 0
    assert not (copied / "val" / wnids[5]).is_symlink() and (copied / "val" / wnids[5] / f"{wnids[5]}_0.JPEG").is_file()
    assert build_imagenet100(imagenet, out, force=True, progress=False)["classes"] == wnids


def test_make_imagenet100_refuses_an_incomplete_imagenet_and_writes_nothing(tmp_path, capsys):
    wnids = read_class_list()
    imagenet = _fake_imagenet(tmp_path / "ILSVRC", wnids, skip=wnids[3])
    out = tmp_path / "out"
    with pytest.raises(DataLayoutError, match=f"val/{wnids[3]} is missing"):
        build_imagenet100(imagenet, out, progress=False)
    assert not out.exists()
    assert make_imagenet100_main([str(tmp_path / "ILSVRC" / "train"), str(out)]) == 2
    assert "has no train/ folder" in capsys.readouterr().err
