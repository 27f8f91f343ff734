"""Checkpoint intake: find the one ResNet trunk inside any supported checkpoint, or refuse.

Every transfer task reads weights through :func:`load_backbone`. A checkpoint either yields a complete
torchvision ResNet trunk (every weight and BN statistic present, shapes right, values finite) or fails
with one message that says what is wrong and how to fix it. A prefix mismatch can therefore never turn
a "transfer" result into a model trained from scratch.

How the trunk is found. Every tensor in the file gets a flat dotted name (``state_dict.module.encoder_q.
layer1.0.conv1.weight``, see :mod:`transfer.checkpoint_io`). A *candidate* is a prefix ``P`` with a stem
and a first stage under it, in torchvision names (``P + "conv1.weight"`` and ``P + "layer1.*"``) or in
detectron2 names (``P + "stem.conv1.weight"`` and ``P + "res2.*"``; a C4 model's ``roi_heads.res5`` is
joined on). A candidate is *complete* when its keys are exactly those of a torchvision ResNet-18/34/50/
101 (``num_batches_tracked`` optional) with the right shapes. Candidates whose path has a momentum-copy
word (``encoder_k``, ``momentum``, ``target``, ``teacher``, ``ema``, ``key``) are *momentum copies*.

Rules, in order:

1. ``--prefix P`` picks the trunk under ``P`` (also tried inside each container, e.g. ``state_dict.P``);
   it must be complete.
2. Our own checkpoints use their ``backbone`` entry.
3. ``--format`` narrows the candidates (``moco``: ``encoder_q``/``base_encoder``; ``torchvision``: no
   prefix; ``backbone``, ``ddp`` (``module.``), ``lightning``, ``detectron2``: see ``FORMATS``).
4. Exactly one complete online (non-momentum) candidate: chosen. Several: an error listing them, unless
   they hold identical weights. An online candidate exists but is incomplete: an error, never a silent
   fall-back to the momentum copy. Only momentum copies (e.g. a released DINO teacher): the single
   complete one is chosen, and the choice is stated in ``notes``.

Every tensor not in the trunk is listed in ``dropped_keys`` with a reason (head, queue, momentum copy,
training state ...). The search itself lives in :mod:`transfer.trunk_search`; reading files safely in
:mod:`transfer.checkpoint_io`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.backbones import build_resnet
from pretrain.checkpoint import IMAGENET_NORMALIZE, CheckpointError, is_suite_checkpoint
from pretrain.fileio import sha256_file
from pretrain.filters import normalize_filter_spec
from transfer.checkpoint_io import flatten_tensors, read_weights_file, to_tensor
from transfer.d2names import is_bn_counter
from transfer.inert_torch_load import Placeholder
from transfer.safe_pickle import restricted_pickle_load
from transfer.trunk_search import (
    FORMAT_HELP,
    FORMATS,
    MOCO_QUERY_ENCODERS,
    MOMENTUM_WORDS,
    AmbiguousTrunkError,
    NotAResNetError,
    TrunkCandidate,
    candidate_at,
    candidate_prefixes,
    choose_trunk,
    find_candidates,
    is_lightning,
    narrow_by_format,
    reference_shapes,
    resolve_prefix,
)

__all__ = ["Backbone", "load_backbone", "FORMATS", "FORMAT_HELP", "NotAResNetError", "AmbiguousTrunkError",
           "candidate_prefixes", "restricted_pickle_load", "PRETRAIN_META_FIELDS"]

_HEAD_WORDS = ("projector", "projection", "proj", "head", "heads", "predictor", "prediction", "prototypes",
               "mlp", "classifier", "fc", "linear")
_TRAINING_CONTAINERS = frozenset({"training", "optimizer", "optimizer_states", "lr_schedulers", "scheduler",
                                  "lr_scheduler", "scaler", "amp", "trainer", "callbacks", "loops"})
PRETRAIN_META_FIELDS = ("arch", "method", "masking", "strategy", "mask_branch", "input_filter", "image_size",
                        "seed")


@dataclass
class Backbone:
    """A ResNet trunk read from some checkpoint, in torchvision names, plus where it came from."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    meta: dict[str, Any]
    source_format: str
    prefix: str  # prefix of the trunk keys inside their container ("module.encoder_q.")
    path: str
    sha256: str
    dropped_keys: list[str] = field(default_factory=list)
    container: str = ""  # dict path holding the trunk ("state_dict"; "backbone" for ours; "" = top level)
    key_map: dict[str, str] = field(default_factory=dict)  # torchvision trunk key -> flat source key
    dropped_reasons: dict[str, str] = field(default_factory=dict)  # flat source key -> why it was left out
    notes: list[str] = field(default_factory=list)  # how the trunk was chosen, casts, filled counters
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every trunk found, complete or not
    source_tensor_count: int = 0  # tensors in the file (mapped + dropped)

    @property
    def input_filter(self) -> dict[str, Any]:
        return normalize_filter_spec(self.meta.get("input_filter"))

    @property
    def key_prefix(self) -> str:
        """Prefix in flat names (container path + prefix), e.g. ``state_dict.module.encoder_q.``."""
        return f"{self.container}.{self.prefix}" if self.container else self.prefix

    def build_module(self) -> torch.nn.Module:
        """A torchvision ResNet (fc = identity) with exactly these weights (strict load)."""
        model = build_resnet(self.arch)
        model.load_state_dict(self.state_dict, strict=True)
        return model


