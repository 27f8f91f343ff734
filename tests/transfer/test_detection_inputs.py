"""What a detection run takes in, checked before anything trains: the data layout (a wrong or broken
root fails fast, naming the path), the checkpoint's input filter (applied in the model's preprocessing
exactly when the checkpoint asks for it) and the checkpoint's architecture."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from pretrain.filters import highpass
from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from transfer.d2_datasets import DatasetLayoutError, check_layout, register_datasets  # noqa: E402
from transfer.d2_modeling import GeneralizedRCNNWithInputFilter  # noqa: E402
from transfer.d2_run import _config  # noqa: E402
from transfer.detection import DetectionSetupError, main, plan_detection  # noqa: E402

VOC_NAMES = ("voc_2007_trainval", "voc_2012_trainval", "voc_2007_test")


def copy_voc(toy_world: Path, root: Path) -> Path:
    shutil.copytree(toy_world / "VOCdevkit", root / "VOCdevkit")
    return root


def test_wrong_data_root_fails_fast_naming_the_missing_path(tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory()
    start = time.monotonic()
    with pytest.raises(DatasetLayoutError) as err:
        plan_detection("voc", weights, data_root=tmp_path, config="micro", out=tmp_path / "run")
    assert time.monotonic() - start < 10
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in str(err.value) and "--data-root" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing converted or written
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        check_layout(VOC_NAMES, tmp_path / "nowhere")


def test_cli_reports_a_bad_root_in_one_line(tmp_path, random_checkpoint_factory, capsys):
    code = main(["--task", "coco", "--weights", str(random_checkpoint_factory()), "--config", "micro",
                 "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and "\n" not in message and str(tmp_path / "coco") in message


@pytest.mark.parametrize("overrides, shown", [
    (["SOLVER.MAX_ITER", "50"], "SOLVER.STEPS (50,)"),  # micro's step now falls on the last iteration
    (["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "(1,)"], "SOLVER.MAX_ITER 1"),
    (["SOLVER.STEPS", "(50, 40)"], "SOLVER.STEPS (50, 40)"),
])
def test_an_impossible_schedule_is_one_error_before_anything_runs(toy_world, tmp_path, random_checkpoint_factory,
                                                                  capsys, overrides, shown):
    code = main(["--task", "voc", "--weights", str(random_checkpoint_factory()), "--config", "micro",
                 "--data-root", str(toy_world), "--out", str(tmp_path / "run"), *overrides])
    message = capsys.readouterr().err.strip()
    assert code == 1 and message.startswith("error:") and "\n" not in message and "Traceback" not in message
    assert shown in message and "SOLVER.STEPS as well" in message
    assert not (tmp_path / "run").exists()  # no conversion, no failed record


def test_a_listed_image_without_annotation_is_named(toy_world, tmp_path):
    root = copy_voc(toy_world, tmp_path)
    listing = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "trainval.txt"
    victim = listing.read_text().split()[3]
    (root / "VOCdevkit" / "VOC2012" / "Annotations" / f"{victim}.xml").unlink()
    with pytest.raises(DatasetLayoutError, match=f"Annotations/{victim}.xml is missing"):
        check_layout(VOC_NAMES, root)


def test_coco_layout_problems_are_named(toy_world, tmp_path):
    shutil.copytree(toy_world / "coco", tmp_path / "coco")
    annotations = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    annotations.write_text("{not json")
    with pytest.raises(DatasetLayoutError, match="instances_val2017.json is not valid JSON"):
        check_layout(("coco_2017_train", "coco_2017_val"), tmp_path)
    annotations.unlink()
    with pytest.raises(DatasetLayoutError, match="instances_val2017.json is missing"):
        check_layout(("coco_2017_train", "coco_2017_val"), tmp_path)


def test_coco_image_missing_from_disk_is_named_when_loading(toy_world, tmp_path):
    shutil.copytree(toy_world / "coco", tmp_path / "coco")
    victim = sorted((tmp_path / "coco" / "val2017").iterdir())[0]
    victim.unlink()
    info = check_layout(("coco_2017_val",), tmp_path)
    register_datasets(info)
    with pytest.raises(DatasetLayoutError, match=f"{victim.name}.*is missing"):
        DatasetCatalog.get("coco_2017_val")


def test_toy_voc_classes_come_from_classes_txt(toy_world):
    info = check_layout(VOC_NAMES, toy_world)
    expected = (toy_world / "VOCdevkit" / "classes.txt").read_text().split()
    assert info.thing_classes == expected and info.num_classes == 8
    register_datasets(info)
    assert MetadataCatalog.get("voc_2007_test").thing_classes == expected
    assert MetadataCatalog.get("voc_2007_test").dirname == str(toy_world / "VOCdevkit" / "VOC2007")
    dicts = DatasetCatalog.get("voc_2012_trainval")
    assert dicts and all(0 <= a["category_id"] < 8 for d in dicts for a in d["annotations"])


def _preprocessed(plan) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    cfg = _config(plan)
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    image = torch.rand(3, 64, 80) * 255
    with torch.no_grad():
        out = model.preprocess_image([{"image": image}]).tensor[0, :, :64, :80]
    normalized = (image - torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    return model, out, normalized


def test_highpass_filter_is_applied_when_the_checkpoint_asks(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory(input_filter={"name": "highpass", "kernel_size": 11, "sigma": 5.0})
    plan, _ = plan_detection("voc", weights, data_root=toy_world, config="micro", out=tmp_path / "hp")
    assert plan.model["input_filter"]["name"] == "highpass"
    model, out, normalized = _preprocessed(plan)
    assert isinstance(model, GeneralizedRCNNWithInputFilter)
    expected = highpass(normalized.unsqueeze(0), 11, 5.0)[0]
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, normalized, atol=1e-2)
    assert plan.record_config["detectron2"]["MODEL"]["INPUT_FILTER"]["NAME"] == "highpass"


def test_no_filter_when_the_checkpoint_has_none(toy_world, tmp_path, random_checkpoint_factory):
    plan, _ = plan_detection("voc", random_checkpoint_factory(), data_root=toy_world, config="micro",
                             out=tmp_path / "plain")
    model, out, normalized = _preprocessed(plan)
    assert type(model).__name__ == "GeneralizedRCNN"
    assert torch.allclose(out, normalized, atol=1e-5)


def test_checkpoint_decides_depth_and_basic_blocks_refuse_c4(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory("resnet34")
    plan, _ = plan_detection("voc", weights, data_root=toy_world, config="micro", out=tmp_path / "r34")
    assert plan.record_config["detectron2"]["MODEL"]["RESNETS"]["DEPTH"] == 34
    assert plan.record_config["detectron2"]["MODEL"]["RESNETS"]["RES2_OUT_CHANNELS"] == 64
    with pytest.raises(DetectionSetupError, match="FPN config"):
        plan_detection("voc", weights, data_root=toy_world, config="paper", out=tmp_path / "r34")


def test_an_already_converted_pkl_is_used_as_is(toy_world, tmp_path, random_checkpoint_factory):
    from pretrain.fileio import sha256_file
    from transfer.convert import convert_to_detectron2

    weights = random_checkpoint_factory(input_filter="highpass")
    pkl = tmp_path / "converted.pkl"
    convert_to_detectron2(weights, pkl)
    plan, _ = plan_detection("coco", pkl, data_root=toy_world, config="micro", out=tmp_path / "run")
    assert plan.weights_pkl == str(pkl.resolve()) and plan.conversion["status"] == "already converted"
    assert plan.weights_sha256 == sha256_file(weights)  # the checkpoint the .pkl was made from
    assert plan.model["input_filter"]["name"] == "highpass" and plan.model["base"] == "random"
    assert not (tmp_path / "run" / "weights").exists()
