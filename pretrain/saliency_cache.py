"""A per-image saliency cache for the ``frozen`` saliency source (issue 9).

The paper runs a frozen supervised ResNet-50 on both views at every step. A frozen network gives the same
answer every epoch, so this cache computes each training image's activation map once, on the whole image
and on a grid finer than the 7 x 7 masking grid (ResNet layer4 at ``image_size`` px: 14 x 14 at 448 px),
and stores it memory-mapped. A training step then maps the cached map onto each random crop with the
crop's geometry and flip (:func:`pretrain.saliency.map_cells`) instead of a forward pass. Keep the
per-step mode for exact paper replication: a CNN's activations are not exactly crop-equivariant, and the
whole image is resized to a square (its aspect ratio is not kept) before the cache's forward pass.

Layout, under ``<root>/<key>/`` where ``key`` hashes the file list (paths, sizes, modification times), the
network's weights hash, ``image_size`` and the normalization:
``maps.npy`` (float32, N x g x g, memory-mapped), ``files.txt``, ``meta.json`` (``done`` rows, ``complete``).
Building is resumable: rows are flushed and ``meta.json`` rewritten atomically after every batch, so an
interrupted build continues where it stopped. An unreadable image gets a constant map (every cell
foreground, i.e. random masking for that image) and one warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from pretrain.checkpoint import IMAGENET_NORMALIZE
from pretrain.data import DECODE_ERRORS
from pretrain.fileio import atomic_write_json, atomic_write_text, sha256_json
from pretrain.saliency import (
    DEFAULT_GRID,
    DEFAULT_STD_RATIO,
    SaliencyMaps,
    activation_map,
    map_cells,
    saliency_from_cells,
)

CACHE_VERSION = 1


def cache_key(files: Sequence[str | os.PathLike], weights_sha256: str, image_size: int,
              normalize: dict[str, Any] = IMAGENET_NORMALIZE, layer: str = "layer4") -> str:
    """What the cached maps depend on: every file (path, size, mtime), the weights, the input size, the
    stage whose map is cached."""
    entries = []
    for file in files:
        stat = os.stat(file)
        entries.append([str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns])
    return sha256_json({"version": CACHE_VERSION, "files": entries, "weights": weights_sha256,
                        "image_size": int(image_size), "normalize": normalize, "layer": layer})[:20]


class SaliencyCache:
    """Read side: cached whole-image activation maps, looked up by dataset index and mapped onto crops."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no saliency cache at {self.directory} (missing meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise RuntimeError(f"the saliency cache at {self.directory} is incomplete "
                               f"({self.meta.get('done')}/{self.meta.get('count')}); rebuild it")
        self.maps = np.load(self.directory / "maps.npy", mmap_mode="r")

    @property
    def grid(self) -> int:
        return int(self.maps.shape[-1])

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def cells(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, g, g) float32 whole-image maps of dataset items ``indices`` (on the CPU)."""
        rows = np.asarray(indices.detach().cpu().numpy(), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.maps[rows], dtype=np.float32))

    def crop_saliency(self, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                      grid: int = DEFAULT_GRID, std_ratio: float = DEFAULT_STD_RATIO,
                      released_code: bool = False) -> SaliencyMaps:
        """Saliency of each crop (``boxes``: (B, 4) (y0, x0, y1, x1) in [0, 1]; ``flips``: (B,)) from the cache,
        on ``boxes``' device."""
        whole = self.cells(indices).to(boxes.device)
        batch = whole.shape[0]
        whole_box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=boxes.device).expand(batch, 4)
        no_flip = torch.zeros(batch, dtype=torch.bool, device=boxes.device)
        mapped = map_cells(whole, whole_box, no_flip, boxes, flips, grid)
        return saliency_from_cells(mapped, std_ratio, released_code)


class _WholeImages(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], image_size: int, normalize: dict[str, Any]):
        self.files, self.image_size, self.normalize = list(files), int(image_size), normalize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            with Image.open(self.files[index]) as image:
                pixels = TF.pil_to_tensor(image.convert("RGB"))
        except DECODE_ERRORS:
            return torch.zeros(3, self.image_size, self.image_size), False
        pixels = TF.resize(pixels, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(pixels.float() / 255, self.normalize["mean"], self.normalize["std"]), True


@torch.no_grad()
def build_saliency_cache(root: str | os.PathLike, files: Sequence[str | os.PathLike], network: nn.Module,
                         weights_sha256: str, image_size: int = 448, batch_size: int = 32,
                         device: torch.device | str = "cpu", num_workers: int = 0, progress: bool = True,
                         normalize: dict[str, Any] = IMAGENET_NORMALIZE, layer: str = "layer4") -> SaliencyCache:
    """Compute (or finish, or reuse) the cache of ``files`` for ``network`` (images -> the conv features
    of ``layer``, which only names them in the key)."""
    files = [str(f) for f in files]
    if not files:
        raise ValueError("no images to cache saliency for")
    directory = Path(root) / cache_key(files, weights_sha256, image_size, normalize, layer)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta and meta.get("complete"):
        return SaliencyCache(directory)
    network = network.eval().to(device)
    if meta is None:
        directory.mkdir(parents=True, exist_ok=True)
        probe = network(torch.zeros(1, 3, image_size, image_size, device=device))
        grid = int(probe.shape[-1])
        np.lib.format.open_memmap(directory / "maps.npy", mode="w+", dtype=np.float32,
                                  shape=(len(files), int(probe.shape[-2]), grid)).flush()
        atomic_write_text(directory / "files.txt", "\n".join(files) + "\n")
        meta = {"version": CACHE_VERSION, "count": len(files), "done": 0, "complete": False,
                "image_size": int(image_size), "weights_sha256": weights_sha256, "normalize": normalize,
                "layer": layer, "unreadable": []}
        atomic_write_json(meta_path, meta)
    maps = np.load(directory / "maps.npy", mmap_mode="r+")
    start = int(meta["done"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_WholeImages(files, image_size, normalize), range(start, len(files))),
        batch_size=batch_size, num_workers=num_workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="saliency cache", unit="batch", initial=start // batch_size,
                      total=(len(files) + batch_size - 1) // batch_size)
    row = start
    for images, readable in loader:
        cells = activation_map(network(images.to(device))).cpu().numpy()
        for offset in torch.nonzero(~readable).flatten().tolist():
            cells[offset] = 0.0  # constant map: every cell foreground
            meta["unreadable"].append(files[row + offset])
            warnings.warn(f"saliency cache: cannot read {files[row + offset]}; using a uniform map", stacklevel=2)
        maps[row:row + len(cells)] = cells
        maps.flush()
        row += len(cells)
        meta["done"] = row
        atomic_write_json(meta_path, meta)
    meta["complete"] = True
    atomic_write_json(meta_path, meta)
    del maps
    return SaliencyCache(directory)
