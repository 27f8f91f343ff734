"""Classification dataset layouts read by the linear evaluations, with checks that fail before long work.

Standard layouts (the toy world writes the same ones, see :mod:`transfer.toydata`)::

    imagenet100/{train,val}/<wnid>/*.JPEG                    ImageFolder style (also any ImageNet subset)
    caltech101/101_ObjectCategories/<class>/image_NNNN.jpg   incl. BACKGROUND_Google (kept, as Ericsson et al.)
    flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}

A reader returns a :class:`LabelledImages` per split: paths relative to the dataset root plus integer
labels, and the class names. Every problem a user can cause (wrong folder, a class folder without images,
missing or malformed ``.mat`` files, ids pointing at missing images) is a :class:`DataLayoutError` whose
message names the path and the fix. Images are only opened later, by :class:`ImageListDataset`, which
turns an unreadable file into the same error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CALTECH_BACKGROUND = "BACKGROUND_Google"
IMAGENET100_CLASS_LIST = Path(__file__).resolve().parent / "resources" / "imagenet100.txt"
# Folder names a --data-root may hold for each dataset (first match wins), relative to the data root.
DATASET_FOLDERS = {
    "imagenet100": ("imagenet100", "imagenet-100", "ImageNet100", "ImageNet-100"),
    "caltech101": ("caltech101/101_ObjectCategories", "101_ObjectCategories", "caltech-101/101_ObjectCategories"),
    "flowers102": ("flowers-102", "flowers102", "oxford-flowers102", "flowers"),
}


class DataLayoutError(ValueError):
    """A dataset folder does not have the layout a protocol reads, or one of its files is unusable."""


@dataclass
class LabelledImages:
    """One split: image paths relative to ``root`` and their integer labels."""

    root: Path
    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        return LabelledImages(self.root, [self.paths[i] for i in indices], [self.labels[i] for i in indices])

    def __add__(self, other: LabelledImages) -> LabelledImages:
        if other.root != self.root:
            raise ValueError("cannot join splits of different dataset roots")
        return LabelledImages(self.root, self.paths + other.paths, self.labels + other.labels)

    def fingerprint(self) -> str:
        """Hash of (relative path, label, file size) of every image: changes when the data changes."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            try:
                size = (self.root / path).stat().st_size
            except OSError:
                size = -1
            digest.update(f"{path}\t{label}\t{size}\n".encode())
        return digest.hexdigest()


@dataclass
class ClassificationData:
    """A dataset's classes and its splits (e.g. train/val for ImageNet, train/val/test for the others)."""

    name: str
    root: Path
    classes: list[str]
    splits: dict[str, LabelledImages]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.name, "root": str(self.root), "classes": len(self.classes),
                "images": {split: len(images) for split, images in self.splits.items()}}

    def fingerprint(self) -> str:
        parts = {split: images.fingerprint() for split, images in sorted(self.splits.items())}
        return hashlib.sha256(json.dumps([self.classes, parts]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- roots


def find_dataset_root(data_root: str | os.PathLike, dataset: str) -> Path:
    """The folder holding ``dataset`` under ``data_root``, or ``data_root`` itself if it is that folder."""
    if dataset not in DATASET_FOLDERS:
        raise ValueError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASET_FOLDERS)}")
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DataLayoutError(f"data root {data_root} does not exist or is not a directory; pass --data-root DIR "
                              "(the folder that holds imagenet100/, caltech101/, flowers-102/)")
    for folder in DATASET_FOLDERS[dataset]:
        if (data_root / folder).is_dir():
            return data_root / folder
    if _looks_like(data_root, dataset):
        return data_root
    if dataset == "caltech101" and (data_root / "caltech101").is_dir():
        raise DataLayoutError(f"{data_root / 'caltech101'} has no 101_ObjectCategories/ folder; extract "
                              "101_ObjectCategories.tar.gz inside it (layout: caltech101/101_ObjectCategories/<class>/)")
    looked = ", ".join(str(data_root / f) for f in DATASET_FOLDERS[dataset])
    raise DataLayoutError(f"no {dataset} dataset under {data_root}: looked for {looked}. {LAYOUT_HELP[dataset]}")


