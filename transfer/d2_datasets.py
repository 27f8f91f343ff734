"""Register VOC07+12 and COCO 2017 with detectron2 from their standard layouts under a data root.

Layout (the root is ``--data-root``, else ``$DETECTRON2_DATASETS``, else ``datasets/``)::

    VOCdevkit/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt}
    VOCdevkit/VOC2012/{Annotations, JPEGImages, ImageSets/Main/trainval.txt}
    VOCdevkit/classes.txt              optional: class names, one per line (the toy world writes it);
                                       without it the 20 Pascal VOC classes are used
    coco/{train2017, val2017}/*.jpg
    coco/annotations/instances_{train,val}2017.json

detectron2 registers the same dataset names at import time under ``$DETECTRON2_DATASETS`` with the
20 VOC / 80 COCO classes; :func:`register_datasets` replaces those entries by ones read from the given
root, so the protocol configs keep detectron2's names (``voc_2007_trainval``, ``coco_2017_val`` ...).

:func:`check_layout` runs before anything is built and raises :class:`DatasetLayoutError` naming the
first missing or malformed path. Files too big to read twice (COCO's annotation JSON) are checked when
detectron2 loads them, which still happens before the first training iteration: the registered loaders
verify that every image they list exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json  # noqa: E402
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES  # noqa: E402
from detectron2.data.datasets.pascal_voc import load_voc_instances  # noqa: E402

__all__ = ["DatasetLayoutError", "DatasetInfo", "default_data_root", "check_layout", "register_datasets",
           "VOC_DATASETS", "COCO_DATASETS", "KNOWN_DATASETS"]

# name -> (directory under VOCdevkit, image set, year)
VOC_DATASETS = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2007_train": ("VOC2007", "train", 2007),
    "voc_2007_val": ("VOC2007", "val", 2007),
    "voc_2007_test": ("VOC2007", "test", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
    "voc_2012_train": ("VOC2012", "train", 2012),
    "voc_2012_val": ("VOC2012", "val", 2012),
}
# name -> (image directory, annotation file), relative to the root
COCO_DATASETS = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}
KNOWN_DATASETS = (*VOC_DATASETS, *COCO_DATASETS)
_SMALL_JSON_BYTES = 64 << 20  # read fully during the check (toy, COCO val); larger ones when detectron2 loads


class DatasetLayoutError(ValueError):
    """A dataset is missing or does not follow its standard layout; the message names the path."""


@dataclass
class DatasetInfo:
    """What the datasets of one run look like (class names shared by all of them)."""

    root: Path
    names: tuple[str, ...]
    thing_classes: list[str]
    paths: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)

    def summary(self) -> dict[str, Any]:
        return {"root": str(self.root), "datasets": list(self.names), "num_classes": self.num_classes,
                "thing_classes": list(self.thing_classes), "paths": self.paths}


def default_data_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS") or "datasets").expanduser()


def _fix(root: Path) -> str:
    return (f"Point --data-root (or $DETECTRON2_DATASETS) at the folder holding VOCdevkit/ and coco/ "
            f"(now: {root}); docs/detection.md shows the layout.")


def _require(path: Path, what: str, root: Path, is_dir: bool) -> None:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "folder" if is_dir else "file"
        state = "is not a " + kind if path.exists() else "is missing"
        raise DatasetLayoutError(f"{what}: {path} {state}. {_fix(root)}")


def voc_classes(root: Path) -> list[str]:
    """Class names from ``VOCdevkit/classes.txt`` if present, else the 20 Pascal VOC classes."""
    listing = root / "VOCdevkit" / "classes.txt"
    if not listing.exists():
        return list(VOC_CLASS_NAMES)
    names = listing.read_text().split()
    if not names or len(set(names)) != len(names):
        raise DatasetLayoutError(f"{listing} must name each class once, one per line; it has {names!r}")
    return names


def _check_voc(name: str, root: Path) -> dict[str, str]:
    folder, image_set, _ = VOC_DATASETS[name]
    base = root / "VOCdevkit" / folder
    _require(base, f"dataset {name}", root, is_dir=True)
    for sub in ("Annotations", "JPEGImages"):
        _require(base / sub, f"dataset {name}", root, is_dir=True)
    listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
    _require(listing, f"dataset {name} (image set '{image_set}')", root, is_dir=False)
    ids = listing.read_text().split()
    if not ids:
        raise DatasetLayoutError(f"dataset {name}: {listing} lists no images")
    annotations = set(os.listdir(base / "Annotations"))
    images = set(os.listdir(base / "JPEGImages"))
    for image_id in ids:
        if f"{image_id}.xml" not in annotations:
            raise DatasetLayoutError(f"dataset {name}: {base / 'Annotations' / (image_id + '.xml')} is missing "
                                     f"(listed in {listing})")
        if f"{image_id}.jpg" not in images:
            raise DatasetLayoutError(f"dataset {name}: {base / 'JPEGImages' / (image_id + '.jpg')} is missing "
                                     f"(listed in {listing})")
    return {"dirname": str(base), "image_set": str(listing), "images": str(len(ids))}


def _coco_categories(annotation_file: Path, name: str) -> list[str] | None:
    """Category names of a COCO JSON small enough to read now (None for big files: checked on load)."""
    if annotation_file.stat().st_size > _SMALL_JSON_BYTES:
        with open(annotation_file, "rb") as handle:
            if handle.read(1).strip() not in (b"{", b""):
                raise DatasetLayoutError(f"dataset {name}: {annotation_file} is not a COCO JSON file")
        return None
    try:
        data = json.loads(annotation_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"dataset {name}: {annotation_file} is not valid JSON ({err})") from err
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if not isinstance(data, dict) or missing:
        raise DatasetLayoutError(f"dataset {name}: {annotation_file} lacks the COCO keys {missing}")
    return [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]


def _check_coco(name: str, root: Path) -> tuple[dict[str, str], list[str] | None]:
    image_dir, annotation_file = (root / part for part in COCO_DATASETS[name])
    _require(root / "coco", f"dataset {name}", root, is_dir=True)
    _require(image_dir, f"dataset {name} images", root, is_dir=True)
    _require(annotation_file, f"dataset {name} annotations", root, is_dir=False)
    categories = _coco_categories(annotation_file, name)
    return {"image_root": str(image_dir), "json_file": str(annotation_file)}, categories


def check_layout(names: tuple[str, ...] | list[str], root: str | os.PathLike | None = None) -> DatasetInfo:
    """Check that every dataset in ``names`` exists in its standard layout under ``root``; return
    their paths and class names. Names the suite does not know must already be registered."""
    root = Path(root).expanduser() if root is not None else default_data_root()
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {root} does not exist. {_fix(root)}")
    paths: dict[str, dict[str, str]] = {}
    classes: list[str] | None = None
    for name in names:
        if name in VOC_DATASETS:
            paths[name] = _check_voc(name, root)
            found = voc_classes(root)
        elif name in COCO_DATASETS:
            paths[name], found = _check_coco(name, root)
        elif name in DatasetCatalog.list():
            found = MetadataCatalog.get(name).get("thing_classes")
        else:
            raise DatasetLayoutError(f"unknown dataset '{name}': the suite registers {', '.join(KNOWN_DATASETS)}; "
                                     "register others with detectron2 before calling the runner")
        if found is not None:
            if classes is not None and found != classes:
                raise DatasetLayoutError(f"datasets {list(names)} disagree on their classes: {classes} vs {found}")
            classes = found
    if classes is None:  # only big COCO files: categories are read from the first one when it loads
        classes = _read_categories_now(paths)
    return DatasetInfo(root=root, names=tuple(names), thing_classes=list(classes), paths=paths)


def _read_categories_now(paths: dict[str, dict[str, str]]) -> list[str]:
    json_file = Path(next(p["json_file"] for p in paths.values() if "json_file" in p))
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{json_file} is not valid JSON ({err})") from err
    return [c["name"] for c in sorted(data.get("categories", []), key=lambda c: c["id"])]


def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _load_voc(name: str, dirname: str, image_set: str, classes: list[str]) -> list[dict]:
    try:
        return load_voc_instances(dirname, image_set, classes)
    except ValueError as err:  # list.index: an object of a class not in the class list
        raise DatasetLayoutError(f"dataset {name}: an annotation in {dirname}/Annotations names a class that "
                                 f"is not one of {classes} ({err}); fix the XML or VOCdevkit/classes.txt") from err


def _load_coco(name: str, json_file: str, image_root: str) -> list[dict]:
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetLayoutError(f"dataset {name}: {json_file} is not a valid COCO instances file ({err!r})") from err
    present = set(os.listdir(image_root))
    for record in dicts:
        if os.path.basename(record["file_name"]) not in present:
            raise DatasetLayoutError(f"dataset {name}: {record['file_name']} (listed in {json_file}) is missing")
    return dicts


def register_datasets(info: DatasetInfo) -> None:
    """Register (or re-register) the datasets of a checked layout with detectron2's catalogs."""
    for name in info.names:
        if name in VOC_DATASETS:
            folder, image_set, year = VOC_DATASETS[name]
            dirname = str(info.root / "VOCdevkit" / folder)
            _replace(name)
            DatasetCatalog.register(name, lambda n=name, d=dirname, s=image_set: _load_voc(n, d, s, info.thing_classes))
            MetadataCatalog.get(name).set(thing_classes=list(info.thing_classes), dirname=dirname, year=year,
                                          split=image_set, evaluator_type="pascal_voc")
        elif name in COCO_DATASETS:
            image_root, json_file = (str(info.root / part) for part in COCO_DATASETS[name])
            _replace(name)
            DatasetCatalog.register(name, lambda n=name, j=json_file, r=image_root: _load_coco(n, j, r))
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
