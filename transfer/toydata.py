"""The built-in toy world: one synthetic dataset written in every layout the suite reads.

    python -m transfer make-toy-data OUT [--seed N] [--scale S] [--force]

Every image shows objects from a fixed set of shape classes (disc, square, star, ...) on a cluttered,
textured background. A class is defined by its outline; its texture follows the class most of the time
(stripes, dots, checks, ...) and its colour is random, so colour alone says nothing and a network has
to learn form and texture. The same classes appear in every layout:

* ``imagenet100/{train,val}/<wnid>/<wnid>_N.JPEG``     one dominant object per image (wnids from the
  ImageNet-100 list), sometimes a small distractor of another class;
* ``caltech101/101_ObjectCategories/<class>/image_NNNN.jpg`` plus ``BACKGROUND_Google`` (clutter only),
  some images greyscale as in the real set;
* ``flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}`` (1-based labels and split ids);
* ``VOCdevkit/VOC2007`` and ``VOC2012`` (``Annotations/*.xml`` with size, pose, truncated, difficult and
  1-based inclusive ``bndbox``; ``JPEGImages``; ``ImageSets/Main/{train,val,trainval[,test]}.txt``) and
  ``VOCdevkit/classes.txt`` naming the classes (the VOC-style runner reads it instead of the 20 VOC names);
* ``coco/{train2017,val2017}`` and ``coco/annotations/instances_{train,val}2017.json`` with polygon
  segmentations, areas, ``iscrowd`` and non-contiguous category ids, as in COCO.

Generation is deterministic: each image draws from its own random stream derived from (seed, layout,
split, index), so the same seed gives identical bytes. Output is staged in a temporary directory and
moved into place at the end; ``toy_world.json`` (written last) marks a complete world.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

from pretrain.fileio import atomic_write_json

# 2: toy Flowers split 20/10/40 per class (was the official 10/10/20, near chance for every model)
TOY_WORLD_VERSION = 2
MANIFEST = "toy_world.json"
LAYOUTS = ("imagenet100", "caltech101", "flowers-102", "VOCdevkit", "coco")
SHAPES = ("disc", "square", "triangle", "star", "cross", "crescent", "arrow", "heart", "ellipse", "ell")
TEXTURES = ("stripes", "dots", "checks", "solid", "rings", "speckle")
# The CMC ImageNet-100 class list; toy classes take its first wnids so the folders look real.
IMAGENET100_LIST = Path(__file__).resolve().parent / "resources" / "imagenet100.txt"


@dataclass
class ToyWorldConfig:
    """Sizes and counts of the toy world; ``scale`` multiplies every count."""

    seed: int = 0
    num_classes: int = 8
    scale: float = 1.0
    classification_size: int = 96
    detection_size: int = 128
    texture_consistency: float = 0.75  # probability an object wears its class's texture
    imagenet_train_per_class: int = 150
    imagenet_val_per_class: int = 30
    caltech_per_class: int = 45
    caltech_background: int = 30
    # (train, val, test) per class. The official 10/10 training images per class left every toy model,
    # supervised included, within a few test images of chance on 8 classes (random init 16.3, supervised
    # 27.5, one test image 0.6 points), so the toy split doubles them (Caltech's toy split has 20 too).
    flowers_per_class: int = (20, 10, 40)  # type: ignore[assignment]
    voc2007_trainval: int = 160
    voc2007_test: int = 100
    voc2012_trainval: int = 160
    coco_train: int = 200
    coco_val: int = 80
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {self.num_classes}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        self.flowers_per_class = tuple(self.flowers_per_class)  # type: ignore[assignment]
        self.class_names = list(SHAPES[: self.num_classes])

    def count(self, n: int, minimum: int = 1) -> int:
        return max(minimum, int(round(n * self.scale)))


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def shape_outline(kind: str) -> np.ndarray:
    """Unit-size outline (roughly within the unit disc) of a shape class, as (N, 2) points."""
    if kind == "disc":
        return _regular(36, 1.0)
    if kind == "ellipse":
        return _regular(36, 1.0) * [1.0, 0.5]
    if kind == "square":
        return _regular(4, 1.0, math.pi / 4)
    if kind == "triangle":
        return _regular(3, 1.0, -math.pi / 2) + [0, 0.15]
    if kind == "star":
        points = _regular(10, 1.0, -math.pi / 2)
        points[1::2] *= 0.42
        return points
    if kind == "cross":
        a, b = 0.33, 1.0
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
    if kind == "crescent":
        outer = np.linspace(-0.62 * math.pi, 0.62 * math.pi, 24)
        inner = np.linspace(0.62 * math.pi, -0.62 * math.pi, 24)
        outer_pts = np.stack([np.cos(outer), np.sin(outer)], 1)
        inner_pts = np.stack([0.62 * np.cos(inner) - 0.25, 0.75 * np.sin(inner)], 1)
        return np.concatenate([outer_pts, inner_pts]) - [0.2, 0]
    if kind == "arrow":
        return np.array([[-1, -0.3], [0.15, -0.3], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.3], [-1, 0.3]])
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y], 1) / 17.0
    if kind == "ell":
        return np.array([[-0.8, -1], [-0.2, -1], [-0.2, 0.4], [0.8, 0.4], [0.8, 1], [-0.8, 1]])
    raise ValueError(f"unknown shape {kind}")


def place_outline(kind: str, cx: float, cy: float, radius: float, angle: float, stretch: float) -> np.ndarray:
    points = shape_outline(kind) * [radius * stretch, radius / stretch]
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + [cx, cy]


def _random_color(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]):
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array([r, g, b]) * 255


def texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An (h, w, 3) float texture in two random saturated colours."""
    c1 = _random_color(rng, (0.55, 1.0), (0.65, 1.0))
    c2 = _random_color(rng, (0.3, 1.0), (0.15, 0.6))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(3.5, 7.0)
    angle = rng.uniform(0, math.pi)
    if kind == "stripes":
        pattern = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
    elif kind == "checks":
        pattern = ((xx // (period / 1.3)).astype(int) + (yy // (period / 1.3)).astype(int)) % 2 == 0
    elif kind == "dots":
        gx, gy = (xx % period) - period / 2, (yy % period) - period / 2
        pattern = gx**2 + gy**2 > (period * 0.3) ** 2
    elif kind == "rings":
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        pattern = np.sin(np.hypot(xx - cx, yy - cy) * 2 * math.pi / period) > 0
    elif kind == "speckle":
        pattern = rng.random((h, w)) > 0.5
    elif kind == "solid":
        pattern = np.ones((h, w), bool)
    else:
        raise ValueError(f"unknown texture {kind}")
    out = np.where(pattern[..., None], c1, c2)
    return out + rng.normal(0, 6, out.shape)


def background(h: int, w: int, rng: np.random.Generator, clutter: int) -> np.ndarray:
    """Low-frequency colour field plus random strokes and blobs that belong to no class."""
    coarse = rng.uniform(40, 200, (4, 4, 3)).astype(np.float32)
    field_img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    canvas = np.asarray(field_img, dtype=np.float32) * 0.8 + rng.normal(0, 10, (h, w, 3))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(clutter):
        color = tuple(int(v) for v in _random_color(rng, (0.0, 0.5), (0.3, 0.9)))
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            length, theta = rng.uniform(0.1, 0.5) * w, rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + length * math.cos(theta), y0 + length * math.sin(theta))],
                      fill=color, width=int(rng.integers(1, 3)))
        else:
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.09) * w
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = r * rng.uniform(0.4, 1.0, n)
            draw.polygon([(cx + a * math.cos(t), cy + a * math.sin(t)) for a, t in zip(radii, angles)], fill=color)
    return np.asarray(img, dtype=np.float32)


