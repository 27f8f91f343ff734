"""The benchmark's variants: which config, which overrides, and which targets apply to each.

Every variant is MoCo v2 from ``configs/pretrain/<scale>/``. ``plain_passes`` is the reference the
overhead is measured against: plain MoCo v2 (no saliency, no masking, no input filter) whose key encoder
also encodes ``num_hard_negatives`` *unmasked* copies of each key view, entered into the loss the way hard
negatives are. It runs the same encoder passes on the same number of images, with the same logits shape,
as the masked method, so the difference between the two is saliency + masking (+ the hp input filter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "pretrain"
OVERHEAD_TARGET = 0.05  # saliency + masking <= 5% of the plain step with the same passes (issue 9)


@dataclass(frozen=True)
class Variant:
    name: str
    config: str  # file name in configs/pretrain/<scale>/
    description: str
    overrides: tuple[str, ...] = ()
    extra_unmasked_passes: bool = False  # plain_passes: key encoder also encodes unmasked key copies
    frozen: bool = False  # needs a frozen saliency checkpoint
    cached: bool = False  # needs the saliency cache directory
    overhead_target: float | None = None  # the target applies to this variant
    tags: tuple[str, ...] = field(default=())


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("plain", "mocov2.yaml", "MoCo v2, no masking (key fwd + query fwd/bwd)"),
    Variant("plain_passes", "mocov2.yaml", "MoCo v2, no masking, + unmasked hard-negative pass (reference)",
            extra_unmasked_passes=True),
    Variant("hp", "mocov2_hp.yaml", "hp strategy, momentum saliency", overhead_target=OVERHEAD_TARGET),
    Variant("blur", "mocov2_blur.yaml", "blur strategy, momentum saliency", overhead_target=OVERHEAD_TARGET),
    Variant("mean", "mocov2_mean.yaml", "mean strategy, momentum saliency", overhead_target=OVERHEAD_TARGET),
    Variant("hp_frozen_cache", "mocov2_hp.yaml", "hp, frozen saliency from the whole-image cache",
            ("saliency.source=frozen",), frozen=True, cached=True, overhead_target=OVERHEAD_TARGET),
    Variant("hp_frozen_step", "mocov2_hp.yaml", "hp, frozen saliency by a forward on both views per step",
            ("saliency.source=frozen", "saliency.query_map=forward"), frozen=True),
    Variant("hp_none", "mocov2_hp.yaml", "hp, uniform saliency (source none: random masking)",
            ("saliency.source=none",)),
)}
REFERENCE = "plain_passes"
DEFAULT_VARIANTS = tuple(VARIANTS)


def parse_variants(text: str) -> list[Variant]:
    """``a,b,c`` (or ``all``) -> variants, in the order given; unknown names are one clear error."""
    names = list(VARIANTS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} (or 'all')")
    if not names:
        raise ValueError("no variants given")
    return [VARIANTS[n] for n in dict.fromkeys(names)]
