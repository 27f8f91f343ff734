"""ImageFolder reading that fails clearly on bad layouts and survives bad images.

* a missing root or split directory, a split without class folders, or an empty class folder is an
  error naming the path and the expected layout;
* an image that cannot be decoded is replaced by the next readable image of the split (so batches keep
  their size, which DDP's collectives need) and reported back with the batch; the training loop warns
  once per file, naming it, and counts it (``skipped_images`` in the log and the checkpoint meta).

Augmentation randomness is a function of (seed, epoch, image index) only, not of which worker process
decodes the image, so an interrupted run resumes with exactly the same views.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from pretrain.stop_request import ignore_in_worker

LAYOUT_HINT = "expected ROOT/<split>/<class>/<image> (ImageNet layout, e.g. imagenet100/train/n01749939/x.JPEG)"
# DecompressionBombError: a header claiming > 2 x Image.MAX_IMAGE_PIXELS (a corrupt or hostile file)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """The dataset directory is missing or does not have the expected layout."""


def without_worker_traceback(err: BaseException) -> str:
    """``str(err)``, minus the worker's traceback that DataLoader writes into the message of an exception
    it re-raises from a worker process (e.g. a DataError of an unreadable split), so the command line
    still shows the one-line message the worker raised."""
    text = str(err)
    if not (text.startswith("Caught ") and "DataLoader worker" in text and "Original Traceback" in text):
        return text
    # The traceback ends with "module.ExceptionName: message" (builtins without the module).
    for line in reversed(text.splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == type(err).__name__:
            return message
    return text


def find_images(root: str | Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted folder names) and (path, class index) samples of ``root/split``."""
    root = Path(root)
    if root.exists() and not root.is_dir():  # not "not found": the path is there, but is a file
        raise DataError(f"data.root={root} is a file, not a directory: set data.root=DIR ({LAYOUT_HINT})")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}; set data.root=DIR ({LAYOUT_HINT})")
    split_dir = root / split
    if split_dir.exists() and not split_dir.is_dir():
        raise DataError(f"{split_dir} is a file, not a split directory; {LAYOUT_HINT}")
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"split directory not found: {split_dir} (found: {found or 'nothing'}); {LAYOUT_HINT}")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders in {split_dir}; {LAYOUT_HINT}")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(
            entry.path for entry in os.scandir(class_dir)
            if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(IMG_EXTENSIONS)}); add images or "
                "remove the folder (every class folder must hold at least one image)"
            )
        samples.extend((path, index) for path in files)
    return classes, samples


def balanced_subset(samples: Sequence[tuple[str, int]], total: int, seed: int) -> list[tuple[str, int]]:
    """About ``total`` samples with the same number per class, picked reproducibly."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    per_class = max(1, total // len(by_class))
    chosen: list[tuple[str, int]] = []
    generator = torch.Generator().manual_seed(seed)
    for label in sorted(by_class):
        items = by_class[label]
        order = torch.randperm(len(items), generator=generator)[:per_class].tolist()
        chosen.extend(items[i] for i in sorted(order))
    return chosen


def sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Sample:
    views: Any  # whatever the transform returns
    label: int
    index: int
    skipped: list[str] = field(default_factory=list)  # unreadable files replaced by this sample


class ImageFolderDataset(Dataset):
    """``root/split/<class>/*`` images through ``transform(pil_image) -> views``; see the module doc."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[Image.Image], Any],
        seed: int = 0,
        limit: int | None = None,
    ):
        self.root, self.split = Path(root), split
        self.classes, samples = find_images(root, split)
        self.samples = balanced_subset(samples, limit, seed) if limit else samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0  # used for plain integer indices (evaluation)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        # A training sampler yields (epoch, index) so views differ per epoch even in persistent workers.
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        skipped: list[str] = []
        for offset in range(min(len(self.samples), 64)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as handle:
                    image = handle.convert("RGB")
            except DECODE_ERRORS:
                skipped.append(path)
                continue
            # The views depend on (seed, epoch, index) only, whichever worker decodes them.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                views = self.transform(image)
            return Sample(views, label, index, skipped)
        raise DataError(
            f"{len(skipped)} consecutive images of {self.root / self.split} cannot be read (first: {skipped[0]}); "
            "the dataset looks corrupt or is not made of images"
        )


class ResumableSampler(Sampler[tuple[int, int]]):
    """A seeded per-epoch permutation, split over processes, that can start part-way into an epoch.

    Like ``DistributedSampler(drop_last=True)`` but ``start_batch`` skips the batches an interrupted
    run already trained on, so resuming continues with exactly the samples that were next.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size * world_size > size:
            raise DataError(
                f"the split has {size} images, fewer than one global batch of {batch_size * world_size}; "
                "lower data.batch_size or add images"
            )
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        global_batch = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            chunk = order[batch * global_batch:(batch + 1) * global_batch]
            for index in chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]:
                yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def worker_init(worker_id: int) -> None:
    # One intra-op thread per data worker: the training process needs the cores.
    torch.set_num_threads(1)
    ignore_in_worker()


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """Stack the views (whatever structure the transform returns) and gather the skipped files."""
    return {
        "views": default_collate([s.views for s in samples]),
        "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        "index": torch.tensor([s.index for s in samples], dtype=torch.long),
        "skipped": [path for s in samples for path in s.skipped],
    }
