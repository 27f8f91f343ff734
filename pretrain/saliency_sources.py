"""Which network's activations define saliency (``saliency.source``), recorded in every checkpoint.

* ``momentum``: the method's own key encoder (MoCo's momentum encoder; for SimCLR, which has none, the
  online encoder without gradient). Fully self-supervised, the default. When the key view is encoded
  unmasked anyway, its saliency comes from that very forward pass at no extra cost.
* ``frozen``: a frozen ResNet loaded from a LOCAL checkpoint (the paper's setting: a supervised
  ResNet-50). Accepted: a suite checkpoint (``masked-ssl/v1``, whose own input filter is applied) or a
  plain torchvision ResNet ``state_dict`` (optionally under ``state_dict``/``model`` and with a
  ``module.`` prefix). Anything else is refused with a clear error.
* ``none``: uniform saliency, every cell foreground: masked cells are chosen uniformly (random masking).

The query view's map is either mapped from the key view's map by the crop geometry (``query_map:
mapped``, :func:`pretrain.saliency.map_cells`, no extra pass) or computed by an extra no-grad forward
on the query view (``query_map: forward``, exact, what the released code does with its frozen net).
The frozen source can instead cache every training image's whole-image map once
(``saliency.cache_dir``, :mod:`pretrain.saliency_cache`) and map it onto both crops each step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.backbones import build_resnet, infer_arch
from pretrain.checkpoint import CheckpointError, is_suite_checkpoint, safe_torch_load
from pretrain.encoder import trunk_features
from pretrain.fileio import sha256_file
from pretrain.filters import InputFilter
from pretrain.saliency import SaliencyMaps, map_cells, saliency_from_cells, scda_saliency, uniform_saliency
from pretrain.saliency_cache import SaliencyCache, build_saliency_cache, cache_key

ActivationFn = Callable[[torch.Tensor], torch.Tensor]


class SaliencySource:
    """Computes (B, h, w) activation maps of views, or says the saliency is uniform."""

    name = "base"
    uniform = False

    def activation(self, filtered: torch.Tensor, unfiltered: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"saliency_source": self.name}


class MomentumSource(SaliencySource):
    """The key encoder: ``activation_fn`` runs it (no grad) on the filtered view the encoder sees (the
    encoder itself picks the layer, ``saliency.feature_layer``)."""

    name = "momentum"

    def __init__(self, activation_fn: ActivationFn, layer: str = "layer4"):
        self.activation_fn, self.layer = activation_fn, layer

    def activation(self, filtered: torch.Tensor, unfiltered: torch.Tensor) -> torch.Tensor:
        return self.activation_fn(filtered)

    def describe(self) -> dict[str, Any]:
        return {"saliency_source": self.name, "saliency_layer": self.layer}


class UniformSource(SaliencySource):
    name = "none"
    uniform = True


class _FrozenFeatures(nn.Module):
    """The frozen trunk behind its input filter, up to the saliency layer (what the saliency cache runs)."""

    def __init__(self, trunk: nn.Module, input_filter: InputFilter, layer: str):
        super().__init__()
        self.trunk, self.input_filter, self.layer = trunk, input_filter, layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return trunk_features(self.trunk, self.input_filter(images), until=self.layer)


class FrozenSource(SaliencySource):
    """A frozen ResNet in eval mode on the unfiltered view (with the filter its checkpoint records).

    With a cache (:meth:`attach_cache`) each training image's whole-image map is computed once and
    mapped onto every crop by its geometry (``pretrain.saliency_cache``) instead of a forward per step.
    """

    name = "frozen"

    def __init__(self, path: str | Path, device: torch.device, layer: str = "layer4"):
        self.path, self.layer = Path(path), layer
        trunk, self.arch, filter_spec = load_frozen_resnet(self.path)
        self.sha256 = sha256_file(self.path)
        self.input_filter = InputFilter(filter_spec)
        # A plain attribute list, not a submodule: the frozen net is not part of the method's state.
        self._net = [trunk.to(device).eval().requires_grad_(False)]
        self.cache: SaliencyCache | None = None
        self.cache_image_size: int | None = None

    def attach_cache(self, cache_dir: str | Path, files: list[str], image_size: int, device: torch.device,
                     build: bool = True) -> None:
        """Build (main process: ``build``) or open the whole-image map cache of ``files``."""
        network = _FrozenFeatures(self._net[0], self.input_filter, self.layer)
        if build:
            self.cache = build_saliency_cache(cache_dir, files, network, self.sha256, image_size=image_size,
                                              device=device, layer=self.layer)
        else:
            self.cache = SaliencyCache(Path(cache_dir) / cache_key(files, self.sha256, image_size, layer=self.layer))
        self.cache_image_size = image_size

    @torch.no_grad()
    def activation(self, filtered: torch.Tensor, unfiltered: torch.Tensor) -> torch.Tensor:
        net = self._net[0]
        return trunk_features(net, self.input_filter(unfiltered), until=self.layer).float().sum(1)

    def to(self, device: torch.device) -> FrozenSource:
        self._net[0] = self._net[0].to(device)
        return self

    def describe(self) -> dict[str, Any]:
        info = {"saliency_source": self.name, "saliency_checkpoint": str(self.path),
                "saliency_checkpoint_sha256": self.sha256, "saliency_arch": self.arch,
                "saliency_input_filter": self.input_filter.spec, "saliency_layer": self.layer}
        if self.cache is not None:
            info.update(saliency_cache=str(self.cache.directory), saliency_cache_image_size=self.cache_image_size)
        return info


def load_frozen_resnet(path: Path) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """A torchvision ResNet trunk from a local suite checkpoint or plain state_dict; else a clear error."""
    if not path.exists():
        raise CheckpointError(
            f"saliency checkpoint not found: {path}. saliency.source=frozen needs a LOCAL ResNet checkpoint "
            "(suite format or torchvision state_dict); nothing is downloaded"
        )
    obj = safe_torch_load(path)
    filter_spec = None
    if is_suite_checkpoint(obj):
        state = obj.get("backbone", {})
        filter_spec = obj.get("meta", {}).get("input_filter")
    else:
        state = obj
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a ResNet state_dict (found {type(state).__name__}); "
                              "saliency.source=frozen takes a torchvision ResNet or a suite checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    arch = infer_arch(state)
    if arch is None:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{path} does not hold a torchvision ResNet (keys start with: {sample}); the frozen saliency "
            "source needs a ResNet-18/34/50/101 (e.g. a supervised ResNet-50), not a ViT or another network"
        )
    trunk = build_resnet(arch)
    expected = trunk.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path}: the ResNet weights do not fit a torchvision {arch}: {len(wrong)} tensor(s) have another "
            f"shape, e.g. {wrong[0]} (a CIFAR-style stem or a wider variant?); the frozen saliency source needs a "
            "standard torchvision ResNet-18/34/50/101"
        )
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: ResNet weights do not fit {arch} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return trunk, arch, filter_spec


def build_source(saliency_cfg, activation_fn: ActivationFn | None, device: torch.device) -> SaliencySource:
    name = saliency_cfg.source
    layer = str(saliency_cfg.get("feature_layer", "layer4"))
    if name == "none":
        return UniformSource()
    if name == "frozen":
        return FrozenSource(saliency_cfg.checkpoint, device, layer)
    if name == "momentum":
        if activation_fn is None:
            raise ValueError("this method has no key encoder for saliency.source=momentum")
        return MomentumSource(activation_fn, layer)
    raise ValueError(f"unknown saliency source '{name}'")


class SaliencyGuide:
    """Saliency maps of a batch's key and query views, from a source and the crop geometry."""

    def __init__(self, source: SaliencySource, grid: int, std_ratio: float, query_map: str,
                 released_code: bool):
        self.source, self.grid, self.std_ratio = source, grid, std_ratio
        self.query_map, self.released_code = query_map, released_code

    @property
    def cache(self) -> SaliencyCache | None:
        return getattr(self.source, "cache", None)

    def key_maps(self, batch, filtered: torch.Tensor, unfiltered: torch.Tensor,
                 activation: torch.Tensor | None = None) -> SaliencyMaps:
        """The key view's maps: from the cache by crop geometry, or :meth:`maps`."""
        if self.cache is not None:
            return self.cache.crop_saliency(batch.index, batch.key_box, batch.key_flip, self.grid, self.std_ratio,
                                            self.released_code)
        return self.maps(filtered, unfiltered, activation)

    def maps(self, filtered: torch.Tensor, unfiltered: torch.Tensor,
             activation: torch.Tensor | None = None) -> SaliencyMaps:
        """Maps of one view; ``activation`` (from a forward pass already done) is used when given and
        the source is the key encoder itself."""
        if self.source.uniform:
            return uniform_saliency(filtered.shape[0], self.grid, filtered.device)
        if activation is None or not isinstance(self.source, MomentumSource):
            activation = self.source.activation(filtered, unfiltered)
        return scda_saliency(activation[:, None], self.grid, self.std_ratio, self.released_code)

    @property
    def reuses_key_forward(self) -> bool:
        return isinstance(self.source, MomentumSource)

    def query_from_key(self, key_maps: SaliencyMaps, batch, query_filtered: torch.Tensor,
                       query_unfiltered: torch.Tensor) -> SaliencyMaps:
        if self.source.uniform:
            return key_maps
        if self.cache is not None:
            return self.cache.crop_saliency(batch.index, batch.query_box, batch.query_flip, self.grid,
                                            self.std_ratio, self.released_code)
        if self.query_map == "forward":
            return self.maps(query_filtered, query_unfiltered)
        cells = map_cells(key_maps.cells, batch.key_box, batch.key_flip, batch.query_box, batch.query_flip,
                          self.grid)
        return saliency_from_cells(cells, self.std_ratio, self.released_code)
