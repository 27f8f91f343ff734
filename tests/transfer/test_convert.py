"""Conversion to detectron2: round trips for every layout, the report, verification inside detectron2,
what is (not) written on failure, and the command line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.backbones import build_resnet
from pretrain.checkpoint import CheckpointError
from pretrain.fileio import sha256_file
from tests.transfer.checkpoint_layouts import LAYOUTS, random_trunk
from transfer.checkpoints import load_backbone
from transfer.convert import (
    OutputExistsError,
    conversion_provenance,
    convert_to_detectron2,
    export_torchvision,
    main,
)
from transfer.d2compat import import_detectron2
from transfer.d2names import torchvision_to_detectron2_name
from transfer.safe_pickle import load_detectron2_pickle

REPO = Path(__file__).resolve().parents[2]


def _assert_pkl_equals_trunk(pkl: Path, trunk: dict[str, torch.Tensor]) -> dict:
    data = load_detectron2_pickle(pkl)
    weights = data["model"]
    expected = {torchvision_to_detectron2_name(k): v for k, v in trunk.items() if "num_batches" not in k}
    assert set(weights) == set(expected)
    for name, value in expected.items():
        assert weights[name].dtype.name == "float32"
        assert torch.equal(torch.from_numpy(weights[name]), value.float()), name
    assert data["matching_heuristics"] is True and data["__author__"].startswith("masked-ssl")
    return data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_resnet18(layout_factory, tmp_path, layout):
    path, trunk = layout_factory(layout)
    out = tmp_path / "out" / "model.pkl"
    report = convert_to_detectron2(path, out)
    data = _assert_pkl_equals_trunk(out, trunk)
    assert report["verification"]["passed"]
    assert report["verification"]["models"]["FPN"]["summary"] == "backbone: 100/100 loaded"
    assert report["counts"]["mapped"] == 100
    provenance = data["masked_ssl"]
    assert provenance["source_sha256"] == sha256_file(path) == report["input"]["sha256"]
    assert provenance["source_format"] == report["input"]["format"]
    assert set(provenance["meta"]) >= {"arch", "method", "masking", "strategy", "mask_branch", "input_filter",
                                       "image_size", "seed"}
    assert json.loads((tmp_path / "out" / "model.report.json").read_text())["counts"] == report["counts"]


@pytest.mark.parametrize("layout", ["moco", "detectron2_model_c4"])
def test_round_trip_resnet50_in_c4_and_fpn(layout_factory, tmp_path, layout, random_checkpoint_factory):
    path, trunk = layout_factory(layout, arch="resnet50")
    report = convert_to_detectron2(path, tmp_path / "r50.pkl")
    _assert_pkl_equals_trunk(tmp_path / "r50.pkl", trunk)
    models = report["verification"]["models"]
    assert models["C4"]["summary"] == models["FPN"]["summary"] == "backbone: 265/265 loaded"
    assert report["preprocessing"]["detectron2_config"]["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 256


def test_ours_carries_metadata_and_input_filter(random_checkpoint_factory, tmp_path):
    path = random_checkpoint_factory("resnet18", seed=5, input_filter="highpass", masking="saliency",
                                     strategy="blur", mask_branch="key")
    report = convert_to_detectron2(path, tmp_path / "ours.pkl", report_path=tmp_path / "r" / "ours.json")
    data = load_detectron2_pickle(tmp_path / "ours.pkl")
    meta = data["masked_ssl"]["meta"]
    assert meta["input_filter"] == {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    assert (meta["masking"], meta["strategy"], meta["mask_branch"], meta["seed"]) == ("saliency", "blur", "key", 5)
    prep = report["preprocessing"]
    assert prep["input_filter"]["name"] == "highpass" and prep["source"] == "checkpoint metadata"
    assert prep["pixel_mean"] == [123.675, 116.28, 103.53] and prep["pixel_std"] == [58.395, 57.12, 57.375]
    assert prep["input_format"] == "RGB" and prep["stride_in_1x1"] is False
    assert (tmp_path / "r" / "ours.json").exists()
    assert conversion_provenance(tmp_path / "ours.pkl")["meta"] == meta
    # read back: the .pkl alone is enough to recover the trunk and the filter
    again = load_backbone(tmp_path / "ours.pkl")
    assert again.source_format == "detectron2" and again.input_filter["name"] == "highpass"
    original = load_backbone(path)
    assert all(torch.equal(again.state_dict[k], v) for k, v in original.state_dict.items() if "num_batches" not in k)


def test_report_accounts_for_every_source_tensor(layout_factory, tmp_path):
    path, _ = layout_factory("lightning")
    report = convert_to_detectron2(path, tmp_path / "l.pkl", verify=False)
    counts, mapping, dropped = report["counts"], report["mapping"], report["dropped"]
    assert counts["source_tensors"] == len(mapping) + len(dropped) == counts["mapped"] + counts["dropped"]
    assert not set(mapping) & set(dropped)
    assert counts["trunk_parameters"] + counts["trunk_bn_buffers"] == counts["mapped"] == 100
    assert mapping["state_dict.model.backbone.layer4.1.bn2.running_var"] == "res5.1.conv2.norm.running_var"
    assert dropped["state_dict.model.projector.0.weight"] == "projection / prediction / classification head"
    assert dropped["state_dict.model.momentum_backbone.conv1.weight"] == "momentum/teacher copy of the encoder"
    assert sum(counts["dropped_by_reason"].values()) == counts["dropped"]
    assert report["verification"] == {"skipped": True}
    assert report["architecture"] == {"arch": "resnet18", "depth": 18, "block": "BasicBlock",
                                      "blocks_per_stage": [2, 2, 2, 2]}


def test_stock_detectron2_checkpointer_ignores_the_extra_key(layout_factory, tmp_path):
    from transfer.verify import detectron2_config

    path, trunk = layout_factory("torchvision")
    convert_to_detectron2(path, tmp_path / "tv.pkl", verify=False)
    import_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(detectron2_config("resnet18", "FPN"))
    extra = DetectionCheckpointer(model).load(str(tmp_path / "tv.pkl"))  # our own file: trusted here
    assert "masked_ssl" in extra
    loaded = model.state_dict()["backbone.bottom_up.res3.1.conv2.weight"]
    assert torch.equal(loaded, trunk["layer2.1.conv2.weight"])


# ------------------------------------------------------------------------------------ failures


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("problem", ["vit", "wrong_prefix", "truncated"])
def test_refusals_write_nothing(layout_factory, tmp_path, problem):
    source, _ = layout_factory("moco")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    kwargs = {}
    if problem == "vit":
        source = tmp_path / "vit.pth"
        torch.save({"cls_token": torch.zeros(1, 1, 4), "patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)}, source)
    elif problem == "wrong_prefix":
        kwargs["prefix"] = "module.encoder_z."
    else:
        cut = tmp_path / "cut.pth"
        cut.write_bytes(source.read_bytes()[:-100])
        source = cut
    with pytest.raises(CheckpointError):
        convert_to_detectron2(source, out_dir / "x.pkl", export_torchvision_path=out_dir / "x.pth", **kwargs)
    assert _files(out_dir) == []


def test_failed_verification_writes_nothing(layout_factory, tmp_path, monkeypatch):
    """If the file on disk differs from the source (here: one tensor corrupted while writing), detectron2
    loads the corrupted value and verification must catch it."""
    import transfer.convert as convert_module
    from transfer.safe_pickle import dumps_portable

    def corrupting_dump(payload):
        payload["model"]["res4.1.conv1.weight"] = payload["model"]["res4.1.conv1.weight"] + 1.0
        return dumps_portable(payload)

    monkeypatch.setattr(convert_module, "dumps_portable", corrupting_dump)
    path, _ = layout_factory("torchvision")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match=r"mismatched: 1 .*res4\.1\.conv1\.weight"):
        convert_to_detectron2(path, out_dir / "bad.pkl")
    assert _files(out_dir) == []


def test_existing_output(layout_factory, tmp_path):
    first, _ = layout_factory("torchvision", seed=0)
    second, _ = layout_factory("ddp", seed=1)
    out = tmp_path / "o.pkl"
    convert_to_detectron2(first, out, verify=False)
    before = out.stat().st_mtime_ns, sha256_file(out)
    report = convert_to_detectron2(first, out, verify=False)  # same input: kept
    assert report["status"].startswith("up-to-date") and (out.stat().st_mtime_ns, sha256_file(out)) == before
    with pytest.raises(OutputExistsError, match="another checkpoint.*--force"):
        convert_to_detectron2(second, out, verify=False)
    assert sha256_file(out) == before[1]
    convert_to_detectron2(second, out, verify=False, force=True)
    assert load_detectron2_pickle(out)["masked_ssl"]["source_sha256"] == sha256_file(second)


def test_export_torchvision_loads_into_torchvision(layout_factory, tmp_path):
    path, trunk = layout_factory("simclr")
    info = export_torchvision(path, tmp_path / "tv.pth")
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    model = build_resnet("resnet18")
    model.fc = torch.nn.Linear(512, 10)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(model.layer3[0].downsample[1].running_var, trunk["layer3.0.downsample.1.running_var"])
    assert info["tensors"] == len(trunk)
    with pytest.raises(OutputExistsError):
        export_torchvision(path, tmp_path / "tv.pth")


# -------------------------------------------------------------------------------------------- CLI


def test_cli_help_and_bad_arguments():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "transfer.convert", "--help"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0
    for word in ("--format", "--prefix", "--report", "--no-verify", "--export-torchvision", "--force", "moco",
                 "lightning", "detectron2", "exit status"):
        assert word in result.stdout
    with pytest.raises(SystemExit) as info:
        main(["only_one_argument"])
    assert info.value.code == 2


def test_cli_success_and_refusal(layout_factory, tmp_path, capsys):
    path, _ = layout_factory("moco")
    assert main([str(path), str(tmp_path / "m.pkl"), "--format", "moco", "--report", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "FPN: backbone: 100/100 loaded" in out and "format moco" in out and "MoCo negative-sample queue" in out
    assert json.loads((tmp_path / "m.json").read_text())["input"]["prefix"] == "module.encoder_q."
    assert main([str(path), str(tmp_path / "n.pkl"), "--prefix", "nothing.here."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing.here." in err and "encoder_q" in err
    assert not (tmp_path / "n.pkl").exists()


def test_malicious_pickle_input_to_cli_runs_nothing(tmp_path, capsys):
    flag = tmp_path / "flag"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(flag),)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in random_trunk().items()}, "x": Payload()}))
    assert main([str(evil), str(tmp_path / "out.pkl")]) == 1
    assert "could run code" in capsys.readouterr().err
    assert not flag.exists() and not (tmp_path / "out.pkl").exists()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_converted_detectron2_resnet_computes_the_same_features(tmp_path, arch):
    """The strongest check of the name mapping: detectron2's ResNet (STRIDE_IN_1X1 False) with the
    converted weights gives torchvision's layer1..layer4 outputs for the same input."""
    import_detectron2()
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from transfer.verify import detectron2_config

    trunk = random_trunk(arch, seed=2)
    source = tmp_path / "tv.pth"
    torch.save(trunk, source)
    convert_to_detectron2(source, tmp_path / "tv.pkl", verify=False)
    weights = load_detectron2_pickle(tmp_path / "tv.pkl")["model"]

    cfg = detectron2_config(arch, "FPN")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    d2_resnet = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    result = d2_resnet.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)

    tv_resnet = build_resnet(arch).eval()
    tv_resnet.load_state_dict(trunk)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = d2_resnet(x)
        y = tv_resnet.maxpool(tv_resnet.relu(tv_resnet.bn1(tv_resnet.conv1(x))))
        for stage in range(1, 5):
            y = getattr(tv_resnet, f"layer{stage}")(y)
            torch.testing.assert_close(features[f"res{stage + 1}"], y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("problem", ["input_itself", "directory", "parent_is_a_file"])
def test_bad_output_path_is_refused_before_any_work_and_the_input_survives(layout_factory, tmp_path, problem):
    source, _ = layout_factory("detectron2_pkl")  # a .pkl input, so --force over it is a plausible slip
    if problem == "input_itself":
        output, expected = source, "is the input checkpoint itself"
    elif problem == "directory":
        output, expected = tmp_path / "out.pkl", "is a directory"
        output.mkdir()
    else:
        (tmp_path / "afile").write_text("x")
        output, expected = tmp_path / "afile" / "sub" / "out.pkl", "is a file, not a folder"
    before = sha256_file(source)
    with pytest.raises(CheckpointError, match=expected):
        convert_to_detectron2(source, output, force=True, verify=False)
    assert sha256_file(source) == before


def test_export_torchvision_over_its_own_input_is_refused(layout_factory, tmp_path):
    source, _ = layout_factory("torchvision")
    before = sha256_file(source)
    with pytest.raises(CheckpointError, match="input checkpoint itself"):
        export_torchvision(source, source, force=True)
    assert sha256_file(source) == before


def test_cli_bad_output_and_missing_input_each_give_one_error(layout_factory, tmp_path, capsys):
    source, _ = layout_factory("torchvision")
    (tmp_path / "out.pkl").mkdir()
    assert main([str(source), str(tmp_path / "out.pkl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a directory" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pkl")]) == 1
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "cannot write" not in err
    assert not (tmp_path / "x.pkl").exists()
