"""torchvision ResNet names <-> detectron2 ResNet names (SPEC section 4).

The two libraries build the same network with different module names::

    conv1 / bn1                  -> stem.conv1 / stem.conv1.norm
    layerN.B.convK / bnK         -> res(N+1).B.convK / convK.norm
    layerN.B.downsample.0 / .1   -> res(N+1).B.shortcut / shortcut.norm

Both block types (BasicBlock for R18/34, Bottleneck for R50/101) follow these rules. BatchNorm's
``num_batches_tracked`` counter is not a weight and detectron2's FrozenBN has none, so it is not mapped.
The mapping is exact and total on a complete trunk: every other key has exactly one target, and
:func:`torchvision_to_detectron2_names` refuses anything it cannot place.
"""

from __future__ import annotations

import re

from pretrain.backbones import expected_trunk_keys

_BN_FIELDS = "weight|bias|running_mean|running_var"
_TV_PATTERNS = [
    (re.compile(r"^conv1\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"^bn1\.({_BN_FIELDS})$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.weight$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.bn([1-3])\.({_BN_FIELDS})$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.({_BN_FIELDS})$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]
_D2_PATTERNS = [
    (re.compile(r"^stem\.conv1\.weight$"), lambda m: "conv1.weight"),
    (re.compile(rf"^stem\.conv1\.norm\.({_BN_FIELDS}|num_batches_tracked)$"), lambda m: f"bn1.{m[1]}"),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([1-3])\.weight$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"^res([2-5])\.(\d+)\.conv([1-3])\.norm\.({_BN_FIELDS}|num_batches_tracked)$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.weight$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (re.compile(rf"^res([2-5])\.(\d+)\.shortcut\.norm\.({_BN_FIELDS}|num_batches_tracked)$"),
     lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
]


def torchvision_to_detectron2_name(key: str) -> str | None:
    """The detectron2 name of one torchvision trunk key; None for keys that are not converted
    (``num_batches_tracked``, ``fc``, anything outside a ResNet trunk)."""
    for pattern, target in _TV_PATTERNS:
        match = pattern.match(key)
        if match:
            return target(match)
    return None


def detectron2_to_torchvision_name(key: str) -> str | None:
    """The torchvision name of one detectron2 ResNet key (backbone-relative); None if not a trunk key."""
    for pattern, target in _D2_PATTERNS:
        match = pattern.match(key)
        if match:
            return target(match)
    return None


def is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def torchvision_to_detectron2_names(state_dict: dict, arch: str) -> dict[str, str]:
    """``{torchvision key: detectron2 key}`` for every weight of a complete ``arch`` trunk.

    Raises ValueError if a trunk key is missing or a key of the dict has no place in the trunk (so a
    partial or foreign state_dict can never turn into a partial conversion). ``num_batches_tracked``
    and ``fc.*`` keys are allowed and left out of the mapping.
    """
    expected = [k for k in expected_trunk_keys(arch) if not is_bn_counter(k)]
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"{len(missing)} {arch} trunk keys are missing, e.g. {missing[:5]}")
    expected_set = set(expected)
    foreign = [
        k for k in state_dict
        if k not in expected_set and not is_bn_counter(k) and not k.startswith("fc.")
    ]
    if foreign:
        raise ValueError(f"{len(foreign)} keys are not part of a torchvision {arch} trunk, e.g. {foreign[:5]}")
    mapping = {key: torchvision_to_detectron2_name(key) for key in expected}
    unmapped = [k for k, v in mapping.items() if v is None]
    if unmapped:  # a torchvision change we do not know about: fail loudly rather than drop weights
        raise ValueError(f"no detectron2 name for {unmapped[:5]}")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("two torchvision keys map to the same detectron2 key")
    return mapping
