"""Saliency-guided masking inside one training step of a two-branch method (MoCo v2, SimCLR).

This is the glue between a method and the primitives (:mod:`pretrain.saliency`, :mod:`pretrain.masking`,
:mod:`pretrain.fills`): it filters the views (high-pass for ``hp``), gets the saliency maps in the
cheapest correct order, masks the branch(es) the config names, and makes the hard negatives. The
method supplies ``key_encode`` (how its key branch encodes a batch) and encodes the query and the
negatives itself.

Order of work (``masking.branch``):

* ``query`` (default): key forward on the unmasked key -> with the momentum source its activation is
  the key's saliency for free -> query map mapped from it (or an extra forward) -> mask the query,
  make the negatives from the key;
* ``key`` / ``both``: the key must be encoded *masked*, so its saliency needs its own pass over the
  unmasked key (the momentum source's extra no-grad forward) before masking; then the key forward on
  the masked key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pretrain.config import GUIDED_MASKING
from pretrain.filters import NO_FILTER, InputFilter, normalize_filter_spec
from pretrain.masking import MaskedViews, MaskingConfig, SaliencyGuidedMasking
from pretrain.saliency import SaliencyMaps
from pretrain.saliency_sources import ActivationFn, SaliencyGuide, build_source
from pretrain.timing import NULL_TIMER, PhaseTimer

# key_encode(images, need_activation) -> (embedding or None, activation map (B, h, w) or None)
KeyEncoder = Callable[[torch.Tensor, bool], tuple[Any, "torch.Tensor | None"]]
SECTION_ONLY_KEYS = ("name", "branch", "alpha", "input_filter", "strategy")


@dataclass
class PreparedViews:
    """What the encoders consume after masking, plus what the pictures and metrics show."""

    query: torch.Tensor  # query-encoder input (masked when the query branch is masked)
    key_embedding: Any  # the key branch's output, from ``key_encode``
    key: torch.Tensor  # key-encoder input as encoded
    negatives: torch.Tensor | None  # (B * n, C, H, W) hard-negative inputs, sample-major
    key_maps: SaliencyMaps | None = None
    query_maps: SaliencyMaps | None = None
    query_masked: MaskedViews | None = None
    key_masked: MaskedViews | None = None
    negatives_masked: MaskedViews | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.key_maps is not None:
            out["fg_ratio"] = self.key_maps.fg_ratio.mean()
        masked = self.query_masked if self.query_masked is not None else self.key_masked
        if masked is not None:
            out["masked_fraction"] = masked.masked_fraction.mean()
        if self.negatives_masked is not None:
            out["negative_masked_fraction"] = self.negatives_masked.masked_fraction.mean()
        return out


def masking_config(section) -> MaskingConfig:
    """The primitives' ``MaskingConfig`` from the ``masking:`` section (minus the engine's own keys)."""
    plain = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in plain.items() if k not in SECTION_ONLY_KEYS}
    return MaskingConfig.from_dict({**values, "strategy": plain["strategy"]})


def input_filter_spec(cfg) -> dict[str, Any]:
    """The filter a config's model sees its input through: the high-pass strategy (ours or MSCN)
    filters both branches and every evaluation; everything else sees raw pixels."""
    section = cfg.masking
    if section.name in GUIDED_MASKING and section.strategy == "hp":
        return normalize_filter_spec(dict(section.input_filter))
    return dict(NO_FILTER)


class GuidedMasking:
    """Per-step saliency + masking + hard negatives for a config; a no-op (besides filtering) for
    ``masking.name: none``."""

    def __init__(self, cfg, activation_fn: ActivationFn | None, device: torch.device):
        section = cfg.masking
        self.enabled = section.name in GUIDED_MASKING
        self.name = section.name
        self.strategy = section.strategy if self.enabled else None
        self.branch = section.branch if self.enabled else None
        self.alpha = float(section.alpha)
        self.input_filter = InputFilter(input_filter_spec(cfg))
        self.masker: SaliencyGuidedMasking | None = None
        self.guide: SaliencyGuide | None = None
        self.num_hard_negatives = 0
        if self.enabled:
            config = masking_config(section)
            self.masker = SaliencyGuidedMasking(config, int(cfg.augment.image_size))
            self.num_hard_negatives = config.num_hard_negatives
            source = build_source(cfg.saliency, activation_fn, device)
            self.guide = SaliencyGuide(source, config.grid, float(cfg.saliency.std_ratio),
                                       str(cfg.saliency.query_map), bool(cfg.compat.released_code))

    def attach_dataset(self, files: list[str], cfg, device: torch.device, build: bool) -> None:
        """Give the frozen source its per-image cache when ``saliency.cache_dir`` asks for one."""
        if not (self.enabled and cfg.saliency.cache_dir):
            return
        size = int(cfg.saliency.cache_image_size or 2 * int(cfg.augment.image_size))
        self.guide.source.attach_cache(str(cfg.saliency.cache_dir), files, size, device, build=build)

    @property
    def input_filter_spec(self) -> dict[str, Any]:
        return dict(self.input_filter.spec)

    def meta(self) -> dict[str, Any]:
        if not self.enabled:
            return {"masking": "none", "strategy": None, "mask_branch": None, "saliency_source": None,
                    "input_filter": self.input_filter_spec}
        return {
            "masking": self.name, "strategy": self.strategy, "mask_branch": self.branch,
            "input_filter": self.input_filter_spec, "hard_negatives": self.num_hard_negatives,
            "alpha": self.alpha, "saliency_query_map": self.guide.query_map, **self.guide.source.describe(),
        }

    def prepare(self, batch, key_encode: KeyEncoder, generator: torch.Generator | None = None,
                timer: PhaseTimer = NULL_TIMER) -> PreparedViews:
        with timer("input_filter"):
            query, key = self.input_filter(batch.query), self.input_filter(batch.key)
        if not self.enabled:
            with timer("key_forward"):
                embedding, _ = key_encode(key, False)
            return PreparedViews(query=query, key_embedding=embedding, key=key, negatives=None)
        mask_query = self.branch in ("query", "both")
        mask_key = self.branch in ("key", "both")
        embedding, activation = None, None
        if not mask_key and self.guide.reuses_key_forward:
            with timer("key_forward"):
                embedding, activation = key_encode(key, True)
        with timer("saliency"):
            key_maps = self.guide.key_maps(batch, key, batch.key, activation)
            query_maps = self.guide.query_from_key(key_maps, batch, query, batch.query) if mask_query else None
        with timer("masking"):
            query_masked = self.masker.mask_query(query, query_maps, generator) if mask_query else None
            key_masked = self.masker.mask_query(key, key_maps, generator) if mask_key else None
            negatives = (self.masker.hard_negatives(key, key_maps, generator)
                         if self.num_hard_negatives > 0 else None)
        key_input = key_masked.images if key_masked is not None else key
        if embedding is None:
            with timer("key_forward"):
                embedding, _ = key_encode(key_input, False)
        return PreparedViews(
            query=query_masked.images if query_masked is not None else query,
            key_embedding=embedding, key=key_input,
            negatives=negatives.images if negatives is not None else None,
            key_maps=key_maps, query_maps=query_maps, query_masked=query_masked, key_masked=key_masked,
            negatives_masked=negatives,
        )

    @torch.no_grad()
    def preview(self, batch, activation_fn: ActivationFn | None, generator: torch.Generator) -> dict[str, Any]:
        """The panels of the picture: views, saliency, FG cells, masked inputs, a hard negative."""

        def encode(images: torch.Tensor, need_activation: bool):
            return None, (activation_fn(images) if need_activation and activation_fn is not None else None)

        prepared = self.prepare(batch, encode, generator)
        panels: dict[str, Any] = {"query view": prepared.query if not self.enabled else self.input_filter(batch.query),
                                  "key view": self.input_filter(batch.key)}
        if not self.enabled:
            return panels
        panels["key saliency"] = prepared.key_maps.cells
        panels["key FG cells"] = prepared.key_maps.foreground
        if prepared.query_masked is not None:
            panels["masked query"] = prepared.query
        if prepared.key_masked is not None:
            panels["masked key"] = prepared.key
        if prepared.negatives is not None:
            n = self.num_hard_negatives
            panels["hard negative"] = prepared.negatives[::n]
        return panels
