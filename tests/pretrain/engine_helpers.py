"""Shared helpers for the engine tests: tiny image folders and tiny-run overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TOY_CONFIGS = sorted((REPO / "configs" / "pretrain" / "toy").glob("*.yaml"))
PAPER_CONFIGS = sorted((REPO / "configs" / "pretrain" / "paper").glob("*.yaml"))


def make_image_folder(root: Path, classes: dict[str, int], size: int = 40, splits=("train", "val"), seed: int = 0
                      ) -> Path:
    """``root/<split>/<class>/img_N.png`` with random images (counts per class)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


def tiny_overrides(data_root: Path, out_dir: Path, method: str = "mocov2", **extra) -> list[str]:
    """Overrides that make any config a seconds-long CPU run (R18 at 32 px, a few steps)."""
    values = {
        "data.root": str(data_root), "out_dir": str(out_dir), "data.batch_size": 8, "data.num_workers": 0,
        "data.limit_train_images": 24, "augment.image_size": 32, "train.epochs": 1, "train.device": "cpu",
        "knn.enabled": False, "visualize.enabled": False, "log.progress": False, "log.every_steps": 1,
        "model.arch": "resnet18",
    }
    if method == "mocov2":
        values.update({"mocov2.queue_size": 64, "mocov2.bn_splits": 2})
    if method == "simclr":
        values.update({"simclr.head_hidden_dim": 64})
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
