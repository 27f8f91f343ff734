"""Checkpoint intake: find the ResNet trunk inside any supported checkpoint, safely.

Every transfer task reads weights through :func:`load_backbone`, so a checkpoint either loads
completely (every trunk key present, shapes consistent) or fails with a message that says why. This is
what makes "the prefix did not match and the transfer result is secretly a model trained from scratch"
impossible.

Supported inputs:

* ``ours``        the suite's own checkpoints (``pretrain.checkpoint``), metadata included;
* ``moco``        ``{"state_dict": {"module.encoder_q.conv1.weight": ...}}`` (query encoder is used);
* ``lightning``   ``{"state_dict": {"backbone.conv1.weight" | "model.backbone...": ...}, "pytorch-lightning_version"}``;
* ``torchvision`` a plain ResNet state_dict (optionally with ``fc``), e.g. torchvision's supervised weights;
* ``simclr``/other ports with ``encoder.`` / ``backbone.`` / ``model.`` / DDP ``module.`` prefixes;
* ``prefix``      anything else, with an explicit ``prefix``.

``.pkl`` files are read with a restricted unpickler that only accepts plain containers and numpy
arrays; ``.pth``/``.pt``/``.ckpt``/``.tar`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.backbones import expected_trunk_keys, infer_arch
from pretrain.checkpoint import CheckpointError, is_suite_checkpoint, safe_torch_load
from pretrain.fileio import sha256_file
from pretrain.filters import normalize_filter_spec

FORMATS = ("auto", "ours", "moco", "torchvision", "simclr", "lightning", "prefix")
# Containers in which checkpoint writers nest the weights.
STATE_CONTAINERS = ("state_dict", "model", "model_state_dict", "network", "net", "params", "module")
# Prefixes of online encoders vs. momentum/teacher copies stored beside them (MoCo, BYOL, DINO ...).
ONLINE_HINTS = ("encoder_q", "backbone.", "encoder.", "online", "student", "model.", "module.")
MOMENTUM_HINTS = ("encoder_k", "momentum", "target", "teacher", "ema")


class NotAResNetError(CheckpointError):
    """The checkpoint holds no complete torchvision ResNet trunk."""


@dataclass
class Backbone:
    """A ResNet trunk read from some checkpoint, in torchvision names, plus where it came from."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    meta: dict[str, Any]
    source_format: str
    prefix: str
    path: str
    sha256: str
    dropped_keys: list[str] = field(default_factory=list)

    @property
    def input_filter(self) -> dict[str, Any]:
        return normalize_filter_spec(self.meta.get("input_filter"))

    def build_module(self) -> torch.nn.Module:
        """A torchvision ResNet (fc = identity) with exactly these weights (strict load)."""
        from pretrain.backbones import build_resnet

        model = build_resnet(self.arch)
        model.load_state_dict(self.state_dict, strict=True)
        return model


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows plain containers, numpy arrays and scalars; anything else is refused before it runs."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")) or (
            module.startswith("numpy.dtypes") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def restricted_pickle_load(path: str | os.PathLike) -> Any:
    """Read a ``.pkl`` file without executing code from it (containers and numpy arrays only)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights pickle ({err}). Unpickling it could run "
            "code from the file; convert it from its original .pth instead."
        ) from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt pickle ({err})") from err


def _read_file(path: Path) -> Any:
    if path.suffix == ".pkl":
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        return restricted_pickle_load(path)
    return safe_torch_load(path)


def _as_tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict) or not obj:
        return None
    tensors = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            return None
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
    return tensors if len(tensors) >= len(obj) // 2 else None


def _find_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Return (state_dict, container key) from the usual nestings."""
    direct = _as_tensor_dict(obj)
    if direct is not None:
        return direct, ""
    if isinstance(obj, dict):
        for key in STATE_CONTAINERS:
            nested = _as_tensor_dict(obj.get(key))
            if nested is not None:
                return nested, key
    raise NotAResNetError(
        "found no state_dict in the checkpoint (looked at the top level and under "
        f"{', '.join(STATE_CONTAINERS)}); top-level keys: {_preview(obj)}"
    )


def _preview(obj: Any, limit: int = 8) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:limit]
        return ", ".join(map(str, keys)) + (" ..." if len(obj) > limit else "")
    return type(obj).__name__


