"""Open any weights file safely and list every tensor in it under one flat name.

Which reader runs is decided by the file's first bytes, not its suffix (a ``.pkl`` that is really a
``torch.save`` zip, or a ``.pth`` written by plain ``pickle``, both occur in the wild):

* zip archive or legacy ``torch.save`` stream -> ``torch.load(weights_only=True)``, numpy arrays and
  scalars allowed; if other Python objects sit beside the weights (Lightning hyper-parameters, argparse
  namespaces), they are left as inert placeholders (:mod:`transfer.inert_torch_load`);
* anything else -> the restricted unpickler of :mod:`transfer.safe_pickle`.

Neither can run code from the file. Files that are clearly not checkpoints (an HTML page saved by a
failed download, a TorchScript archive, safetensors without the ``safetensors`` package) get their own
message.

:func:`flatten_tensors` then walks the nested dicts (``{"state_dict": {...}}``, DINO's
``{"student": ..., "teacher": ...}``, Lightning, timm's ``state_dict_ema`` ...) and names each tensor by
its path, e.g. ``state_dict.module.encoder_q.conv1.weight``, so one search over all of them can find
every ResNet trunk in the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError, safe_torch_load
from transfer.inert_torch_load import inert_torch_load
from transfer.safe_pickle import ALLOWED_NUMPY_GLOBALS, numpy_dtype_classes, restricted_pickle_loads

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch.save before 1.6
MAX_NESTING = 6


@dataclass
class FlatTensors:
    """Every tensor of a file by flat name, and where each one sits (container path, key inside it)."""

    tensors: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    location: dict[str, tuple[str, str]] = field(default_factory=dict)
    other_entries: int = 0  # non-tensor leaves (epoch, hyper-parameters, ...)

    def container_of(self, key: str) -> str:
        return self.location[key][0]

    def inner_key(self, key: str) -> str:
        return self.location[key][1]


def read_weights_file(path: str | os.PathLike) -> tuple[Any, list[str]]:
    """Load ``path`` without running code from it; return (object, notes about how it was read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}; was the run killed while saving?")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_ZIP_MAGIC):
        _refuse_torchscript(path)
        return _torch_load(path)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return _torch_load(path)
    _refuse_non_checkpoints(path, head)
    try:
        return restricted_pickle_loads(path.read_bytes(), str(path)), []
    except CheckpointError as err:
        if head.startswith(b"\x80") or not isinstance(err.__cause__, pickle.UnpicklingError):
            raise  # a protocol 2+ pickle (what torch.save and detectron2 write) that is damaged or unsafe
        # protocols 0-1 are text-like, so only a failed parse tells them apart from a text file
        raise CheckpointError(
            f"cannot read {path}: it is not a checkpoint (neither a torch.save file nor a pickle; it starts with "
            f"{head[:16]!r}). Point to the .pth / .pth.tar / .pkl file that holds the weights."
        ) from err


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` (numpy arrays/scalars allowed too); if the file also holds other
    Python objects, load it again with those objects left as inert placeholders (see
    :mod:`transfer.inert_torch_load`) and say so in the returned notes."""
    numpy_globals = [(obj, f"{module}.{name}") for (module, name), obj in ALLOWED_NUMPY_GLOBALS.items()]
    # torch only sets the state of objects whose exact type is allowed: numpy 2's dtype classes
    numpy_globals += [(cls, f"numpy.dtypes.{cls.__name__}") for cls in numpy_dtype_classes()]
    try:
        with torch.serialization.safe_globals(numpy_globals):
            return safe_torch_load(path), []
    except CheckpointError as err:
        if not isinstance(err.__cause__, pickle.UnpicklingError):
            raise
    obj, placeholders = inert_torch_load(path)
    if not placeholders:
        return obj, []
    shown = ", ".join(placeholders[:6]) + (" ..." if len(placeholders) > 6 else "")
    return obj, [f"{len(placeholders)} kinds of Python objects in the file were not rebuilt (no code from the file "
                 f"ran; they are not weights): {shown}"]


def _refuse_non_checkpoints(path: Path, head: bytes) -> None:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise CheckpointError(
            f"{path} is an HTML/XML page, not a checkpoint (a failed or redirected download?). Download the "
            "file again, following the link to the actual weights."
        )
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:10] == b'{"'):
        raise CheckpointError(
            f"{path} looks like a safetensors file, which this converter does not read yet. Load it with "
            "`safetensors.torch.load_file` and `torch.save` the resulting state_dict as a .pth."
        )


def _refuse_torchscript(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # truncated: safe_torch_load gives the message
    if any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in names):
        raise CheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), not a state_dict. Load it with "
            "torch.jit.load in a trusted environment and torch.save(model.state_dict()) instead."
        )


def flatten_tensors(obj: Any) -> FlatTensors:
    """Name every tensor/array in nested string-keyed dicts by its dotted path (lists are skipped)."""
    flat = FlatTensors()
    if isinstance(obj, (torch.Tensor, np.ndarray)) or not isinstance(obj, dict):
        return flat
    _walk(obj, (), flat, 0)
    return flat


def _walk(node: dict, container: tuple[str, ...], flat: FlatTensors, depth: int) -> None:
    for key, value in node.items():
        if not isinstance(key, str):
            flat.other_entries += 1  # optimizer state is keyed by parameter index, not by name
            continue
        name = ".".join((*container, key))
        if isinstance(value, (torch.Tensor, np.ndarray)):
            if name in flat.tensors:
                raise CheckpointError(
                    f"the checkpoint names two different tensors '{name}' (once as a nested dict, once as "
                    "a dotted key); pass --prefix to say which trunk to use"
                )
            flat.tensors[name] = value
            flat.location[name] = (".".join(container), key)
        elif isinstance(value, dict) and depth < MAX_NESTING:
            _walk(value, (*container, key), flat, depth + 1)
        else:
            flat.other_entries += 1


def to_tensor(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A CPU tensor from a tensor or a numeric numpy array (object/str arrays are refused)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value.dtype.kind not in "fiub":
        raise CheckpointError(f"'{name}' is a numpy array of dtype {value.dtype}, not numbers")
    return torch.from_numpy(np.array(value, copy=True))
