"""Images/s of the real training loader: the engine's dataset, two-crop aug+ pipeline, sampler and
DataLoader (``Trainer._build_data``, the configured ``data.num_workers``) on real JPEG files.

The main process only takes batches, so this is what the pipeline can deliver; the training step must not
need more (``python -m pretrain.bench`` compares the two). The clock runs from the iterator's creation
(worker start-up included, so the rate is if anything low) over whole rounds of the workers. :func:`imagenet_sized_copy` writes ImageNet-sized JPEGs (default 500 x 375, the
most common ImageNet size) from a small dataset, for a paper-scale loader measurement when only the toy
world is at hand: decoding cost grows with the pixel count, so 96 px toy JPEGs would flatter the loader.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pretrain.data import find_images


def imagenet_sized_copy(source_root: str | Path, target_root: str | Path, per_class: int,
                        size: tuple[int, int] = (500, 375), split: str = "train", quality: int = 90) -> Path:
    """``target_root/<split>/<class>/*.JPEG``: the first ``per_class`` images of each class of
    ``source_root/<split>`` resized to ``size`` (width, height); existing files are kept."""
    classes, samples = find_images(source_root, split)
    target_root = Path(target_root)
    taken: dict[int, int] = {}
    for path, label in samples:
        if taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        out = target_root / split / classes[label] / (Path(path).stem + ".JPEG")
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        partial = out.with_suffix(".partial")
        resized.save(partial, format="JPEG", quality=quality)
        os.replace(partial, out)
    return target_root


def loader_batches(requested: int, workers: int) -> int:
    """Whole rounds of the workers, at least two: each worker builds a whole batch, so batches arrive in
    bursts of ``workers`` and only whole rounds give a fair rate."""
    per_round = max(1, workers)
    return math.ceil(max(requested, 2 * per_round) / per_round) * per_round


def loader_benchmark(config: str | Path, overrides: list[str], batches: int) -> dict[str, Any]:
    """Images/s from creating the loader's iterator (worker start-up included) to its ``batches``-th batch."""
    from pretrain import distributed
    from pretrain.config import load_config
    from pretrain.engine import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, distributed.setup("cpu"))
    trainer._build_data()
    if trainer.steps_per_epoch < batches:
        raise ValueError(f"the loader benchmark needs {batches} batches of {cfg.data.batch_size}, the split has "
                         f"{trainer.steps_per_epoch}; lower --loader-batches or add images")
    trainer.sampler.set_epoch(0)
    start = time.perf_counter()
    iterator = iter(trainer.loader)
    first = None
    for index in range(batches):
        next(iterator)
        if index == 0:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    del iterator
    trainer.loader = None  # the (persistent) workers shut down with the loader's iterator
    with Image.open(trainer.train_set.samples[0][0]) as image:
        source_size = list(image.size)
    return {
        "config": str(config), "overrides": list(overrides), "data_root": str(cfg.data.root),
        "source_image_size": source_size, "image_size": int(cfg.augment.image_size),
        "batch": int(cfg.data.batch_size), "num_workers": int(cfg.data.num_workers),
        "batches": batches, "seconds": seconds, "first_batch_s": first,
        "images_per_s": batches * int(cfg.data.batch_size) / seconds,
    }
