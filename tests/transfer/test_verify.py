"""Verification inside detectron2 catches every way a backbone tensor can fail to load."""

from __future__ import annotations

import pytest
import torch

from pretrain.backbones import build_resnet, trunk_state_dict
from tests.transfer.checkpoint_layouts import random_trunk
from transfer.d2compat import import_detectron2
from transfer.d2names import torchvision_to_detectron2_names
from transfer.safe_pickle import dumps_portable
from transfer.verify import VerificationError, verify_detectron2


def _write_pkl(path, trunk, arch="resnet18", drop=(), extra=None, rename=None):
    mapping = torchvision_to_detectron2_names(trunk, arch)
    weights = {d2: trunk[tv].numpy() for tv, d2 in mapping.items() if d2 not in drop}
    if rename:
        weights = {rename.get(k, k): v for k, v in weights.items()}
    weights.update(extra or {})
    path.write_bytes(dumps_portable({"model": weights, "__author__": "test", "matching_heuristics": True}))
    return path


def test_passes_for_a_complete_file_with_bn_and_frozen_bn(tmp_path):
    pkl = _write_pkl(tmp_path / "ok.pkl", random_trunk("resnet18"))
    assert verify_detectron2(pkl, "resnet18")["models"]["FPN"]["summary"] == "backbone: 100/100 loaded"
    frozen = verify_detectron2(pkl, "resnet18", norm="FrozenBN", freeze_at=2)
    assert frozen["passed"] and frozen["models"]["FPN"]["loaded"] == 100


def test_a_missing_tensor_equal_to_detectron2s_init_is_still_caught(tmp_path):
    """A fresh torchvision ResNet's BN statistics (mean 0, var 1) equal detectron2's own initial values,
    so comparing values alone would call a missing tensor "loaded". Verification poisons first."""
    trunk = trunk_state_dict(build_resnet("resnet18"))
    pkl = _write_pkl(tmp_path / "missing.pkl", trunk, drop=("res3.0.shortcut.norm.running_var",))
    source = {d2: trunk[tv] for tv, d2 in torchvision_to_detectron2_names(trunk, "resnet18").items()}
    assert torch.equal(source["res3.0.shortcut.norm.running_var"], torch.ones(128))  # == detectron2's init
    with pytest.raises(VerificationError, match=r"not_loaded: 1 .*res3\.0\.shortcut\.norm\.running_var"):
        verify_detectron2(pkl, "resnet18", expected=source)
    # judged against the file itself, the model tensor that nothing in the file fills is reported
    report = verify_detectron2(pkl, "resnet18", raise_on_failure=False)
    fpn = report["models"]["FPN"]
    assert not report["passed"] and fpn["summary"] == "backbone: 99/100 loaded"
    assert fpn["model_trunk_tensors_without_source"] == ["backbone.bottom_up.res3.0.shortcut.norm.running_var"]


def test_unmatched_and_misnamed_keys_fail(tmp_path):
    trunk = random_trunk("resnet18")
    pkl = _write_pkl(tmp_path / "extra.pkl", trunk, extra={"res5.1.conv3.weight": trunk["layer4.1.conv2.weight"].numpy()})
    with pytest.raises(VerificationError, match="unexpected_keys"):
        verify_detectron2(pkl, "resnet18")
    misnamed = _write_pkl(tmp_path / "misnamed.pkl", trunk, rename={"res2.0.conv1.norm.bias": "res2.0.conv1.bn.bias"})
    report = verify_detectron2(misnamed, "resnet18", raise_on_failure=False)
    assert not report["passed"] and "backbone.bottom_up.res2.0.conv1.norm.bias" in \
        report["models"]["FPN"]["model_trunk_tensors_without_source"]


def test_resnet50_res5_must_reach_the_c4_roi_head(tmp_path):
    trunk = random_trunk("resnet50")
    pkl = _write_pkl(tmp_path / "r50.pkl", trunk, arch="resnet50")
    report = verify_detectron2(pkl, "resnet50")
    assert {layout: r["summary"] for layout, r in report["models"].items()} == {
        "C4": "backbone: 265/265 loaded", "FPN": "backbone: 265/265 loaded"}
    # expected source tensors that differ from the file (a conversion bug) are reported as mismatched
    expected = {k: torch.from_numpy(v.copy()) for k, v in
                {d2: trunk[tv].numpy() for tv, d2 in torchvision_to_detectron2_names(trunk, "resnet50").items()}.items()}
    expected["res5.2.conv3.weight"] = expected["res5.2.conv3.weight"] * 2
    bad = verify_detectron2(pkl, "resnet50", expected=expected, layouts=("C4",), raise_on_failure=False)
    assert bad["models"]["C4"]["mismatched"] == ["roi_heads.res5.2.conv3.weight"]


def test_runner_model_with_extra_norm_after_res5_and_sync_bn(tmp_path):
    """The detection runner's own model (naiveSyncBN, an extra norm layer appended to res5 as in MoCo's
    Res5ROIHeadsExtraNorm) can be loaded and checked directly; the new layer is not a trunk tensor."""
    import_detectron2()
    from detectron2.layers import get_norm
    from detectron2.modeling import build_model

    from transfer.verify import detectron2_config, load_and_check

    trunk = random_trunk("resnet50")
    pkl = _write_pkl(tmp_path / "r50.pkl", trunk, arch="resnet50")
    model = build_model(detectron2_config("resnet50", "C4", norm="naiveSyncBN"))
    model.roi_heads.res5.add_module("norm", get_norm("naiveSyncBN", 2048))
    result = load_and_check(model, pkl)
    assert result["layout"] == "C4" and result["summary"] == "backbone: 265/265 loaded"
    assert torch.equal(model.roi_heads.res5[2].conv3.norm.running_var, trunk["layer4.2.bn3.running_var"])


def test_safe_checkpointer_resumes_detectron2_training_checkpoints(tmp_path):
    """The detection runner resumes with SafeDetectionCheckpointer: detectron2's own training checkpoints
    (model, optimizer, LR scheduler, iteration) load with weights_only=True."""
    import_detectron2()
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler, build_optimizer

    from transfer.d2checkpoint import SafeDetectionCheckpointer
    from transfer.verify import detectron2_config

    cfg = detectron2_config("resnet18", "FPN")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    SafeDetectionCheckpointer(model, str(tmp_path), optimizer=optimizer,
                              scheduler=build_lr_scheduler(cfg, optimizer)).save("model_0000009", iteration=9)
    fresh = build_model(cfg)
    fresh_optimizer = build_optimizer(cfg, fresh)
    checkpointer = SafeDetectionCheckpointer(fresh, str(tmp_path), optimizer=fresh_optimizer,
                                             scheduler=build_lr_scheduler(cfg, fresh_optimizer))
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 9
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
