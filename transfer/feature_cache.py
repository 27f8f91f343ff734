"""Frozen features, extracted once and cached on disk.

The logistic-regression protocols (Ericsson et al.) train on fixed features of un-augmented images, so a
split's features depend only on: the weights (file sha256), the architecture, the dataset and split with
the exact image list (:meth:`LabelledImages.fingerprint`), the preprocessing (resize, crop, interpolation,
normalization) and the input filter. :func:`feature_key` hashes exactly these; a cache file holds its
full key description and is used only when it matches, so a changed image, checkpoint or preprocessing
never reuses stale features. Files are written atomically (``.npz``, no pickles); an unreadable cache
file is recomputed.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pretrain.fileio import atomic_write_bytes, sha256_json
from transfer.classification_data import ImageListDataset, LabelledImages
from transfer.frozen_encoder import FrozenEncoder

CACHE_VERSION = 1


def feature_key(*, weights_sha256: str, arch: str, dataset: str, split: str, data_fingerprint: str,
                preprocessing: dict[str, Any], input_filter: dict[str, Any]) -> dict[str, Any]:
    """Everything a split's features depend on (see module docstring); its hash names the cache file."""
    return {"version": CACHE_VERSION, "weights_sha256": weights_sha256, "arch": arch, "dataset": dataset,
            "split": split, "data": data_fingerprint, "preprocessing": preprocessing, "input_filter": input_filter}


@dataclass
class Features:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    cached: bool  # True when read from the cache
    path: Path | None = None


class FeatureCache:
    """A folder of ``<dataset>_<split>_<hash>.npz`` files, one per :func:`feature_key`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path_for(self, key: dict[str, Any]) -> Path:
        return self.directory / f"{key['dataset']}_{key['split']}_{sha256_json(key)[:24]}.npz"

    def load(self, key: dict[str, Any]) -> Features | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as content:
                stored_key = json.loads(str(content["key"]))
                features, labels = content["features"], content["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # JSONDecodeError is a ValueError
            return None  # truncated or foreign file: recompute and overwrite it
        if stored_key != json.loads(json.dumps(key)) or len(features) != len(labels):
            return None
        return Features(features, labels, cached=True, path=path)

    def save(self, key: dict[str, Any], features: np.ndarray, labels: np.ndarray) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels, key=np.array(json.dumps(key, sort_keys=True)))
        path = self.path_for(key)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Features:
        found = self.load(key)
        if found is not None:
            return found
        features, labels = compute()
        return Features(features, labels, cached=False, path=self.save(key, features, labels))


def extract_features(
    encoder: FrozenEncoder,
    images: LabelledImages,
    transform: Callable,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of every image of a split, in order."""
    loader = torch.utils.data.DataLoader(
        ImageListDataset(images, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
    )
    features, labels = [], []
    encoder.eval()
    for batch, target in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        features.append(encoder(batch.to(device, non_blocking=True)).float().cpu().numpy())
        labels.append(target.numpy())
    if not features:
        return np.zeros((0, encoder.feature_dim), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)