@dataclass
class DrawnObject:
    class_index: int
    polygon: np.ndarray  # (N, 2) in pixel coordinates, may extend past the image border


def draw_object(canvas: np.ndarray, obj: DrawnObject, texture_kind: str, rng: np.random.Generator) -> None:
    h, w = canvas.shape[:2]
    mask_img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in obj.polygon], fill=255, outline=255)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
    fill = texture(texture_kind, h, w, rng)
    canvas[:] = canvas * (1 - mask) + fill * mask


def object_texture(class_index: int, config: ToyWorldConfig, rng: np.random.Generator) -> str:
    if rng.random() < config.texture_consistency:
        return TEXTURES[class_index % len(TEXTURES)]
    return TEXTURES[int(rng.integers(len(TEXTURES)))]


def to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------
# Geometry helpers for annotations
# ----------------------------------------------------------------------------------------------------


def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon to the image rectangle [0, width] x [0, height]."""
    edges = ((0, 0.0, 1), (0, width, -1), (1, 0.0, 1), (1, height, -1))  # (axis, bound, inside sign)
    output = [tuple(p) for p in points]
    for axis, bound, sign in edges:
        source, output = output, []
        if not source:
            break
        for i, current in enumerate(source):
            previous = source[i - 1]
            cur_in = (current[axis] - bound) * sign >= 0
            prev_in = (previous[axis] - bound) * sign >= 0
            if cur_in != prev_in:
                t = (bound - previous[axis]) / (current[axis] - previous[axis])
                output.append(tuple(previous[k] + t * (current[k] - previous[k]) for k in range(2)))
            if cur_in:
                output.append(current)
    return np.array(output, dtype=np.float64).reshape(-1, 2)


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _box(points: np.ndarray) -> tuple[float, float, float, float]:
    return float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


def _stream(seed: int, *key: object) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def classification_scene(
    class_index: int, config: ToyWorldConfig, rng: np.random.Generator, size: tuple[int, int], distractor_p: float
) -> Image.Image:
    w, h = size
    canvas = background(h, w, rng, clutter=int(rng.integers(3, 8)))
    others = [c for c in range(config.num_classes) if c != class_index]
    if rng.random() < distractor_p:
        other = int(rng.choice(others))
        r = rng.uniform(0.08, 0.13) * min(w, h)
        corner = rng.uniform(r, [w - r, h - r])
        polygon = place_outline(SHAPES[other], corner[0], corner[1], r, rng.uniform(0, 2 * math.pi), 1.0)
        draw_object(canvas, DrawnObject(other, polygon), object_texture(other, config, rng), rng)
    radius = rng.uniform(0.22, 0.38) * min(w, h)
    cx = w / 2 + rng.uniform(-0.15, 0.15) * w
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h
    polygon = place_outline(
        SHAPES[class_index], cx, cy, radius, rng.uniform(-0.5, 0.5), rng.uniform(0.85, 1.15)
    )
    draw_object(canvas, DrawnObject(class_index, polygon), object_texture(class_index, config, rng), rng)
    return to_image(canvas)


def detection_scene(config: ToyWorldConfig, rng: np.random.Generator) -> tuple[Image.Image, list[DrawnObject]]:
    w = config.detection_size
    h = int(config.detection_size * rng.choice([0.75, 0.875, 1.0]))
    canvas = background(h, w, rng, clutter=int(rng.integers(4, 10)))
    objects: list[DrawnObject] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            class_index = int(rng.integers(config.num_classes))
            radius = float(rng.uniform(0.07, 0.3) * w)
            cx, cy = rng.uniform(-0.05 * w, 1.05 * w), rng.uniform(-0.05 * h, 1.05 * h)
            polygon = place_outline(
                SHAPES[class_index], cx, cy, radius, rng.uniform(-0.6, 0.6), rng.uniform(0.85, 1.15)
            )
            visible = clip_polygon(polygon, w, h)
            if len(visible) < 3 or polygon_area(visible) < 0.55 * polygon_area(polygon):
                continue
            box = _box(visible)
            if all(_iou(box, other) < 0.25 for other in boxes):
                break
        else:
            continue
        obj = DrawnObject(class_index, polygon)
        draw_object(canvas, obj, object_texture(class_index, config, rng), rng)
        objects.append(obj)
        boxes.append(box)
    return to_image(canvas), objects


# ----------------------------------------------------------------------------------------------------
# Layout writers
# ----------------------------------------------------------------------------------------------------


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def imagenet_wnids(num_classes: int) -> list[str]:
    wnids = [line.strip() for line in IMAGENET100_LIST.read_text().splitlines() if line.strip()]
    return wnids[:num_classes]


def write_imagenet(root: Path, config: ToyWorldConfig) -> dict:
    wnids = imagenet_wnids(config.num_classes)
    size = (config.classification_size, config.classification_size)
    counts = {"train": config.count(config.imagenet_train_per_class), "val": config.count(config.imagenet_val_per_class)}
    for split, per_class in counts.items():
        for c, wnid in enumerate(wnids):
            for i in range(per_class):
                rng = _stream(config.seed, "imagenet", split, c, i)
                image = classification_scene(c, config, rng, size, distractor_p=0.25)
                _save_jpeg(image, root / "imagenet100" / split / wnid / f"{wnid}_{i + 1}.JPEG")
    return {"wnids": wnids, "per_class": counts}


def write_caltech(root: Path, config: ToyWorldConfig) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    per_class = config.count(config.caltech_per_class, minimum=6)
    for c, name in enumerate(config.class_names):
        for i in range(per_class):
            rng = _stream(config.seed, "caltech", c, i)
            w, h = int(rng.integers(80, 121)), int(rng.integers(70, 111))
            image = classification_scene(c, config, rng, (w, h), distractor_p=0.0)
            if rng.random() < 0.1:
                image = image.convert("L")  # real Caltech-101 has greyscale images
            _save_jpeg(image, base / name / f"image_{i + 1:04d}.jpg")
    n_background = config.count(config.caltech_background)
    for i in range(n_background):
        rng = _stream(config.seed, "caltech", "background", i)
        w, h = int(rng.integers(80, 121)), int(rng.integers(70, 111))
        _save_jpeg(to_image(background(h, w, rng, clutter=12)), base / "BACKGROUND_Google" / f"image_{i + 1:04d}.jpg")
    return {"per_class": per_class, "background": n_background}


def write_flowers(root: Path, config: ToyWorldConfig) -> dict:
    base = root / "flowers-102"
    n_train, n_val, n_test = (config.count(n) for n in config.flowers_per_class)
    labels, split_ids = [], {"trnid": [], "valid": [], "tstid": []}
    rng_order = _stream(config.seed, "flowers", "order")
    entries = [(c, split) for c in range(config.num_classes)
               for split, n in (("trnid", n_train), ("valid", n_val), ("tstid", n_test)) for _ in range(n)]
    order = rng_order.permutation(len(entries))  # the official files interleave classes too
    for image_id, entry_index in enumerate(order, start=1):
        c, split = entries[entry_index]
        rng = _stream(config.seed, "flowers", image_id)
        w, h = int(rng.integers(90, 129)), int(rng.integers(90, 129))
        _save_jpeg(classification_scene(c, config, rng, (w, h), distractor_p=0.0), base / "jpg" / f"image_{image_id:05d}.jpg")
        labels.append(c + 1)
        split_ids[split].append(image_id)
    _save_mat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    _save_mat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in split_ids.items()})
    return {"train": n_train * config.num_classes, "val": n_val * config.num_classes, "test": n_test * config.num_classes}


MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by masked-contrastive-ssl toy world"


def _save_mat(path: Path, variables: dict) -> None:
    """``scipy.io.savemat`` with a fixed header: scipy stamps the creation time into the 116-byte text
    field, which would make two worlds of the same seed differ byte for byte."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    data = bytearray(buffer.getvalue())
    data[:116] = MAT_HEADER_TEXT.ljust(116, b" ")
    path.write_bytes(bytes(data))