def _looks_like(folder: Path, dataset: str) -> bool:
    if dataset == "imagenet100":
        return (folder / "train").is_dir() and (folder / "val").is_dir()
    if dataset == "caltech101":
        return folder.name == "101_ObjectCategories" or (folder / CALTECH_BACKGROUND).is_dir()
    return (folder / "imagelabels.mat").exists() or (folder / "setid.mat").exists()


LAYOUT_HELP = {
    "imagenet100": "Expected layout: imagenet100/{train,val}/<wnid>/*.JPEG (build it from a full ImageNet "
                   "folder with `python -m transfer make-imagenet100 IMAGENET_DIR OUT`).",
    "caltech101": "Expected layout: caltech101/101_ObjectCategories/<class>/image_NNNN.jpg.",
    "flowers102": "Expected layout: flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} "
                  "(the three files of the official Oxford Flowers-102 release).",
}


def list_images(folder: Path) -> list[str]:
    """Image file names directly inside ``folder``, sorted (hidden files skipped)."""
    return sorted(
        entry.name for entry in os.scandir(folder)
        if not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()
    )


def class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _images_per_class(split_dir: Path, classes: list[str]) -> dict[str, list[str]]:
    per_class = {}
    for name in classes:
        files = list_images(split_dir / name)
        if not files:
            raise DataLayoutError(f"class folder {split_dir / name} has no images (looked for "
                                  f"{', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder")
        per_class[name] = files
    return per_class


# ------------------------------------------------------------------------------------------ ImageNet-100


def read_class_list(path: str | os.PathLike = IMAGENET100_CLASS_LIST) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataLayoutError(f"class list {path} not found")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(wnids)) != len(wnids):
        raise DataLayoutError(f"class list {path} repeats classes")
    return wnids


def read_imagenet_subset(root: str | os.PathLike) -> ClassificationData:
    """An ImageFolder-style ``{train,val}/<class>/`` dataset such as ImageNet-100."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataLayoutError(f"{root} has no {split}/ folder. {LAYOUT_HELP['imagenet100']}")
    classes = class_folders(root / "train")
    if not classes:
        loose = list_images(root / "train")
        hint = " (it holds images directly: put them in one folder per class)" if loose else ""
        raise DataLayoutError(f"{root / 'train'} has no class folders{hint}. {LAYOUT_HELP['imagenet100']}")
    if len(classes) > 100:
        raise DataLayoutError(f"{root / 'train'} has {len(classes)} classes: this looks like the full ImageNet. Build "
                              f"the 100-class subset first: python -m transfer make-imagenet100 {root} OUT")
    val_classes = class_folders(root / "val")
    if not val_classes and list_images(root / "val"):
        raise DataLayoutError(f"{root / 'val'} holds images directly, not in class folders (the raw ILSVRC val "
                              "layout); sort them into val/<wnid>/ folders (e.g. with ImageNet's valprep.sh)")
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        raise DataLayoutError(f"{root}: train/ and val/ have different classes (missing in val: {missing[:5]}, "
                              f"only in val: {extra[:5]}); both need the same class folders")
    splits = {}
    for split in ("train", "val"):
        per_class = _images_per_class(root / split, classes)
        paths, labels = [], []
        for label, name in enumerate(classes):
            paths += [f"{split}/{name}/{file}" for file in per_class[name]]
            labels += [label] * len(per_class[name])
        splits[split] = LabelledImages(root, paths, labels)
    notes = []
    known = set(read_class_list())
    if not set(classes) <= known:
        notes.append(f"{len(set(classes) - known)} of {len(classes)} classes are not in the ImageNet-100 (CMC) list")
    elif len(classes) != 100:
        notes.append(f"{len(classes)} classes (a subset of the ImageNet-100 list, e.g. the toy world)")
    return ClassificationData("imagenet100", root, classes, splits, notes)


# ----------------------------------------------------------------------------------------------- Caltech


def read_caltech101_classes(root: str | os.PathLike, keep_background: bool = True) -> ClassificationData:
    """All images of ``101_ObjectCategories`` as one ``"all"`` split; split it with :func:`caltech_split`."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root} does not exist. {LAYOUT_HELP['caltech101']}")
    classes = class_folders(root)
    if not classes:
        raise DataLayoutError(f"{root} has no class folders. {LAYOUT_HELP['caltech101']}")
    if not keep_background:
        classes = [c for c in classes if c != CALTECH_BACKGROUND]
    per_class = _images_per_class(root, classes)
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += [f"{name}/{file}" for file in per_class[name]]
        labels += [label] * len(per_class[name])
    notes = [] if CALTECH_BACKGROUND in classes or not keep_background else [f"no {CALTECH_BACKGROUND} class found"]
    return ClassificationData("caltech101", root, classes, {"all": LabelledImages(root, paths, labels)}, notes)