# ----------------------------------------------------------------------------------------------- intake


def load_backbone(path: str | os.PathLike, format: str = "auto", prefix: str | None = None) -> Backbone:
    """Read the ResNet trunk of a checkpoint (see module docstring); raise CheckpointError if impossible."""
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; choose one of {', '.join(FORMATS)}")
    if format == "prefix" and prefix is None:
        raise ValueError("--format prefix needs --prefix P (the text before 'conv1.weight' in the trunk keys)")
    path = Path(path)
    obj, read_notes = read_weights_file(path)
    ours = is_suite_checkpoint(obj)
    if format == "ours" and not ours:
        raise CheckpointError(f"{path} is not one of the suite's checkpoints (no 'format': 'masked-ssl/v1'); "
                              "use --format auto")
    flat = flatten_tensors(obj)
    if not flat.tensors and isinstance(obj, Placeholder):
        raise CheckpointError(
            f"{path} holds a pickled {obj.qualified_name} object (torch.save(model)), not a state_dict; its weights "
            "cannot be read without rebuilding the object, which would run code from the file. Where the model's "
            "code is trusted, re-save it with torch.save(model.state_dict(), PATH)"
        )
    candidates = find_candidates(flat)
    if prefix is not None:
        chosen = resolve_prefix(flat, prefix)
        notes = [f"used trunk '{chosen.key_prefix}' given by --prefix '{prefix}' ({chosen.arch})"]
    elif ours and format in ("auto", "ours"):
        if "backbone" not in obj:
            raise CheckpointError(f"{path} is missing its 'backbone' entry; the file is incomplete")
        chosen = candidate_at(flat, "backbone.", "torchvision")
        if not chosen.complete:
            raise NotAResNetError(f"{path}: the checkpoint's backbone is not a complete trunk: {chosen.label()}")
        notes = [f"suite checkpoint: used its 'backbone' entry ({chosen.arch})"]
    else:
        chosen, notes = choose_trunk(narrow_by_format(candidates, format, obj), flat)
    state_dict, more_notes = _finalize_tensors(chosen, path)
    source_format = _describe_format(obj, chosen, ours) if format == "auto" else format
    meta = _meta_for(obj, chosen, source_format, ours)
    used = set(chosen.source_keys.values())
    dropped = {k: _drop_reason(k, chosen, candidates) for k in flat.tensors if k not in used}
    return Backbone(
        state_dict=state_dict, arch=chosen.arch, meta=meta, source_format=source_format, prefix=chosen.prefix,
        path=str(path), sha256=sha256_file(path), dropped_keys=sorted(dropped), container=chosen.container,
        key_map=dict(chosen.source_keys), dropped_reasons=dropped, notes=notes + more_notes + read_notes,
        candidates=[c.summary() for c in candidates], source_tensor_count=len(flat.tensors),
    )


