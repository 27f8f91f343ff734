"""The suite's checkpoint format: weights plus the metadata every later step needs.

A checkpoint is a ``torch.save``'d dict that loads with ``torch.load(weights_only=True)`` (only tensors,
plain containers and primitives)::

    {
      "format": "masked-ssl/v1",
      "meta": {arch, method, masking, strategy, mask_branch, saliency_source, input_filter, image_size,
               normalize, seed, config, code_version, created, epoch, epochs, finished, ...},
      "backbone": {torchvision ResNet trunk state_dict, no fc},     # what transfer tasks use
      "training": {...}                                             # optional: full state to resume
    }

``meta["input_filter"]`` (see :mod:`pretrain.filters`) tells every transfer task which filter to apply to
its inputs, so a high-pass model is always evaluated on high-pass inputs.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pretrain.backbones import infer_arch
from pretrain.fileio import atomic_torch_save
from pretrain.filters import normalize_filter_spec
from pretrain.provenance import code_version, utc_now

FORMAT = "masked-ssl/v1"
IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or not in the expected format."""


def make_meta(
    *,
    arch: str,
    method: str,
    masking: str = "none",
    strategy: str | None = None,
    mask_branch: str | None = None,
    saliency_source: str | None = None,
    input_filter: dict[str, Any] | str | None = None,
    image_size: int = 224,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata with every field a downstream step reads; ``extra`` keys are kept as given."""
    meta = {
        "arch": arch,
        "method": method,
        "masking": masking,
        "strategy": strategy,
        "mask_branch": mask_branch,
        "saliency_source": saliency_source,
        "input_filter": normalize_filter_spec(input_filter),
        "image_size": int(image_size),
        "normalize": dict(IMAGENET_NORMALIZE),
        "seed": int(seed),
        "config": config or {},
        "code_version": code_version(),
        "created": utc_now(),
    }
    meta.update(extra)
    return meta


def save_checkpoint(
    path: str | os.PathLike,
    backbone: dict[str, torch.Tensor],
    meta: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically; ``backbone`` must be a complete torchvision ResNet trunk."""
    arch = infer_arch(backbone)
    if arch is None:
        raise CheckpointError("backbone is not a complete torchvision ResNet trunk state_dict")
    if arch != meta.get("arch"):
        raise CheckpointError(f"backbone looks like {arch} but meta says {meta.get('arch')}")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "meta": meta,
        "backbone": {k: v.detach().cpu() for k, v in backbone.items()},
    }
    if training is not None:
        payload["training"] = training
    atomic_torch_save(payload, path)


DAMAGED_HINT = "Re-download or re-save it."


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    damaged_hint: str = DAMAGED_HINT) -> Any:
    """``torch.load(weights_only=True)`` with one clear error per way a file can be wrong.

    ``damaged_hint`` ends the error for an empty or truncated file: what the caller's user should do (a run
    directory's own checkpoint cannot be re-downloaded).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path} (was the run killed while saving?). "
                              f"{damaged_hint}")
    if not _looks_like_torch_save(path):  # a text file, an image, ...: torch would misread it as a pickle
        raise CheckpointError(
            f"cannot read {path}: it is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
            f"pickle; it starts with {_head(path)!r}). Point to the .pth file that torch.save wrote."
        )
    damaged = _damaged_zip_member(path)
    if damaged:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({damaged}). {damaged_hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        what = f"e.g. {found.group(1)}" if found else _first_line(err)
        raise CheckpointError(
            f"refusing to load {path}: it contains Python objects other than tensors and plain containers "
            f"({what}). Loading it would run code from the file; re-save only its state_dict."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt, or not a PyTorch checkpoint "
            f"({_first_line(err)}). {damaged_hint}"
        ) from err


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # pickle protocol >= 2: what the legacy (pre-1.6) torch.save stream starts with


def _head(path: Path, size: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _looks_like_torch_save(path: Path) -> bool:
    return _head(path).startswith((_ZIP_MAGIC, _PICKLE_PROTO))


def _damaged_zip_member(path: Path) -> str | None:
    """Why a ``torch.save`` zip archive fails its CRC check, or ``None`` (also for a legacy pickle stream).

    Needed because torch's zip reader does not verify checksums: a file with bytes overwritten inside a
    tensor (bad disk, interrupted copy over an existing file) would otherwise load silently with wrong weights.
    Reading the file once more costs about as much as loading it.
    """
    if not _head(path).startswith(_ZIP_MAGIC):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return _first_line(err)
    return f"checksum mismatch in {bad}" if bad else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def is_suite_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


FOREIGN_HINT = "For third-party checkpoints use `python -m transfer.convert`."


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    foreign_hint: str = FOREIGN_HINT, damaged_hint: str = DAMAGED_HINT) -> dict[str, Any]:
    """Load one of the suite's own checkpoints (use :mod:`transfer.convert` for third-party files).

    ``foreign_hint`` ends the error for a file of another format (what the caller's user should do instead),
    ``damaged_hint`` the one for an empty or truncated file (see :func:`safe_torch_load`).
    """
    obj = safe_torch_load(path, map_location, damaged_hint)
    if not is_suite_checkpoint(obj):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {found!r}). {foreign_hint}")
    for key in ("meta", "backbone"):
        if key not in obj:
            raise CheckpointError(f"{path} is missing its '{key}' entry; the file is incomplete")
    obj["meta"]["input_filter"] = normalize_filter_spec(obj["meta"].get("input_filter"))
    return obj
