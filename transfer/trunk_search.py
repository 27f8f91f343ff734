"""Find every ResNet trunk in a checkpoint's tensors and choose the encoder (rules: :mod:`transfer.checkpoints`).

A *candidate* is a prefix holding a ResNet stem and first stage, in torchvision names (``P + "conv1.weight"``,
``P + "layer1.*"``) or detectron2 names (``P + "stem.conv1.weight"``, ``P + "res2.*"``; a C4 model's
``roi_heads.res5`` is joined on). Each is validated against a torchvision ResNet-18/34/50/101 (keys and
shapes); :func:`choose_trunk` applies the choice rules and explains them in notes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain.backbones import BLOCKS_PER_STAGE, BOTTLENECK_ARCHS, build_resnet, infer_arch
from pretrain.checkpoint import CheckpointError
from transfer.checkpoint_io import FlatTensors, to_tensor
from transfer.d2names import detectron2_to_torchvision_name, is_bn_counter

FORMATS = ("auto", "ours", "moco", "torchvision", "simclr", "backbone", "ddp", "lightning", "detectron2", "prefix")
FORMAT_HELP = {
    "auto": "detect (rules in transfer.checkpoints)",
    "ours": "this suite's checkpoints (format masked-ssl/v1, metadata included)",
    "moco": "MoCo v1/v2/v3: state_dict with module.encoder_q. (or base_encoder.); query encoder used",
    "torchvision": "plain torchvision ResNet state_dict (conv1.weight at the top), e.g. supervised weights",
    "simclr": "SimCLR/SimSiam ports: trunk under encoder. (or any prefix), heads dropped",
    "backbone": "solo-learn / lightly style: trunk under backbone.",
    "ddp": "DistributedDataParallel state_dict: trunk under module.",
    "lightning": "PyTorch Lightning checkpoint: trunk inside 'state_dict' (model./backbone./...)",
    "detectron2": "detectron2 names (stem./res2-5.), e.g. a converted .pkl or a detectron2 model",
    "prefix": "anything else: the trunk under --prefix",
}
_TRUNK_ROOTS = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})
_D2_ROOTS = frozenset({"stem", "res2", "res3", "res4", "res5"})
MOMENTUM_WORDS = frozenset({"k", "key", "momentum", "target", "teacher", "ema", "shadow"})
MOCO_QUERY_ENCODERS = ("encoder_q", "base_encoder")


class NotAResNetError(CheckpointError):
    """The checkpoint holds no complete torchvision ResNet trunk."""


class AmbiguousTrunkError(CheckpointError):
    """Several different complete trunks and nothing to choose between them; pass ``--prefix``."""


@dataclass
class TrunkCandidate:
    """One place in the file that looks like a ResNet trunk."""

    key_prefix: str
    naming: str  # "torchvision" or "detectron2"
    state: dict[str, Any]  # torchvision name -> raw tensor/array
    source_keys: dict[str, str]  # torchvision name -> flat key
    container: str
    prefix: str
    momentum: bool = False
    arch: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.arch is not None and not self.problems

    def label(self) -> str:
        kind = "momentum copy, " if self.momentum else ""
        status = "complete" if self.complete else "; ".join(self.problems)
        return f"{show_prefix(self.key_prefix)} ({kind}{self.arch or 'no known ResNet'}, {self.naming} names: {status})"

    def summary(self) -> dict[str, Any]:
        return {"key_prefix": self.key_prefix, "naming": self.naming, "momentum": self.momentum,
                "arch": self.arch, "complete": self.complete, "problems": list(self.problems)}


# ---------------------------------------------------------------------------------------------- finding


def show_prefix(key_prefix: str) -> str:
    return f"'{key_prefix}'" if key_prefix else "'' (top level)"


def is_momentum(key_prefix: str) -> bool:
    words = {w for part in key_prefix.lower().split(".") for w in part.split("_")}
    return bool(words & MOMENTUM_WORDS)


def find_candidates(flat: FlatTensors) -> list[TrunkCandidate]:
    """Every prefix holding a ResNet stem and first stage, in torchvision or detectron2 names."""
    keys = list(flat.tensors)
    found = []
    for key in keys:
        for stem, first_stage, naming in (("conv1.weight", "layer1.", "torchvision"),
                                          ("stem.conv1.weight", "res2.", "detectron2")):
            prefix = key[: -len(stem)]
            if key.endswith(stem) and (not prefix or prefix.endswith(".")):
                if naming == "torchvision" and prefix.endswith("stem."):
                    continue  # detectron2's stem, not a torchvision trunk under "...stem."
                if any(k.startswith(prefix + first_stage) for k in keys):
                    found.append(candidate_at(flat, prefix, naming))
    return found


def candidate_prefixes(state_dict: dict[str, Any]) -> list[str]:
    """Prefixes P of a flat state_dict under which a torchvision ResNet stem and first stage sit."""
    flat = FlatTensors(tensors=dict(state_dict), location={k: ("", k) for k in state_dict})
    return sorted({c.key_prefix for c in find_candidates(flat) if c.naming == "torchvision"})


def candidate_at(flat: FlatTensors, key_prefix: str, naming: str) -> TrunkCandidate:
    """The trunk under ``key_prefix`` (whatever it holds), validated."""
    state: dict[str, Any] = {}
    source: dict[str, str] = {}
    foreign: list[str] = []
    for key, value in flat.tensors.items():
        if not key.startswith(key_prefix):
            continue
        rest = key[len(key_prefix):]
        root = rest.split(".", 1)[0]
        if naming == "torchvision" and root in _TRUNK_ROOTS:
            state[rest], source[rest] = value, key
        elif naming == "detectron2" and root in _D2_ROOTS and not rest.startswith("stem.fc."):
            name = detectron2_to_torchvision_name(rest)
            if name is None:
                foreign.append(rest)
            else:
                state[name], source[name] = value, key
    if naming == "detectron2" and not any(k.startswith("layer4.") for k in state) and key_prefix.endswith("backbone."):
        res5 = key_prefix[: -len("backbone.")] + "roi_heads."  # C4 models keep res5 in the ROI head
        for key, value in flat.tensors.items():
            if key.startswith(res5 + "res5."):
                name = detectron2_to_torchvision_name(key[len(res5):])
                if name is not None:
                    state[name], source[name] = value, key
    container, prefix = _split_location(flat, source, key_prefix)
    candidate = TrunkCandidate(key_prefix, naming, state, source, container, prefix, is_momentum(key_prefix))
    _validate(candidate, foreign)
    return candidate


def _split_location(flat: FlatTensors, source: dict[str, str], key_prefix: str) -> tuple[str, str]:
    if "conv1.weight" in source:
        container, inner = flat.location[source["conv1.weight"]]
        stem = "stem.conv1.weight" if inner.endswith("stem.conv1.weight") else "conv1.weight"
        return container, inner[: -len(stem)]
    return "", key_prefix


@functools.cache
def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_resnet(arch).state_dict().items() if not k.startswith("fc.")}


def _validate(candidate: TrunkCandidate, foreign: list[str]) -> None:
    state = candidate.state
    candidate.arch = infer_arch(state)
    if candidate.arch is None:
        candidate.problems.append(_describe_layout(state))
        return
    arch = candidate.arch
    reference = reference_shapes(arch)
    missing = [k for k in reference if k not in state and not is_bn_counter(k)]
    foreign = foreign + [k for k in state if k not in reference]
    if missing:
        candidate.problems.append(f"missing {len(missing)} of {len(reference)} {arch} trunk keys, e.g. {missing[:4]}")
    if foreign:
        candidate.problems.append(
            f"{len(foreign)} keys that a plain torchvision {arch} does not have, e.g. {foreign[:4]} (modified "
            "ResNets such as SE-ResNet are not supported)"
        )
    wrong = [f"{k} {tuple(v.shape)} (expected {reference[k]})" for k, v in state.items()
             if k in reference and tuple(v.shape) != reference[k]]
    if wrong:
        hint = " (wide or ResNeXt variants are not supported)" if arch in BOTTLENECK_ARCHS else ""
        candidate.problems.append(f"{len(wrong)} tensors have the wrong shape for {arch}{hint}: {'; '.join(wrong[:3])}")


def _describe_layout(state: dict[str, Any]) -> str:
    if "conv1.weight" not in state:
        return "no stem convolution (conv1.weight)"
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    kind = "Bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "BasicBlock"
    known = ", ".join(f"{a}: {b}" for a, b in BLOCKS_PER_STAGE.items())
    return f"stages have {blocks} {kind} blocks, which is no torchvision ResNet ({known})"


# --------------------------------------------------------------------------------------------- choosing


def resolve_prefix(flat: FlatTensors, prefix: str) -> TrunkCandidate:
    containers = sorted({c for c, _ in flat.location.values() if c})
    spellings = [prefix] if not prefix or prefix.endswith(".") else [prefix + ".", prefix]
    options = [f"{c}.{p}" if c else p for p in spellings for c in ["", *containers]]
    hits = []
    for key_prefix in dict.fromkeys(options):
        for naming, stem in (("torchvision", "conv1."), ("detectron2", "stem.")):
            if any(k.startswith(key_prefix + stem) for k in flat.tensors):
                hits.append(candidate_at(flat, key_prefix, naming))
    if not hits:
        found = [c.key_prefix for c in find_candidates(flat)]
        raise NotAResNetError(
            f"no ResNet stem under prefix '{prefix}' (looked for '{prefix}conv1.weight' at the top level and in "
            f"each container). Prefixes that hold a ResNet trunk: {found or 'none'}; first keys: "
            f"{_preview(flat)}"
        )
    complete = [c for c in hits if c.complete]
    if len(complete) > 1 and not _all_identical(complete):
        raise AmbiguousTrunkError(
            f"prefix '{prefix}' matches several trunks: {', '.join(c.label() for c in complete)}. Pass the full "
            "prefix including the container, e.g. --prefix " + repr(complete[0].key_prefix)
        )
    if not complete:
        raise NotAResNetError(f"prefix '{prefix}' does not hold a complete ResNet trunk: {hits[0].label()}")
    return complete[0]


def narrow_by_format(candidates: list[TrunkCandidate], fmt: str, obj: Any) -> list[TrunkCandidate]:
    def inner_words(c: TrunkCandidate) -> list[str]:
        return [w for w in c.key_prefix.split(".") if w]

    rules = {
        "moco": lambda c: any(q in inner_words(c) for q in MOCO_QUERY_ENCODERS),
        "torchvision": lambda c: c.naming == "torchvision" and c.prefix == "",
        "simclr": lambda c: c.naming == "torchvision",
        "backbone": lambda c: c.naming == "torchvision" and "backbone" in inner_words(c),
        "ddp": lambda c: c.naming == "torchvision" and c.prefix.startswith("module."),
        "lightning": lambda c: c.container.split(".")[0] == "state_dict",
        "detectron2": lambda c: c.naming == "detectron2",
    }
    if fmt == "lightning" and not is_lightning(obj):
        raise CheckpointError("--format lightning: the file has no 'state_dict' with Lightning markers "
                              "('pytorch-lightning_version'); use --format auto")
    rule = rules.get(fmt)
    if not candidates:
        return []  # choose_trunk explains what the file holds instead
    narrowed = [c for c in candidates if rule(c)] if rule else candidates
    if not narrowed:
        seen = ", ".join(c.label() for c in candidates) or "none"
        raise NotAResNetError(f"--format {fmt}: no trunk of that kind ({FORMAT_HELP[fmt]}). Trunks found: {seen}. "
                              "Use --format auto or --prefix.")
    return narrowed


def _all_identical(candidates: list[TrunkCandidate]) -> bool:
    first = candidates[0]
    return all(
        c.arch == first.arch and all(torch.equal(to_tensor(c.state[k], k), to_tensor(first.state[k], k))
                                     for k in first.state if k in c.state)
        for c in candidates[1:]
    )


def choose_trunk(candidates: list[TrunkCandidate], flat: FlatTensors) -> tuple[TrunkCandidate, list[str]]:
    """Apply rule 4 of the module docstring; return (candidate, notes)."""
    if not candidates:
        raise NotAResNetError(_no_trunk_message(flat))
    online = [c for c in candidates if not c.momentum]
    pool = online or candidates
    complete = [c for c in pool if c.complete]
    notes = []
    if not complete:
        details = "; ".join(c.label() for c in pool)
        fallback = [c.key_prefix for c in candidates if c.complete and c.momentum]
        hint = (f" Complete momentum/teacher copies exist ({fallback}); pass --prefix with one of them to use it."
                if fallback else "")
        raise NotAResNetError(f"no complete ResNet trunk: {details}.{hint}")
    if len(complete) > 1:
        if not _all_identical(complete):
            raise AmbiguousTrunkError(
                "several different complete ResNet trunks and nothing to tell which is the encoder: "
                + ", ".join(repr(c.key_prefix) for c in complete)
                + ". Pass --prefix with the one you want (e.g. --prefix " + repr(complete[0].prefix) + ")."
            )
        complete.sort(key=lambda c: len(c.key_prefix))
        notes.append(f"{len(complete)} trunks hold identical weights ({[c.key_prefix for c in complete]}); "
                     f"used '{complete[0].key_prefix}'")
    chosen = complete[0]
    if chosen.momentum:
        notes.append(f"only momentum/teacher copies are present; used '{chosen.key_prefix}'")
    others = [c.key_prefix for c in candidates if c is not chosen]
    notes.insert(0, f"chose trunk {show_prefix(chosen.key_prefix)} ({chosen.arch}, {chosen.naming} names)"
                 + (f"; other trunks in the file, not used: {others}" if others else ""))
    return chosen, notes


def _no_trunk_message(flat: FlatTensors) -> str:
    keys = list(flat.tensors)
    if not keys:
        return "the checkpoint holds no tensors with names (no state_dict found)"
    text = " ".join(keys[:200])
    if any(w in text for w in ("cls_token", "pos_embed", "patch_embed", ".attn.qkv", "blocks.0.attn")):
        return ("the checkpoint looks like a Vision Transformer (cls_token / patch_embed / attention blocks), "
                f"not a ResNet; only torchvision ResNet-18/34/50/101 trunks can be converted. First keys: {_preview(flat)}")
    if re.search(r"(^|\.)res\d_\d+_branch|(^|\.)res_conv1_bn_|(^|\.)conv1_w\b", text):
        return ("the checkpoint has Caffe2/Detectron1 names (res2_0_branch2a_w ...). Those weights expect BGR "
                "input and STRIDE_IN_1X1=True; use them with detectron2's own configs, not this converter.")
    return (f"no ResNet trunk found: no prefix P has both P+'conv1.weight' and P+'layer1.*' (or detectron2's "
            f"P+'stem.conv1.weight' and P+'res2.*'). First keys: {_preview(flat)}. If the trunk is there under "
            "other names, this is not a torchvision ResNet.")


def _preview(flat: FlatTensors, limit: int = 6) -> str:
    keys = list(flat.tensors)
    return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "") if keys else "(none)"


def is_lightning(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and (
        "pytorch-lightning_version" in obj or "lightning_version" in obj or "global_step" in obj
    )
