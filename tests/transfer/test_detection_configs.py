"""The detection configs: the MoCo protocol numbers of SPEC section 3, the toy configs' shared structure,
the registered ROI head, and fitting a protocol to fewer devices."""

from __future__ import annotations

import pytest
import torch

from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2.modeling import ROI_HEADS_REGISTRY, build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from transfer.d2_modeling import Res5ROIHeadsExtraNorm  # noqa: E402
from transfer.d2_training import AccumulatingTrainer, adapt_to_world_size, use_plain_bn_on_one_device  # noqa: E402
from transfer.detection import CONFIG_ALIASES, CONFIG_DIR, DetectionSetupError, _base_config, resolve_config  # noqa: E402

TORCHVISION_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_STD = [58.395, 57.12, 57.375]


def load(task: str, alias: str):
    cfg = _base_config()
    cfg.merge_from_file(str(resolve_config(task, alias)))
    return cfg


def assert_common_protocol(cfg):
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx(TORCHVISION_MEAN)
    assert cfg.MODEL.PIXEL_STD == pytest.approx(TORCHVISION_STD)
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_voc_protocol_has_the_spec_numbers():
    cfg = load("voc", "paper")
    assert_common_protocol(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and not cfg.MODEL.MASK_ON
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
    assert cfg.SOLVER.MAX_ITER == 24000 and tuple(cfg.SOLVER.STEPS) == (18000, 22000)
    assert cfg.SOLVER.WARMUP_ITERS == 100
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == pytest.approx(0.02)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8


@pytest.mark.parametrize("alias, max_iter, steps", [("1x", 90000, (60000, 80000)), ("2x", 180000, (120000, 160000))])
def test_coco_protocols_have_the_spec_numbers(alias, max_iter, steps):
    cfg = load("coco", alias)
    assert_common_protocol(cfg)
    assert cfg.MODEL.MASK_ON and cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    assert cfg.SOLVER.MAX_ITER == max_iter and tuple(cfg.SOLVER.STEPS) == steps
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == pytest.approx(0.02)


@pytest.mark.parametrize("task, alias", [(t, a) for t in ("voc", "coco") for a in ("toy", "micro")])
def test_toy_configs_share_the_protocol_structure(task, alias):
    cfg = load(task, alias)
    assert_common_protocol(cfg)
    assert cfg.MODEL.MASK_ON == (task == "coco")
    paper = load(task, "paper")
    assert tuple(cfg.DATASETS.TRAIN) == tuple(paper.DATASETS.TRAIN)
    assert tuple(cfg.DATASETS.TEST) == tuple(paper.DATASETS.TEST)
    assert max(cfg.INPUT.MIN_SIZE_TRAIN) <= 128 and cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE <= 128
    assert cfg.SOLVER.MAX_ITER <= 1000


def test_every_alias_resolves_and_unknown_configs_are_refused():
    for task, table in CONFIG_ALIASES.items():
        for alias, stem in table.items():
            assert resolve_config(task, alias) == (CONFIG_DIR / f"{stem}.yaml").resolve()
    with pytest.raises(DetectionSetupError, match="not found"):
        resolve_config("voc", "no_such_config")


def test_extra_norm_roi_head_is_registered_and_normalizes_res5():
    assert ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm") is Res5ROIHeadsExtraNorm
    cfg = load("voc", "paper")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    norm = model.roi_heads.res5.norm
    assert isinstance(norm, torch.nn.BatchNorm2d) and norm.num_features == 2048
    assert list(model.roi_heads.res5._modules)[-1] == "norm"  # after the three res5 blocks


def test_fewer_devices_accumulate_gradients_and_keep_the_schedule():
    cfg = load("voc", "paper")
    done = adapt_to_world_size(cfg, 1, "accumulate")
    assert done["policy"] == "accumulate" and done["accumulation_steps"] == 8 and done["images_per_device"] == 2
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == pytest.approx(0.02)
    assert cfg.SOLVER.MAX_ITER == 24000 and cfg.SOLVER.REFERENCE_WORLD_SIZE == 1
    cfg = load("voc", "paper")
    assert adapt_to_world_size(cfg, 4)["accumulation_steps"] == 2
    with pytest.raises(ValueError, match="cannot be split evenly"):
        adapt_to_world_size(load("voc", "paper"), 3)


def test_fewer_devices_linear_scaling_scales_lr_and_schedule():
    cfg = load("voc", "paper")
    done = adapt_to_world_size(cfg, 1, "linear-scaling")
    assert done["policy"] == "linear-scaling"
    assert cfg.SOLVER.IMS_PER_BATCH == 2 and cfg.SOLVER.BASE_LR == pytest.approx(0.0025)
    assert cfg.SOLVER.MAX_ITER == 192000 and tuple(cfg.SOLVER.STEPS) == (144000, 176000)
    assert cfg.SOLVER.WARMUP_ITERS == 800


def test_single_device_uses_plain_bn():
    cfg = load("coco", "toy")
    assert use_plain_bn_on_one_device(cfg, 1) == {"MODEL.RESNETS.NORM": "naiveSyncBN -> BN"}
    assert cfg.MODEL.RESNETS.NORM == "BN"
    cfg = load("coco", "toy")
    assert use_plain_bn_on_one_device(cfg, 8) == {} and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"


class _LinearLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, batch):
        x = torch.stack(batch)
        return {"loss": ((x @ self.weight) ** 2).mean()}


def _one_step(steps: int, batches):
    model = _LinearLoss()
    trainer = AccumulatingTrainer(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.1), steps)
    with EventStorage(0):
        trainer.run_step()
    return model.weight.detach().clone()


def test_accumulated_micro_batches_step_like_one_large_batch():
    samples = [torch.tensor(v) for v in ([1.0, 2.0], [0.5, -1.0], [3.0, 1.0], [-2.0, 0.5])]
    whole = _one_step(1, [samples])
    accumulated = _one_step(2, [samples[:2], samples[2:]])
    assert torch.allclose(whole, accumulated, atol=1e-6)
    assert not torch.allclose(whole, _one_step(1, [samples[:2]]))


def test_r50_weights_fill_the_c4_protocol_model_except_the_new_norm(tmp_path, random_checkpoint_factory):
    from transfer.convert import convert_to_detectron2
    from transfer.verify import load_and_check

    pkl = tmp_path / "r50.pkl"
    convert_to_detectron2(random_checkpoint_factory("resnet50"), pkl, verify=False)
    cfg = load("coco", "paper")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    fresh_norm = model.roi_heads.res5.norm.weight.detach().clone()
    result = load_and_check(model, pkl)
    assert result["passed"] and result["summary"] == "backbone: 265/265 loaded"
    assert torch.equal(model.roi_heads.res5.norm.weight, fresh_norm)  # new layer: trained, not converted