def caltech_split(data: ClassificationData, train_per_class: int, val_fraction: float, seed: int) -> dict[str, Any]:
    """Ericsson et al.'s Caltech-101 split: ``train_per_class`` random images of each class for training
    (of which ``val_fraction`` held out for validation), every other image for test.

    The validation images are drawn per class (``round(val_fraction * train_per_class)`` each), so every
    class is seen in both train and val and the classifier's classes never change between the C sweep and
    the refit. Returns plain lists of relative paths per split (JSON-able, see :func:`apply_split`).
    """
    if train_per_class < 2:
        raise ValueError(f"train_per_class must be at least 2, got {train_per_class}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(val_fraction * train_per_class)))
    if n_val >= train_per_class:
        raise ValueError(f"val_fraction {val_fraction} leaves no training image of {train_per_class}")
    rng = np.random.default_rng(seed)
    images = data.splits["all"]
    by_class: dict[int, list[str]] = {}
    for path, label in zip(images.paths, images.labels):
        by_class.setdefault(label, []).append(path)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(data.classes):
        files = sorted(by_class.get(label, []))
        if len(files) <= train_per_class:
            raise DataLayoutError(
                f"Caltech-101 class '{name}' has {len(files)} images; the protocol takes {train_per_class} for "
                f"training and needs at least one more for test (lower split.train_per_class for a small dataset)"
            )
        order = rng.permutation(len(files))
        chosen = [files[i] for i in order[:train_per_class]]
        split["val"] += chosen[:n_val]
        split["train"] += chosen[n_val:]
        split["test"] += [files[i] for i in order[train_per_class:]]
    return {"classes": list(data.classes), "train_per_class": train_per_class, "val_fraction": val_fraction,
            "val_per_class": n_val, "seed": seed, **split}


def apply_split(data: ClassificationData, split: dict[str, Any], source: str = "split") -> ClassificationData:
    """The train/val/test splits named by a split dict (from :func:`caltech_split` or a split file)."""
    if split.get("classes") != data.classes:
        raise DataLayoutError(f"{source} lists other classes than {data.root} has; write a new split (delete the "
                              "split file or drop split.file)")
    images = data.splits["all"]
    label_of = dict(zip(images.paths, images.labels))
    splits, seen = {}, set()
    for name in ("train", "val", "test"):
        paths = list(split.get(name, []))
        missing = [p for p in paths if p not in label_of]
        if missing:
            raise DataLayoutError(f"{source}: {len(missing)} {name} images are not in {data.root}, e.g. {missing[:3]}")
        if seen & set(paths):
            raise DataLayoutError(f"{source}: the {name} split overlaps an earlier split")
        seen |= set(paths)
        splits[name] = LabelledImages(data.root, paths, [label_of[p] for p in paths])
    return ClassificationData(data.name, data.root, data.classes, splits, data.notes)


# ----------------------------------------------------------------------------------------------- Flowers


def _load_mat(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    import scipy.io

    if not path.is_file():
        raise DataLayoutError(f"{path} is missing; Flowers-102 needs imagelabels.mat and setid.mat from the "
                              "official release (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)")
    try:
        content = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError ... for damaged files
        raise DataLayoutError(f"cannot read {path}: {err}; the file is damaged, download it again") from err
    out = {}
    for key in keys:
        if key not in content:
            found = sorted(k for k in content if not k.startswith("__"))
            raise DataLayoutError(f"{path} has no '{key}' variable (found {found}); is it the official file?")
        out[key] = np.asarray(content[key]).reshape(-1).astype(np.int64)
    return out


def read_flowers102(root: str | os.PathLike) -> ClassificationData:
    """Flowers-102 with its official train/val/test split (``setid.mat``: trnid/valid/tstid, 1-based ids)."""
    root = Path(root)
    labels = _load_mat(root / "imagelabels.mat", ["labels"])["labels"]
    ids = _load_mat(root / "setid.mat", ["trnid", "valid", "tstid"])
    if not (root / "jpg").is_dir():
        raise DataLayoutError(f"{root / 'jpg'} is missing: extract 102flowers.tgz into {root}. {LAYOUT_HELP['flowers102']}")
    if labels.size == 0 or labels.min() < 1:
        raise DataLayoutError(f"{root / 'imagelabels.mat'}: labels must be 1-based class numbers")
    classes = [str(c) for c in range(1, int(labels.max()) + 1)]
    present = set(list_images(root / "jpg"))
    splits, seen = {}, set()
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        split_ids = ids[key]
        if split_ids.size == 0:
            raise DataLayoutError(f"{root / 'setid.mat'}: '{key}' is empty")
        if split_ids.min() < 1 or split_ids.max() > labels.size:
            raise DataLayoutError(f"{root / 'setid.mat'}: '{key}' has image ids outside 1..{labels.size} "
                                  "(imagelabels.mat and setid.mat do not belong together)")
        if seen & set(split_ids.tolist()):
            raise DataLayoutError(f"{root / 'setid.mat'}: '{key}' overlaps another split")
        seen |= set(split_ids.tolist())
        paths = [f"image_{int(i):05d}.jpg" for i in split_ids]
        missing = [p for p in paths if p not in present]
        if missing:
            raise DataLayoutError(f"{len(missing)} {split} images listed in setid.mat are missing from {root / 'jpg'}, "
                                  f"e.g. {missing[:3]}; the image folder is incomplete")
        splits[split] = LabelledImages(root, [f"jpg/{p}" for p in paths], [int(labels[i - 1]) - 1 for i in split_ids])
    absent = sorted(set(range(len(classes))) - set(splits["train"].labels))
    if absent:
        raise DataLayoutError(f"Flowers-102 classes {[classes[c] for c in absent[:5]]} have no training image in "
                              "setid.mat's trnid; the split files are not the official ones")
    return ClassificationData("flowers102", root, classes, splits)


# -------------------------------------------------------------------------------------------- the images


def load_rgb(path: Path) -> Image.Image:
    """An image as RGB (Caltech has greyscale images), or a DataLayoutError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataLayoutError(f"cannot read image {path} ({err}); the file is corrupt or not an image: "
                              "replace or delete it") from err


class ImageListDataset(torch.utils.data.Dataset):
    """(transformed image, label) pairs of a :class:`LabelledImages` split."""

    def __init__(self, images: LabelledImages, transform: Callable[[Image.Image], torch.Tensor]):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.images.root / self.images.paths[index])
        return self.transform(image), self.images.labels[index]
