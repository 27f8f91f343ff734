"""The suite's additions to detectron2's model zoo: the MoCo ROI head and the checkpoint's input filter.

Importing this module registers, once per process:

* ``Res5ROIHeadsExtraNorm`` (``ROI_HEADS_REGISTRY``): detectron2's C4 ``Res5ROIHeads`` with one more
  normalization layer after the res5 stage, as in MoCo's detection protocol. Self-supervised trunks end
  in a res5 whose output scale the new box/mask predictors have not seen; normalizing it (with the
  config's ``RESNETS.NORM``) lets them train at the protocol's learning rate.
* ``GeneralizedRCNNWithInputFilter`` (``META_ARCH_REGISTRY``): ``GeneralizedRCNN`` whose preprocessing
  applies the checkpoint's input filter (``pretrain.filters``, e.g. the paper's high-pass) to each
  image *after* normalization and *before* padding, exactly as pretraining and linear evaluation see
  their inputs. Its settings live in ``cfg.MODEL.INPUT_FILTER`` (:func:`add_input_filter_config`).

:func:`apply_input_filter` switches a config to the filtering model only when the checkpoint asks for a
filter, so a plain checkpoint trains the stock ``GeneralizedRCNN``.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.filters import InputFilter, normalize_filter_spec
from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2.config import CfgNode, configurable  # noqa: E402
from detectron2.layers import get_norm  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, GeneralizedRCNN  # noqa: E402
from detectron2.modeling.roi_heads import Res5ROIHeads  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

__all__ = ["Res5ROIHeadsExtraNorm", "GeneralizedRCNNWithInputFilter", "add_input_filter_config",
           "apply_input_filter", "input_filter_from_cfg", "FILTERING_META_ARCHITECTURE"]

FILTERING_META_ARCHITECTURE = "GeneralizedRCNNWithInputFilter"


def _register(registry, cls):
    # A module re-executed under another name (importlib.reload, runpy) must not trip the registry's
    # duplicate check; the first registration wins.
    if cls.__name__ not in registry:
        registry.register(cls)
    return registry.get(cls.__name__)


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` with a ``RESNETS.NORM`` layer after res5 (``roi_heads.res5.norm``)."""

    @classmethod
    def _build_res5_block(cls, cfg):
        stage, out_channels = super()._build_res5_block(cfg)
        stage.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return stage, out_channels


class GeneralizedRCNNWithInputFilter(GeneralizedRCNN):
    """``GeneralizedRCNN`` that filters each normalized image (see module docstring)."""

    @configurable
    def __init__(self, *, input_filter: dict[str, Any], **kwargs):
        super().__init__(**kwargs)
        self.input_filter = InputFilter(input_filter)

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "input_filter": input_filter_from_cfg(cfg)}

    def preprocess_image(self, batched_inputs: list[dict[str, torch.Tensor]]) -> ImageList:
        images = [x["image"].to(self.device) for x in batched_inputs]
        # Filter per image before padding: the blur must not smear the zero padding into the border.
        images = [self.input_filter(((x - self.pixel_mean) / self.pixel_std).unsqueeze(0))[0] for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)


Res5ROIHeadsExtraNorm = _register(ROI_HEADS_REGISTRY, Res5ROIHeadsExtraNorm)
GeneralizedRCNNWithInputFilter = _register(META_ARCH_REGISTRY, GeneralizedRCNNWithInputFilter)


def add_input_filter_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.INPUT_FILTER`` (NAME none|highpass, KERNEL_SIZE, SIGMA) to a detectron2 config."""
    if "INPUT_FILTER" not in cfg.MODEL:
        cfg.MODEL.INPUT_FILTER = CfgNode({"NAME": "none", "KERNEL_SIZE": 11, "SIGMA": 5.0})
    return cfg


def input_filter_from_cfg(cfg: CfgNode) -> dict[str, Any]:
    node = cfg.MODEL.get("INPUT_FILTER")
    if node is None:
        return normalize_filter_spec(None)
    return normalize_filter_spec({"name": node.NAME, "kernel_size": node.KERNEL_SIZE, "sigma": node.SIGMA})


def apply_input_filter(cfg: CfgNode, spec: dict[str, Any] | str | None) -> dict[str, Any]:
    """Put the checkpoint's filter ``spec`` into ``cfg`` and, when it is not "none", switch
    ``MODEL.META_ARCHITECTURE`` to the filtering model. Returns the normalized spec."""
    spec = normalize_filter_spec(spec)
    add_input_filter_config(cfg)
    cfg.MODEL.INPUT_FILTER.NAME = spec["name"]
    if spec["name"] == "highpass":
        cfg.MODEL.INPUT_FILTER.KERNEL_SIZE = int(spec["kernel_size"])
        cfg.MODEL.INPUT_FILTER.SIGMA = float(spec["sigma"])
        if cfg.MODEL.META_ARCHITECTURE not in ("GeneralizedRCNN", FILTERING_META_ARCHITECTURE):
            raise ValueError(f"the checkpoint asks for the input filter {spec}, which the suite applies in "
                             f"GeneralizedRCNN's preprocessing; MODEL.META_ARCHITECTURE is "
                             f"{cfg.MODEL.META_ARCHITECTURE!r}. Use a Faster/Mask R-CNN config.")
        cfg.MODEL.META_ARCHITECTURE = FILTERING_META_ARCHITECTURE
    return spec