def candidate_prefixes(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Prefixes P for which ``P + "conv1.weight"`` looks like a ResNet stem (not a block's conv1)."""
    prefixes = []
    for key in state_dict:
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if f"{prefix}bn1.weight" in state_dict and f"{prefix}layer1.0.conv1.weight" in state_dict:
                prefixes.append(prefix)
    return sorted(set(prefixes))


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _complete_trunk(sub: dict[str, torch.Tensor]) -> tuple[str | None, list[str]]:
    """(arch, missing keys) for a prefix-stripped dict."""
    arch = infer_arch(sub)
    if arch is None:
        return None, []
    missing = [k for k in expected_trunk_keys(arch) if k not in sub]
    return arch, missing


def _choose_prefix(state_dict: dict[str, torch.Tensor], prefixes: list[str]) -> str:
    status = {p: _complete_trunk(_strip(state_dict, p)) for p in prefixes}
    complete = [p for p, (arch, missing) in status.items() if arch and not missing]
    if len(complete) == 1:
        return complete[0]
    if not complete:
        detail = "; ".join(
            f"'{p}': " + (f"missing {len(missing)} keys" if arch else "not a ResNet layout")
            for p, (arch, missing) in status.items()
        ) or "no ResNet stem (conv1/bn1/layer1) found"
        raise NotAResNetError(f"no prefix holds a complete ResNet trunk ({detail})")
    online = [p for p in complete if not any(h in p for h in MOMENTUM_HINTS)]
    if len(online) == 1:
        return online[0]
    raise CheckpointError(
        "several complete ResNet trunks in the checkpoint: "
        + ", ".join(repr(p) for p in complete)
        + ". Pass --prefix with the one you want."
    )


def load_backbone(path: str | os.PathLike, format: str = "auto", prefix: str | None = None) -> Backbone:
    """Read the ResNet trunk of a checkpoint (see module docstring); raise CheckpointError if impossible."""
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    obj = _read_file(path)
    sha = sha256_file(path)

    if is_suite_checkpoint(obj) and format in ("auto", "ours") and prefix is None:
        meta = dict(obj["meta"])
        state = dict(obj["backbone"])
        arch, missing = _complete_trunk(state)
        if arch is None or missing:
            raise NotAResNetError(f"{path}: the checkpoint's backbone is incomplete (missing {missing[:5]})")
        meta["input_filter"] = normalize_filter_spec(meta.get("input_filter"))
        return Backbone(state, arch, meta, "ours", "", str(path), sha)
    if format == "ours":
        raise CheckpointError(f"{path} is not one of the suite's checkpoints; use --format auto")

    state_dict, container = _find_state_dict(obj)
    if prefix is None:
        prefixes = candidate_prefixes(state_dict)
        if format == "moco":
            prefixes = [p for p in prefixes if "encoder_q" in p] or prefixes
        prefix = _choose_prefix(state_dict, prefixes)
    sub = _strip(state_dict, prefix)
    arch, missing = _complete_trunk(sub)
    if arch is None:
        raise NotAResNetError(
            f"{path}: keys under prefix '{prefix}' are not a torchvision ResNet trunk "
            f"(first keys: {_preview(sub)})"
        )
    if missing:
        raise NotAResNetError(f"{path}: prefix '{prefix}' is missing {len(missing)} trunk keys, e.g. {missing[:5]}")
    expected = set(expected_trunk_keys(arch))
    trunk = {k: v for k, v in sub.items() if k in expected}
    dropped = sorted(k for k in state_dict if not (k.startswith(prefix) and k[len(prefix):] in expected))
    _check_shapes(trunk, arch, path)
    detected = _describe_format(obj, container, prefix) if format == "auto" else format
    meta = {"method": "external", "arch": arch, "input_filter": {"name": "none"}, "source_format": detected}
    return Backbone(trunk, arch, meta, detected, prefix, str(path), sha, dropped)


def _check_shapes(trunk: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    from pretrain.backbones import build_resnet

    reference = build_resnet(arch).state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} (expected {tuple(reference[k].shape)})"
        for k, v in trunk.items()
        if tuple(v.shape) != tuple(reference[k].shape)
    ]
    if wrong:
        raise NotAResNetError(f"{path}: tensor shapes do not match a torchvision {arch}: " + "; ".join(wrong[:5]))


def _describe_format(obj: Any, container: str, prefix: str) -> str:
    if isinstance(obj, dict) and any("lightning" in str(k) for k in obj):
        return "lightning"
    if "encoder_q" in prefix:
        return "moco"
    if prefix == "" and container in ("", "state_dict", "model"):
        return "torchvision"
    if any(tag in prefix for tag in ("encoder.", "backbone.", "model.", "module.")):
        return "simclr" if "encoder" in prefix else "prefix"
    return "prefix"

