"""Proof that the real detectron2 pieces run on this platform, on the toy world.

detectron2's own dataset registration (``register_pascal_voc`` / ``register_coco_instances``), a tiny
Faster R-CNN and Mask R-CNN trained a few iterations on the CPU, and detectron2's own evaluators.
The suite's detection runner (``transfer.detection``) builds on exactly these pieces.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data.datasets import register_coco_instances, register_pascal_voc  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, inference_on_dataset  # noqa: E402


def _tiny_cfg(base: str, train: str, test: str, num_classes: int, out: Path, mask: bool):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = mask
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an almost untrained model still predicts something
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (test,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(out)
    return cfg


def _train_and_evaluate(cfg, evaluator) -> dict:
    torch.manual_seed(0)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    return inference_on_dataset(trainer.model, loader, evaluator)


def _assert_percentages(values: dict):
    assert values
    for name, value in values.items():
        assert math.isfinite(value) and 0.0 <= value <= 100.0, (name, value)


@pytest.mark.slow
def test_faster_rcnn_trains_and_evaluates_on_toy_voc(toy_world: Path, tmp_path: Path):
    classes = (toy_world / "VOCdevkit" / "classes.txt").read_text().split()
    for split in ("trainval", "test"):
        name = f"smoke_voc_2007_{split}"
        if name not in DatasetCatalog.list():
            register_pascal_voc(name, str(toy_world / "VOCdevkit" / "VOC2007"), split, 2007, classes)
    dicts = DatasetCatalog.get("smoke_voc_2007_trainval")
    assert dicts and all(anno["category_id"] < len(classes) for d in dicts for anno in d["annotations"])
    cfg = _tiny_cfg("PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml", "smoke_voc_2007_trainval",
                    "smoke_voc_2007_test", len(classes), tmp_path, mask=False)
    results = _train_and_evaluate(cfg, PascalVOCDetectionEvaluator("smoke_voc_2007_test"))
    assert set(results["bbox"]) == {"AP", "AP50", "AP75"}
    _assert_percentages(results["bbox"])


@pytest.mark.slow
def test_mask_rcnn_trains_and_evaluates_on_toy_coco(toy_world: Path, tmp_path: Path):
    coco = toy_world / "coco"
    for split in ("train2017", "val2017"):
        name = f"smoke_coco_{split}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(coco / "annotations" / f"instances_{split}.json"), str(coco / split))
    DatasetCatalog.get("smoke_coco_train2017")
    classes = MetadataCatalog.get("smoke_coco_train2017").thing_classes
    assert len(classes) == 8
    cfg = _tiny_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "smoke_coco_train2017",
                    "smoke_coco_val2017", len(classes), tmp_path, mask=True)
    evaluator = COCOEvaluator("smoke_coco_val2017", output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    results = _train_and_evaluate(cfg, evaluator)
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results[task])
        # pycocotools reports NaN for area ranges without ground truth; the main metrics must be finite.
        _assert_percentages({k: results[task][k] for k in ("AP", "AP50", "AP75")})