def _finalize_tensors(chosen: TrunkCandidate, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Trunk tensors in torchvision order, float32, BN counters filled in; refuse non-finite weights."""
    notes, casts, filled, nonfinite = [], set(), [], []
    state: dict[str, torch.Tensor] = {}
    for key in reference_shapes(chosen.arch):
        if key not in chosen.state:  # only BN counters can be absent (checked by _validate)
            state[key] = torch.tensor(0, dtype=torch.long)
            filled.append(key)
            continue
        tensor = to_tensor(chosen.state[key], chosen.source_keys[key])
        if is_bn_counter(key):
            state[key] = tensor.to(torch.long).reshape(())
            continue
        if not tensor.is_floating_point():
            raise NotAResNetError(f"{path}: '{chosen.source_keys[key]}' has dtype {tensor.dtype}; trunk weights must "
                                  "be floating point (quantized models are not supported)")
        if tensor.dtype != torch.float32:
            casts.add(str(tensor.dtype).replace("torch.", ""))
            tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            nonfinite.append(chosen.source_keys[key])
        state[key] = tensor.contiguous()
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} trunk tensors contain NaN or inf, e.g. {nonfinite[:3]} "
                              "(did training diverge?). Use an earlier checkpoint.")
    if casts:
        notes.append(f"cast {', '.join(sorted(casts))} weights to float32")
    if filled:
        notes.append(f"{len(filled)} BatchNorm num_batches_tracked counters were absent (older PyTorch); set to 0")
    return state, notes


def _describe_format(obj: Any, chosen: TrunkCandidate, ours: bool) -> str:
    words = [w for w in chosen.key_prefix.split(".") if w]
    if ours:
        return "ours"
    if chosen.naming == "detectron2":
        return "detectron2"
    if is_lightning(obj):
        return "lightning"
    if any(q in words for q in MOCO_QUERY_ENCODERS):
        return "moco"
    if chosen.prefix == "":
        return "torchvision"
    if "encoder" in words:
        return "simclr"
    if "backbone" in words:
        return "backbone"
    if chosen.prefix.startswith("module."):
        return "ddp"
    return "prefix"


def _meta_for(obj: Any, chosen: TrunkCandidate, source_format: str, ours: bool) -> dict[str, Any]:
    if ours:
        meta = dict(obj["meta"])
    elif isinstance(obj, dict) and isinstance(obj.get("masked_ssl"), dict) and isinstance(
        obj["masked_ssl"].get("meta"), dict
    ):  # a .pkl written by transfer.convert: the original checkpoint's metadata travels with it
        meta = dict(obj["masked_ssl"]["meta"])
    else:
        meta = {"method": "external", "masking": "none", "strategy": None, "mask_branch": None,
                "input_filter": {"name": "none"}, "normalize": dict(IMAGENET_NORMALIZE)}
    if meta.get("arch") not in (None, chosen.arch):
        raise CheckpointError(f"the checkpoint's metadata says arch {meta['arch']} but its weights are a {chosen.arch}")
    meta["arch"] = chosen.arch
    meta["input_filter"] = normalize_filter_spec(meta.get("input_filter"))
    meta.setdefault("source_format", source_format)
    return meta


def _drop_reason(key: str, chosen: TrunkCandidate, candidates: list[TrunkCandidate]) -> str:
    if key.split(".", 1)[0] in _TRAINING_CONTAINERS:
        return "training state (optimizer / resume data)"
    for other in candidates:
        if other.key_prefix != chosen.key_prefix and key in other.source_keys.values():
            return "momentum/teacher copy of the encoder" if other.momentum else "another ResNet trunk (not chosen)"
    words = {w for part in key.lower().split(".") for w in part.split("_")}
    if key.startswith(chosen.key_prefix) and key[len(chosen.key_prefix):].startswith("fc."):
        return "classifier / projection head of the encoder (fc)"
    if "queue" in words:
        return "MoCo negative-sample queue"
    if words & set(_HEAD_WORDS) or "stem.fc." in key:
        return "projection / prediction / classification head"
    if words & MOMENTUM_WORDS:
        return "momentum/teacher copy"
    return "not part of the ResNet trunk"