def _voc_annotation(file_id: str, year: str, image: Image.Image, objects: list[DrawnObject], names: list[str]) -> bytes:
    w, h = image.size
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "masked-contrastive-ssl toy world"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        visible = clip_polygon(obj.polygon, w, h)
        x0, y0, x1, y1 = _box(visible)
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = names[obj.class_index]
        ET.SubElement(node, "pose").text = "Unspecified"
        truncated = bool(np.any(obj.polygon < 0) or np.any(obj.polygon[:, 0] > w) or np.any(obj.polygon[:, 1] > h))
        ET.SubElement(node, "truncated").text = str(int(truncated))
        ET.SubElement(node, "difficult").text = str(int(min(x1 - x0, y1 - y0) < 10))
        box = ET.SubElement(node, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            limit = w if tag[0] == "x" else h
            ET.SubElement(box, tag).text = str(int(min(max(round(value), 1), limit)))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def write_voc(root: Path, config: ToyWorldConfig) -> dict:
    base = root / "VOCdevkit"
    base.mkdir(parents=True, exist_ok=True)
    (base / "classes.txt").write_text("\n".join(config.class_names) + "\n")
    summary = {}
    plans = {"2007": {"trainval": config.voc2007_trainval, "test": config.voc2007_test},
             "2012": {"trainval": config.voc2012_trainval}}
    for year, splits in plans.items():
        voc = base / f"VOC{year}"
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        ids_per_split = {}
        for split, n in splits.items():
            ids = []
            for i in range(config.count(n, minimum=2)):
                file_id = f"{year}_{split}_{i + 1:06d}" if year == "2012" else f"{i + 1 + (0 if split == 'trainval' else 500000):06d}"
                rng = _stream(config.seed, "voc", year, split, i)
                image, objects = detection_scene(config, rng)
                _save_jpeg(image, voc / "JPEGImages" / f"{file_id}.jpg")
                (voc / "Annotations" / f"{file_id}.xml").write_bytes(
                    _voc_annotation(file_id, year, image, objects, config.class_names)
                )
                ids.append(file_id)
            ids_per_split[split] = ids
        trainval = ids_per_split["trainval"]
        ids_per_split["train"], ids_per_split["val"] = trainval[::2], trainval[1::2]
        for split, ids in ids_per_split.items():
            (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        summary[f"VOC{year}"] = {split: len(ids) for split, ids in ids_per_split.items()}
    return summary


def coco_category_ids(num_classes: int) -> list[int]:
    """Non-contiguous ids, as in COCO (1, 2, 3, 5, 6, 8, ...), so loaders must map them."""
    return [c + 1 + c // 3 for c in range(num_classes)]


def write_coco(root: Path, config: ToyWorldConfig) -> dict:
    base = root / "coco"
    category_ids = coco_category_ids(config.num_classes)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(category_ids, config.class_names)]
    summary = {}
    annotation_id = 1
    for split, n in (("train2017", config.coco_train), ("val2017", config.coco_val)):
        images, annotations = [], []
        for i in range(config.count(n, minimum=2)):
            image_id = (1 if split == "train2017" else 500001) + i
            rng = _stream(config.seed, "coco", split, i)
            image, objects = detection_scene(config, rng)
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(image, base / split / file_name)
            w, h = image.size
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
            for obj in objects:
                visible = clip_polygon(obj.polygon, w, h)
                x0, y0, x1, y1 = _box(visible)
                annotations.append({
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": category_ids[obj.class_index],
                    "segmentation": [[round(float(v), 2) for v in visible.reshape(-1)]],
                    "area": round(polygon_area(visible), 2),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "iscrowd": 0,
                })
                annotation_id += 1
        dataset = {
            "info": {"description": "masked-contrastive-ssl toy world", "version": str(TOY_WORLD_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = base / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataset))
        summary[split] = {"images": len(images), "annotations": len(annotations)}
    return summary


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


def generate_toy_world(out: str | Path, config: ToyWorldConfig | None = None, force: bool = False,
                       progress: bool = False) -> dict:
    """Write the toy world under ``out`` and return its manifest.

    Refuses a non-empty ``out`` unless ``force``; with ``force`` only the toy world's own entries
    (the layouts and the manifest) are replaced, nothing else in ``out`` is touched.
    """
    config = config or ToyWorldConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose an empty directory or pass --force to replace the toy world in it")
    out.mkdir(parents=True, exist_ok=True)
    writers = (("imagenet100", write_imagenet), ("caltech101", write_caltech), ("flowers-102", write_flowers),
               ("VOCdevkit", write_voc), ("coco", write_coco))
    manifest: dict = {"version": TOY_WORLD_VERSION, "config": asdict(config), "classes": config.class_names, "layouts": {}}
    with tempfile.TemporaryDirectory(dir=out, prefix=".toy-staging-") as staging:
        stage = Path(staging)
        iterator = writers
        if progress:
            from tqdm import tqdm

            iterator = tqdm(writers, desc="toy world", unit="layout")
        for name, writer in iterator:
            manifest["layouts"][name] = writer(stage, config)
        for entry in (*LAYOUTS, MANIFEST):
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for name in LAYOUTS:
            (stage / name).rename(out / name)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transfer make-toy-data",
        description="Write the built-in synthetic toy world in every dataset layout the suite reads "
        "(ImageNet-style folders, Caltech-101, Flowers-102, VOC2007/2012, COCO 2017).",
    )
    parser.add_argument("out", type=Path, help="output directory (must be empty unless --force)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every image count (e.g. 0.2 for tests)")
    parser.add_argument("--classes", type=int, default=8, help=f"number of shape classes (2-{len(SHAPES)})")
    parser.add_argument("--force", action="store_true", help="replace an existing toy world in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = ToyWorldConfig(seed=args.seed, num_classes=args.classes, scale=args.scale)
        manifest = generate_toy_world(args.out, config, force=args.force, progress=True)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layouts = manifest["layouts"]
    print(f"toy world (seed {args.seed}, {config.num_classes} classes) written to {args.out}:")
    print(f"  imagenet100: {layouts['imagenet100']['per_class']} images per class")
    print(f"  caltech101:  {layouts['caltech101']['per_class']} per class + {layouts['caltech101']['background']} background")
    print(f"  flowers-102: {layouts['flowers-102']}")
    print(f"  VOCdevkit:   {layouts['VOCdevkit']}")
    print(f"  coco:        {layouts['coco']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
