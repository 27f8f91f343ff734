"""Checkpoint intake: every supported layout yields exactly its encoder's weights; everything else is
refused with a message that names the problem (and nothing from the file is ever executed)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pretrain.backbones import build_resnet, trunk_state_dict
from pretrain.checkpoint import CheckpointError
from tests.transfer.checkpoint_layouts import LAYOUTS, random_trunk
from transfer.checkpoints import (
    AmbiguousTrunkError,
    Backbone,
    NotAResNetError,
    candidate_prefixes,
    load_backbone,
)

EXPECTED_FORMAT = {
    "moco": "moco", "mocov3": "moco", "timm": "torchvision", "torchvision": "torchvision", "simclr": "simclr", "backbone": "backbone", "model": "prefix",
    "ddp": "ddp", "lightning": "lightning", "dino": "backbone", "byol": "prefix", "detectron2_pkl": "detectron2",
    "detectron2_model_c4": "detectron2", "numpy_pkl": "torchvision", "legacy_torch": "torchvision",
}
EXPECTED_PREFIX = {  # (container, prefix) of the encoder that must be chosen
    "moco": ("state_dict", "module.encoder_q."), "mocov3": ("state_dict", "module.base_encoder."),
    "timm": ("state_dict", ""), "torchvision": ("", ""), "simclr": ("", "encoder."),
    "backbone": ("", "backbone."), "model": ("model", "model."), "ddp": ("", "module."),
    "lightning": ("state_dict", "model.backbone."), "dino": ("student", "module.backbone."),
    "byol": ("", "online_encoder.net."), "detectron2_pkl": ("model", ""),
    "detectron2_model_c4": ("model", "backbone."), "numpy_pkl": ("", ""), "legacy_torch": ("", ""),
}


def assert_trunk_equals(backbone: Backbone, trunk: dict[str, torch.Tensor]) -> None:
    assert set(backbone.state_dict) == set(trunk)
    for key, value in trunk.items():
        assert torch.equal(backbone.state_dict[key], value), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_yields_the_online_encoder(layout_factory, layout):
    path, trunk = layout_factory(layout)
    backbone = load_backbone(path)
    assert backbone.arch == "resnet18"
    if layout == "detectron2_model_c4":  # a detectron2 model has no BN counters: they are filled with 0
        trunk = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else v) for k, v in trunk.items()}
    assert_trunk_equals(backbone, trunk)
    assert backbone.source_format == EXPECTED_FORMAT[layout]
    assert (backbone.container, backbone.prefix) == EXPECTED_PREFIX[layout]
    # every tensor in the file is either part of the trunk or dropped with a reason
    assert len(set(backbone.key_map.values())) + len(backbone.dropped_reasons) == backbone.source_tensor_count
    assert sorted(backbone.dropped_reasons) == backbone.dropped_keys
    assert backbone.meta["method"] == "external" and backbone.input_filter == {"name": "none"}
    backbone.build_module()  # strict load into a torchvision ResNet


def test_drop_reasons_name_heads_queue_and_momentum_copy(layout_factory):
    backbone = load_backbone(layout_factory("moco")[0])
    reasons = backbone.dropped_reasons
    assert reasons["state_dict.module.encoder_q.fc.0.weight"].startswith("classifier / projection head")
    assert reasons["state_dict.module.queue"] == "MoCo negative-sample queue"
    assert reasons["state_dict.module.encoder_k.layer1.0.conv1.weight"] == "momentum/teacher copy of the encoder"
    assert "encoder_k" in backbone.notes[0]  # the choice is stated


@pytest.mark.parametrize("arch", ["resnet50"])
def test_moco_resnet50(layout_factory, arch):
    path, trunk = layout_factory("moco", arch=arch)
    backbone = load_backbone(path, format="moco")
    assert backbone.arch == arch and backbone.source_format == "moco"
    assert_trunk_equals(backbone, trunk)


def test_ours_keeps_metadata(random_checkpoint_factory):
    path = random_checkpoint_factory("resnet18", seed=3, input_filter="highpass", masking="saliency", strategy="hp")
    backbone = load_backbone(path)
    assert backbone.source_format == "ours" and backbone.container == "backbone" and backbone.prefix == ""
    assert backbone.input_filter == {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    assert backbone.meta["masking"] == "saliency" and backbone.meta["strategy"] == "hp"
    with pytest.raises(CheckpointError, match="not one of the suite's checkpoints"):
        load_backbone(path.parent / "nope.pth" if False else _third_party(path), format="ours")


def _third_party(ours_path):
    target = ours_path.parent / f"plain_{ours_path.name}"
    if not target.exists():
        torch.save(random_trunk("resnet18"), target)
    return target


# -------------------------------------------------------------------------------------- choosing rules


def test_prefix_overrides_auto_detection_with_or_without_container_and_dot(layout_factory):
    path, _ = layout_factory("moco")
    other = random_trunk("resnet18", 1)
    for prefix in ("module.encoder_k.", "module.encoder_k", "state_dict.module.encoder_k."):
        backbone = load_backbone(path, prefix=prefix)
        assert backbone.prefix == "module.encoder_k."
        assert_trunk_equals(backbone, other)


def test_wrong_prefix_lists_the_trunks_that_exist(layout_factory):
    path, _ = layout_factory("moco")
    with pytest.raises(NotAResNetError, match=r"no ResNet stem under prefix 'module.encoder_x.'.*encoder_q"):
        load_backbone(path, prefix="module.encoder_x.")
    with pytest.raises(NotAResNetError, match="does not hold a complete ResNet trunk"):
        load_backbone(path, prefix="module.encoder_q.layer1.0.")


def test_two_unrelated_trunks_are_ambiguous(tmp_path):
    path = tmp_path / "two.pth"
    state = {**{f"net_a.{k}": v for k, v in random_trunk("resnet18", 0).items()},
             **{f"net_b.{k}": v for k, v in random_trunk("resnet18", 1).items()}}
    torch.save(state, path)
    assert candidate_prefixes(state) == ["net_a.", "net_b."]
    with pytest.raises(AmbiguousTrunkError, match=r"'net_a\.'.*'net_b\.'.*--prefix"):
        load_backbone(path)
    assert load_backbone(path, prefix="net_b.").prefix == "net_b."


def test_identical_copies_are_not_ambiguous(tmp_path):
    path = tmp_path / "dup.pth"
    trunk = random_trunk("resnet18")
    torch.save({"state_dict": trunk, "model": {f"module.{k}": v for k, v in trunk.items()}}, path)
    backbone = load_backbone(path)
    assert_trunk_equals(backbone, trunk)
    assert any("identical" in note for note in backbone.notes)


def test_incomplete_query_encoder_never_falls_back_to_the_momentum_copy(tmp_path):
    query = random_trunk("resnet18", 0)
    del query["layer3.1.conv2.weight"]
    state = {**{f"module.encoder_q.{k}": v for k, v in query.items()},
             **{f"module.encoder_k.{k}": v for k, v in random_trunk("resnet18", 1).items()}}
    path = tmp_path / "broken_moco.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(NotAResNetError, match=r"layer3\.1\.conv2\.weight.*encoder_k.*--prefix") as info:
        load_backbone(path)
    assert "missing 1 of" in str(info.value)


def test_teacher_only_checkpoint_is_used_and_said(tmp_path):
    path = tmp_path / "teacher.pth"
    trunk = random_trunk("resnet18")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in trunk.items()}}, path)
    backbone = load_backbone(path)
    assert_trunk_equals(backbone, trunk)
    assert any("only momentum/teacher copies" in note for note in backbone.notes)


@pytest.mark.parametrize(("fmt", "message"), [
    ("moco", "no trunk of that kind"), ("detectron2", "no trunk of that kind"), ("lightning", "Lightning markers"),
    ("ours", "not one of the suite's checkpoints"),
])
def test_format_that_does_not_match_the_file(layout_factory, fmt, message):
    path, _ = layout_factory("torchvision")
    with pytest.raises(CheckpointError, match=message):
        load_backbone(path, format=fmt)


def test_format_narrows_choice(layout_factory):
    path, _ = layout_factory("moco")
    with pytest.raises(NotAResNetError, match="no trunk of that kind"):
        load_backbone(path, format="torchvision")
    with pytest.raises(ValueError, match="needs --prefix"):
        load_backbone(path, format="prefix")
    with pytest.raises(ValueError, match="unknown format"):
        load_backbone(path, format="timm")


# ----------------------------------------------------------------------------------------- refusals


def test_vit_state_dict_is_refused(tmp_path):
    path = tmp_path / "vit.pth"
    state = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
             "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
             "head.weight": torch.zeros(10, 8)}
    torch.save({"model": state}, path)
    with pytest.raises(NotAResNetError, match="Vision Transformer"):
        load_backbone(path)


def test_missing_trunk_keys_are_named(tmp_path):
    trunk = random_trunk("resnet50")
    del trunk["layer2.3.bn2.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(trunk, path)
    with pytest.raises(NotAResNetError, match=r"missing 1 of .*layer2\.3\.bn2\.running_var"):
        load_backbone(path)


def test_missing_block_is_not_a_resnet(tmp_path):
    trunk = {k: v for k, v in random_trunk("resnet18").items() if not k.startswith("layer4.1.")}
    path = tmp_path / "short.pth"
    torch.save(trunk, path)
    with pytest.raises(NotAResNetError, match=r"\(2, 2, 2, 1\) BasicBlock blocks"):
        load_backbone(path)


def test_wrong_shapes_are_refused(tmp_path):
    trunk = random_trunk("resnet18")
    trunk["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(trunk, path)
    with pytest.raises(NotAResNetError, match=r"wrong shape.*layer2\.0\.conv1\.weight \(128, 64, 1, 1\)"):
        load_backbone(path)


def test_modified_resnet_is_refused_not_silently_truncated(tmp_path):
    trunk = random_trunk("resnet18")
    trunk["layer1.0.se.fc1.weight"] = torch.zeros(4, 64)
    path = tmp_path / "se.pth"
    torch.save(trunk, path)
    with pytest.raises(NotAResNetError, match=r"se\.fc1\.weight.*not supported"):
        load_backbone(path)


def test_non_finite_weights_are_refused(tmp_path):
    trunk = random_trunk("resnet18")
    trunk["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(trunk, path)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_backbone(path)


def test_half_precision_and_missing_bn_counters_are_accepted_and_said(tmp_path):
    trunk = random_trunk("resnet18")
    old = {k: v.half() for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_fp16.pth"
    torch.save(old, path)
    backbone = load_backbone(path)
    assert all(v.dtype == torch.float32 for k, v in backbone.state_dict.items() if "num_batches" not in k)
    assert torch.equal(backbone.state_dict["conv1.weight"], old["conv1.weight"].float())
    assert int(backbone.state_dict["bn1.num_batches_tracked"]) == 0
    assert any("float16" in n for n in backbone.notes) and any("num_batches_tracked" in n for n in backbone.notes)


def test_caffe2_names_are_explained(tmp_path):
    path = tmp_path / "R-50.pkl"
    import numpy as np

    path.write_bytes(pickle.dumps({"conv1_w": np.zeros((64, 3, 7, 7), np.float32),
                                   "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}, protocol=2))
    with pytest.raises(NotAResNetError, match="Caffe2"):
        load_backbone(path)


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_truncated_checkpoint_is_refused(layout_factory, tmp_path, cut):
    path, _ = layout_factory("moco")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone(truncated)


def test_truncated_pickle_is_refused(layout_factory, tmp_path):
    path, _ = layout_factory("detectron2_pkl")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone(truncated)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_not_checkpoints(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_bytes(b"<!DOCTYPE html><html><body>Google Drive - quota exceeded</body></html>")
    (tmp_path / "a_dir.pth").mkdir()
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "scripted.pt"))
    (tmp_path / "notes.pth").write_text("hello, these are my notes\n")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pth")
    cases = {"empty.pth": "empty", "page.pth": "HTML", "a_dir.pth": "directory", "missing.pth": "not found",
             "scripted.pt": "TorchScript", "notes.pth": r"not a checkpoint .*starts with b'hello",
             "whole_model.pth": r"pickled torch\.nn\.modules\.linear\.Linear object .*state_dict\(\)"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_backbone(tmp_path / name)


class _Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return os.mkdir, (self.flag,)


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle_as_pth", "pkl"])
def test_malicious_checkpoint_runs_nothing(tmp_path, writer):
    flag = tmp_path / "side_effect"
    trunk = random_trunk("resnet18")
    path = tmp_path / ("evil.pkl" if writer == "pkl" else "evil.pth")
    if writer == "torch_zip":
        torch.save({"state_dict": trunk, "config": _Payload(flag)}, path)
    else:  # a weights pickle of numpy arrays, with the payload hidden beside the weights
        numpy_trunk = {k: v.numpy() for k, v in trunk.items()}
        path.write_bytes(pickle.dumps({"state_dict": numpy_trunk, "config": _Payload(flag)}, protocol=4))
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_backbone(path)
    assert "mkdir" in str(info.value)
    assert not flag.exists()


def test_build_module_matches_torchvision(layout_factory):
    path, trunk = layout_factory("torchvision")
    module = load_backbone(path).build_module()
    reference = build_resnet("resnet18")
    reference.load_state_dict(trunk)
    assert all(torch.equal(a, b) for a, b in zip(trunk_state_dict(module).values(), trunk_state_dict(reference).values()))


# ------------------------------------------------------------- files with Python objects beside the weights

FLAG_NAME = "hyperparameter_side_effect"


def touch_flag(path):  # what unpickling the objects below would call; it must never run
    open(path, "w").close()


class HyperParameters(dict):
    def __init__(self, flag, **values):
        super().__init__(**values)
        self.flag = str(flag)

    def __reduce__(self):
        return touch_flag, (self.flag,)


class TrainingConfig:
    def __init__(self, flag):
        self.flag = str(flag)

    def __setstate__(self, state):
        touch_flag(state["flag"])


@pytest.mark.parametrize("zipped", [True, False])
def test_lightning_checkpoint_with_objects_loads_its_weights_and_runs_nothing(tmp_path, zipped):
    import argparse

    import numpy as np

    flag = tmp_path / FLAG_NAME
    trunk = random_trunk("resnet18")
    checkpoint = {
        "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.2.0",
        "state_dict": {f"model.backbone.{k}": v for k, v in trunk.items()},
        "hyper_parameters": {"args": argparse.Namespace(lr=0.1), "extra": HyperParameters(flag, a=1),
                             "config": TrainingConfig(flag), "best": np.float64(0.5)},
    }
    path = tmp_path / "objects.ckpt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipped)
    backbone = load_backbone(path)
    assert_trunk_equals(backbone, trunk)
    assert backbone.source_format == "lightning"
    note = next(n for n in backbone.notes if "not rebuilt" in n)
    assert "argparse.Namespace" in note and "touch_flag" in note and "TrainingConfig" in note
    assert not flag.exists()


def test_numpy_scalars_beside_weights_need_no_placeholders(tmp_path):
    import numpy as np

    path = tmp_path / "scalar.pth"
    torch.save({"state_dict": random_trunk("resnet18"), "best_acc1": np.float64(76.1), "lr": np.float32(0.1)}, path)
    assert not any("not rebuilt" in n for n in load_backbone(path).notes)


def test_inert_unpickler_cannot_set_attributes_of_classes():
    import io

    from transfer.inert_torch_load import _InertUnpickler

    data = b"ctorch\nTensor\n}Vforged_attribute\nI1\nsb."
    with pytest.raises(pickle.UnpicklingError, match="refusing to set the state"):
        _InertUnpickler(io.BytesIO(data)).load()
    assert not hasattr(torch.Tensor, "forged_attribute")
