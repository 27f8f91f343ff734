"""Third-party checkpoint layouts built from random ResNets, for the converter tests.

Every layout is written the way its project writes it (key prefixes, containers, heads, momentum
copies), with random weights, so no download is needed. BatchNorm weights and statistics are randomised
too: torchvision initialises them to 1/0, which would make "loaded" and "left at init" look the same.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pretrain.backbones import build_resnet, trunk_state_dict

ARCH_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# Every supported third-party layout: name -> how the file is written (see write_layout).
LAYOUTS = ("moco", "mocov3", "timm", "torchvision", "simclr", "backbone", "model", "ddp", "lightning", "dino", "byol",
           "detectron2_pkl", "detectron2_model_c4", "numpy_pkl", "legacy_torch")


def random_trunk(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A trunk state_dict (torchvision names, with num_batches_tracked) where every tensor is random."""
    torch.manual_seed(seed)
    state = trunk_state_dict(build_resnet(arch))
    generator = torch.Generator().manual_seed(seed + 1000)
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(seed + 7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(tensor.shape, generator=generator) + 0.5
        elif not key.endswith(".weight") or tensor.dim() == 1:  # BN weight/bias/mean
            state[key] = torch.randn(tensor.shape, generator=generator)
    return state


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _mlp(prefix: str, features: int, hidden: int = 16, out: int = 8) -> dict[str, torch.Tensor]:
    return {f"{prefix}0.weight": torch.randn(hidden, features), f"{prefix}0.bias": torch.randn(hidden),
            f"{prefix}2.weight": torch.randn(out, hidden), f"{prefix}2.bias": torch.randn(out)}


def _d2_names(state: dict[str, torch.Tensor], keep_counters: bool = True) -> dict[str, torch.Tensor]:
    """Rename like MoCo's/detectron2's own converter scripts do (string replacement, fc kept as stem.fc)."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") and not keep_counters:
            continue
        new = key if "layer" in key else "stem." + key
        for stage in (1, 2, 3, 4):
            new = new.replace(f"layer{stage}", f"res{stage + 1}")
        for index in (1, 2, 3):
            new = new.replace(f"bn{index}", f"conv{index}.norm")
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[new] = value
    return renamed


def write_layout(directory: Path, layout: str, arch: str = "resnet18", seed: int = 0) -> tuple[Path, dict]:
    """Write ``layout`` with a random trunk; return (path, trunk) where trunk is the expected state_dict."""
    trunk = random_trunk(arch, seed)
    other = random_trunk(arch, seed + 1)
    features = ARCH_FEATURES[arch]
    path = directory / f"{layout}_{arch}_{seed}.pth"
    if layout == "moco":
        state = {**_prefixed("module.encoder_q.", trunk), **_mlp("module.encoder_q.fc.", features),
                 **_prefixed("module.encoder_k.", other), **_mlp("module.encoder_k.fc.", features),
                 "module.queue": torch.randn(8, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        obj = {"epoch": 200, "arch": arch, "state_dict": state,
               "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3)}}, "param_groups": [{"lr": 0.03}]}}
    elif layout == "mocov3":  # MoCo v3 (ResNet): base and momentum encoders, fc heads, predictor
        state = {**_prefixed("module.base_encoder.", trunk), **_mlp("module.base_encoder.fc.", features),
                 **_prefixed("module.momentum_encoder.", other), **_mlp("module.predictor.", 8, out=8)}
        obj = {"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    elif layout == "timm":  # timm train.py: weights plus an EMA copy in a sibling container
        obj = {"epoch": 5, "arch": arch, "state_dict": {**trunk, "fc.weight": torch.randn(10, features)},
               "state_dict_ema": {**other, "fc.weight": torch.randn(10, features)}}
    elif layout == "torchvision":
        obj = {**trunk, "fc.weight": torch.randn(1000, features), "fc.bias": torch.randn(1000)}
    elif layout == "simclr":  # Spijkervet-style SimCLR port
        obj = {**_prefixed("encoder.", trunk), **_mlp("projector.", features)}
    elif layout == "backbone":  # solo-learn / lightly style
        obj = {**_prefixed("backbone.", trunk), **_mlp("projector.", features), "classifier.weight": torch.randn(10, features)}
    elif layout == "model":
        obj = {"model": {**_prefixed("model.", trunk), **_mlp("model.fc.", features)}}
    elif layout == "ddp":
        obj = {**_prefixed("module.", trunk), "module.fc.weight": torch.randn(10, features), "module.fc.bias": torch.randn(10)}
    elif layout == "lightning":
        state = {**_prefixed("model.backbone.", trunk), **_mlp("model.projector.", features),
                 **_prefixed("model.momentum_backbone.", other)}
        obj = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.2.0", "state_dict": state,
               "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": [],
               "hyper_parameters": {"lr": 0.1, "arch": arch}}
    elif layout == "dino":
        obj = {"student": {**_prefixed("module.backbone.", trunk), **_mlp("module.head.mlp.", features)},
               "teacher": {**_prefixed("backbone.", other), **_mlp("head.mlp.", features)}, "epoch": 10}
    elif layout == "byol":
        obj = {**_prefixed("online_encoder.net.", trunk), **_prefixed("target_encoder.net.", other),
               **_mlp("online_predictor.net.", features)}
    elif layout == "detectron2_pkl":  # MoCo's convert-pretrain-to-detectron2.py output (fc kept, counters kept)
        path = path.with_suffix(".pkl")
        names = _d2_names({**trunk, **_mlp("fc.", features)})
        obj = {"model": {k: v.numpy() for k, v in names.items()}, "__author__": "MOCO", "matching_heuristics": True}
        path.write_bytes(pickle.dumps(obj, protocol=2))
        return path, trunk
    elif layout == "detectron2_model_c4":  # a trained detectron2 C4 model: res5 lives in the ROI head
        names = _d2_names(trunk, keep_counters=False)  # as with FrozenBN
        state = {("roi_heads." if k.startswith("res5.") else "backbone.") + k: v for k, v in names.items()}
        state["roi_heads.box_predictor.cls_score.weight"] = torch.randn(21, features)
        state["proposal_generator.rpn_head.conv.weight"] = torch.randn(8, 8, 3, 3)
        obj = {"model": state, "iteration": 100}
    elif layout == "numpy_pkl":  # a plain dict of numpy arrays in torchvision names
        path = path.with_suffix(".pkl")
        path.write_bytes(pickle.dumps({k: v.numpy() for k, v in trunk.items()}, protocol=4))
        return path, trunk
    elif layout == "legacy_torch":  # torch.save before PyTorch 1.6 (not a zip archive)
        torch.save(dict(trunk), path, _use_new_zipfile_serialization=False)
        return path, trunk
    else:
        raise ValueError(layout)
    torch.save(obj, path)
    return path, trunk
