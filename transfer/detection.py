"""``python -m transfer.detection``: detection / instance-segmentation transfer on detectron2.

    python -m transfer.detection --task voc  --weights final.pth [--config toy] [--seed 0] [--out DIR]
    python -m transfer.detection --task coco --weights moco.pkl --num-gpus 8 SOLVER.MAX_ITER 1000

``--weights`` takes any checkpoint :mod:`transfer.convert` reads (it is converted and verified on the
way; the ``.pkl`` lands in ``OUT/weights/``) or a ``.pkl`` that converter already wrote. The backbone's
depth, pixel mean/std and input filter (e.g. high-pass) come from the checkpoint; the number of classes
from the data; everything else from the config (``configs/detection/``; ``--config`` takes a path, a
file stem, or ``paper`` | ``1x`` | ``2x`` | ``toy`` | ``micro``) and the trailing ``KEY VALUE``
detectron2 overrides.

Each run writes one JSON record (:mod:`transfer.records`; metrics straight from detectron2's evaluator)
and skips when a valid record for the same weights and config exists (``--force`` recomputes). A run
killed mid-training continues with ``--resume`` and ends at the same final iteration. Several devices:
``--num-gpus N [--num-machines M --machine-rank R --dist-url URL]`` (detectron2's ``launch``); fewer
devices than the protocol's ``SOLVER.REFERENCE_WORLD_SIZE`` keep its total batch by gradient
accumulation (``--batch-policy accumulate``, default) or scale lr and schedule linearly
(``linear-scaling``). The worker side lives in :mod:`transfer.d2_run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import CheckpointError
from pretrain.fileio import sha256_file, sha256_json
from pretrain.provenance import utc_now
from pretrain.stop_request import Terminated, exception_for
from transfer.records import RecordError, model_from_meta, read_record, record_filename

__all__ = ["run_detection", "plan_detection", "DetectionPlan", "DetectionSetupError", "resolve_config",
           "CONFIG_DIR", "CONFIG_ALIASES", "TASK_NAMES", "main"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "detection"
TASK_NAMES = {"voc": "voc_detection", "coco": "coco_instance"}
EVALUATOR_TYPES = {"voc": "pascal_voc", "coco": "coco"}
CONFIG_ALIASES = {
    "voc": {"paper": "voc07+12_faster_rcnn_C4_24k", "toy": "toy_voc_faster_rcnn_FPN",
            "micro": "micro_voc_faster_rcnn_FPN"},
    "coco": {"paper": "coco_mask_rcnn_C4_1x", "1x": "coco_mask_rcnn_C4_1x", "2x": "coco_mask_rcnn_C4_2x",
             "toy": "toy_coco_mask_rcnn_FPN", "micro": "micro_coco_mask_rcnn_FPN"},
}
# Overrides of these keys change how a run executes, not what it measures: they keep the protocol name.
EXECUTION_KEYS = ("MODEL.DEVICE", "DATALOADER.NUM_WORKERS", "OUTPUT_DIR", "VIS_PERIOD", "CUDNN_BENCHMARK",
                  "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "SEED")
KEEP_CHECKPOINTS = ("final", "all", "none")
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
C4_HEADS = ("Res5ROIHeads", "Res5ROIHeadsExtraNorm")


class DetectionSetupError(ValueError):
    """The run cannot start as asked (bad option, conflicting run directory); the message says why."""


@dataclass
class DetectionPlan:
    """Everything a detection run needs, resolved before any process starts (picklable for ``launch``)."""

    task: str
    record_task: str
    protocol: str
    config_file: str
    overrides: list[str]
    cfg_yaml: str
    record_config: dict[str, Any]
    out: str
    record_path: str
    seed: int
    model: dict[str, Any]
    weights_path: str
    weights_sha256: str
    weights_pkl: str
    conversion: dict[str, Any]
    datasets: dict[str, Any]
    adaptation: dict[str, Any]
    norm_changes: dict[str, str]
    preset: str = "custom"
    mode: str = "train"  # "train" | "resume" | "evaluate"
    eval_source: str = ""  # checkpoint --eval-only evaluates
    keep_checkpoints: str = "final"
    progress: bool | None = None
    verbose: bool = False
    world_size: int = 1
    started: str = field(default_factory=utc_now)
    started_wall: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)


def resolve_config(task: str, config: str | os.PathLike | None) -> Path:
    """A config path from a path, a file stem in ``configs/detection/`` or an alias (``paper``, ``toy`` ...)."""
    name = str(config) if config is not None else "paper"
    name = CONFIG_ALIASES[task].get(name, name)
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("Base")))
    raise DetectionSetupError(f"config '{config}' not found (tried {', '.join(map(str, candidates))}); aliases for "
                              f"--task {task}: {', '.join(CONFIG_ALIASES[task])}; files: {known}")


def protocol_name(config_file: Path, overrides: Sequence[str]) -> str:
    """The config's stem, plus a short hash when overrides change what is measured (so records from a
    changed schedule never mix with the config's own in the tables)."""
    pairs = list(zip(overrides[::2], overrides[1::2]))
    measured = [(k, v) for k, v in pairs if k not in EXECUTION_KEYS]
    if not measured:
        return config_file.stem
    return f"{config_file.stem}+{sha256_json([list(p) for p in measured])[:8]}"


def _weights_meta(weights: Path) -> dict[str, Any]:
    from transfer.checkpoints import load_backbone
    from transfer.convert import conversion_provenance

    if weights.suffix == ".pkl":
        provenance = conversion_provenance(weights)
        if provenance.get("meta"):
            return dict(provenance["meta"])
    return dict(load_backbone(weights).meta)


def prepare_weights(weights: Path, out: Path, sha256: str) -> dict[str, Any]:
    """Converted + verified detectron2 weights for ``weights`` (kept as is if our converter wrote it)."""
    from transfer.convert import conversion_provenance, convert_to_detectron2

    if weights.suffix == ".pkl":
        provenance = conversion_provenance(weights)
        if provenance.get("meta"):
            return {"pkl": str(weights.resolve()), "meta": dict(provenance["meta"]), "arch": provenance["arch"],
                    "preprocessing": provenance["preprocessing"],
                    "summary": {"status": "already converted", "source_sha256": provenance.get("source_sha256"),
                                "source_path": provenance.get("source_path"),
                                "source_format": provenance.get("source_format"), "prefix": provenance.get("prefix"),
                                "code_version": provenance.get("code_version")}}
    # Named by content, so a run directory never holds two different inputs under one name.
    target = out / "weights" / f"{weights.stem}-{sha256[:12]}.pkl"
    report = convert_to_detectron2(weights, target, verify=True)
    summary = {
        "status": report["status"], "source_format": report["input"]["format"], "prefix": report["input"]["key_prefix"],
        "counts": {k: report["counts"][k] for k in ("source_tensors", "mapped", "dropped", "trunk_parameters",
                                                    "trunk_bn_buffers", "dropped_by_reason")},
        "verification": {layout: r["summary"] for layout, r in report["verification"].get("models", {}).items()},
        "report": report["output"]["report"], "pkl_sha256": report["output"]["sha256"],
        "notes": report["choice"]["notes"],
    }
    return {"pkl": str(target.resolve()), "meta": dict(report["meta"]), "arch": report["architecture"]["arch"],
            "preprocessing": report["preprocessing"], "summary": summary}


def _base_config():
    from transfer.d2_modeling import add_input_filter_config
    from transfer.d2_training import add_training_config
    from transfer.d2compat import import_detectron2

    import_detectron2()
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_input_filter_config(cfg)
    add_training_config(cfg)
    return cfg


def _merge_overrides(cfg, overrides: Sequence[str]) -> None:
    options = [o for o in overrides[::2] if str(o).startswith("--")]
    if options:
        raise DetectionSetupError(f"{options[0]} came after the KEY VALUE overrides; put options first, e.g. "
                                  "--task voc --weights W --seed 1 SOLVER.MAX_ITER 100")
    if len(overrides) % 2:
        raise DetectionSetupError(f"detectron2 overrides come in KEY VALUE pairs; got an odd list {list(overrides)}")
    try:
        cfg.merge_from_list(list(overrides))
    except (KeyError, AssertionError, ValueError) as err:
        raise DetectionSetupError(f"bad detectron2 override in {list(overrides)}: {err}") from err


def _configure(cfg, config_file: Path, overrides: Sequence[str], weights: dict[str, Any], out: Path, seed: int):
    from transfer.d2_modeling import apply_input_filter

    cfg.merge_from_file(str(config_file))
    arch = weights["arch"]
    depth = DEPTHS[arch]
    if cfg.MODEL.ROI_HEADS.NAME in C4_HEADS and depth < 50:
        raise DetectionSetupError(
            f"{config_file.name} is a C4 config, whose res5 ROI head detectron2 builds from Bottleneck blocks; a "
            f"{arch} (BasicBlock) cannot fill it. Use an FPN config (--config toy or micro) or a ResNet-50/101.")
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    prep = weights["preprocessing"]
    cfg.MODEL.PIXEL_MEAN = [float(v) for v in prep["pixel_mean"]]
    cfg.MODEL.PIXEL_STD = [float(v) for v in prep["pixel_std"]]
    cfg.INPUT.FORMAT = prep.get("input_format", "RGB")
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = bool(prep.get("stride_in_1x1", False))
    apply_input_filter(cfg, prep.get("input_filter") or weights["meta"].get("input_filter"))
    cfg.MODEL.WEIGHTS = weights["pkl"]
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.OUTPUT_DIR = str(out.resolve())
    cfg.SEED = int(seed)
    _merge_overrides(cfg, overrides)


def _check_task(task: str, cfg, config_file: Path) -> None:
    from transfer.d2_datasets import COCO_DATASETS, VOC_DATASETS

    family = VOC_DATASETS if task == "voc" else COCO_DATASETS
    foreign = [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n not in family]
    if foreign or len(cfg.DATASETS.TEST) != 1:
        raise DetectionSetupError(f"--task {task} trains and evaluates on {'VOC' if task == 'voc' else 'COCO'} "
                                  f"datasets with one test set; {config_file.name} uses TRAIN={tuple(cfg.DATASETS.TRAIN)} "
                                  f"TEST={tuple(cfg.DATASETS.TEST)}. Pick the config for --task {task}.")
    if task == "coco" and not cfg.MODEL.MASK_ON:
        raise DetectionSetupError(f"--task coco reports bbox and segm AP; {config_file.name} has MODEL.MASK_ON False")


def _check_schedule(cfg) -> None:
    """Build the run's learning-rate schedule once here, so that an impossible one (a step at or after
    ``SOLVER.MAX_ITER``, steps out of order, no iterations) is one clear error instead of a traceback
    from inside the trainer after the weights were converted."""
    from detectron2.solver import build_lr_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(cfg.SOLVER.BASE_LR))
    logger = logging.getLogger("detectron2.solver.build")  # its "steps beyond MAX_ITER" warning: the trainer's to say
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        build_lr_scheduler(cfg, optimizer)
    except (ValueError, ZeroDivisionError) as err:
        raise DetectionSetupError(
            f"the learning-rate schedule cannot run: SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}, SOLVER.STEPS "
            f"{tuple(cfg.SOLVER.STEPS)} ({err}). Steps must increase and stay below SOLVER.MAX_ITER; when you "
            "shorten SOLVER.MAX_ITER, set SOLVER.STEPS as well, e.g. SOLVER.MAX_ITER 100 SOLVER.STEPS '(80,)'"
        ) from err
    finally:
        logger.setLevel(level)


def _dataset_names(task: str, config_file: Path, overrides: Sequence[str]) -> tuple[str, ...]:
    cfg = _base_config()
    try:
        cfg.merge_from_file(str(config_file))
    except (KeyError, AssertionError) as err:
        raise DetectionSetupError(f"{config_file} is not a detectron2 config this suite can read: {err}") from err
    _merge_overrides(cfg, overrides)
    _check_task(task, cfg, config_file)
    _check_schedule(cfg)  # cheap: before any conversion
    return tuple(dict.fromkeys((*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)))


def _run_state(out: Path, config_hash: str, sha: str, resume: bool, force: bool) -> str:
    """"train" or "resume" for a run directory, or an error when it holds another or an unfinished run."""
    from transfer.d2_run import clear_run_dir, read_run_state

    tag = out / "last_checkpoint"
    if force:
        clear_run_dir(out)
        return "train"
    if not tag.exists():
        return "train"
    state = read_run_state(out)
    if state is None or state.get("config_hash") != config_hash or state.get("weights_sha256") != sha:
        raise DetectionSetupError(f"{out} holds a run with other weights or another config (last checkpoint "
                                  f"{tag.read_text().strip()}); use another --out, or --force to start over there")
    if not resume:
        raise DetectionSetupError(f"{out} holds an unfinished run (last checkpoint {tag.read_text().strip()}); pass "
                                  "--resume to continue it, or --force to start over")
    return "resume"


def _evaluation_source(out: Path, weights: Path) -> str:
    """What --eval-only evaluates: the run directory's last checkpoint, else --weights if it is a whole
    detectron2 detector (a backbone alone has untrained heads: nothing to evaluate)."""
    from pretrain.checkpoint import safe_torch_load

    tag = out / "last_checkpoint"
    if tag.exists() and (out / tag.read_text().strip()).is_file():
        return str(out / tag.read_text().strip())
    if weights.suffix != ".pkl":
        state = safe_torch_load(weights)
        keys = state.get("model", state) if isinstance(state, dict) else {}
        if any(str(k).startswith("roi_heads.") for k in keys):
            return str(weights.resolve())
    raise DetectionSetupError(f"--eval-only: {out} has no trained checkpoint and {weights} is not a complete detectron2 "
                              "detector; train first (drop --eval-only)")


def plan_detection(task: str, weights: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                   seed: int = 0, out: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                   overrides: Sequence[str] = (), name: str | None = None, preset: str = "custom",
                   record: str | os.PathLike | None = None, force: bool = False, resume: bool = False,
                   eval_only: bool = False, num_gpus: int = 1, num_machines: int = 1,
                   batch_policy: str = "accumulate", keep_checkpoints: str = "final",
                   progress: bool | None = None, verbose: bool = False) -> tuple[DetectionPlan, dict | None]:
    """Resolve a run (see :func:`run_detection`); returns (plan, existing valid record or None)."""
    from transfer.d2_datasets import check_layout
    from transfer.d2_training import adapt_to_world_size, use_plain_bn_on_one_device

    if task not in TASK_NAMES:
        raise DetectionSetupError(f"unknown task '{task}'; choose one of {', '.join(TASK_NAMES)}")
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise DetectionSetupError(f"keep_checkpoints must be one of {KEEP_CHECKPOINTS}, got {keep_checkpoints!r}")
    world_size = int(num_gpus) * int(num_machines)
    if world_size < 1:
        raise DetectionSetupError("--num-gpus and --num-machines must be at least 1")
    if int(num_gpus) > 1 and torch.cuda.device_count() < int(num_gpus):
        raise DetectionSetupError(f"--num-gpus {num_gpus} needs {num_gpus} CUDA devices; this machine has "
                                  f"{torch.cuda.device_count()}. Without GPUs run one process (--num-gpus 1).")
    weights = Path(weights)
    if not weights.is_file():
        raise CheckpointError(f"--weights {weights} does not exist (or is not a file)")
    config_file = resolve_config(task, config)
    overrides = [str(o) for o in overrides]
    protocol = protocol_name(config_file, overrides)
    info = check_layout(_dataset_names(task, config_file, overrides), data_root)  # cheap: before any conversion
    file_sha = sha256_file(weights)
    if out is None:
        name = name or model_from_meta(_weights_meta(weights))["name"]
        out = Path("runs") / "detection" / protocol / name / f"seed{seed}"
    out = Path(out)
    prepared = prepare_weights(weights, out, file_sha)
    name = name or model_from_meta(prepared["meta"])["name"]
    # The checkpoint's hash, also when it comes as a .pkl our converter made from it (same weights).
    sha = prepared["summary"].get("source_sha256") or file_sha
    record_path = Path(record) if record else out / record_filename(TASK_NAMES[task], name, seed)
    cfg = _base_config()
    _configure(cfg, config_file, overrides, prepared, out, seed)
    if "MODEL.ROI_HEADS.NUM_CLASSES" in overrides[::2] and cfg.MODEL.ROI_HEADS.NUM_CLASSES != info.num_classes:
        raise DetectionSetupError(f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES} disagrees with the "
                                  f"{info.num_classes} classes of the data ({info.thing_classes}); drop the override")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = info.num_classes
    try:
        adaptation = adapt_to_world_size(cfg, world_size, batch_policy)
    except ValueError as err:
        raise DetectionSetupError(str(err)) from err
    _check_schedule(cfg)
    norm_changes = use_plain_bn_on_one_device(cfg, world_size)

    import yaml

    cfg_yaml = cfg.dump()
    record_config = {"detectron2": yaml.safe_load(cfg_yaml), "config_file": config_file.name,
                     "overrides": overrides, "data_root": str(info.root.resolve()), "batch_policy": batch_policy,
                     "world_size": world_size}
    model = model_from_meta(prepared["meta"], name)
    plan = DetectionPlan(
        task=task, record_task=TASK_NAMES[task], protocol=protocol, config_file=str(config_file),
        overrides=overrides, cfg_yaml=cfg_yaml, record_config=record_config, out=str(out.resolve()),
        record_path=str(record_path), seed=int(seed), model=model, weights_path=str(weights.resolve()),
        weights_sha256=sha, weights_pkl=prepared["pkl"], conversion=prepared["summary"],
        datasets=info.summary(), adaptation=adaptation, norm_changes=norm_changes, preset=preset,
        keep_checkpoints=keep_checkpoints, progress=progress, verbose=verbose, world_size=world_size,
    )
    if sha != file_sha:
        plan.notes.append(f"weights given as a converted .pkl (sha256 {file_sha}); the record names its source")
    if prepared["meta"].get("finished") is False:
        plan.notes.append("the checkpoint's metadata says its pretraining had not finished")
    existing = _existing_record(record_path, sha, record_config, force)
    if existing is not None:
        return plan, existing
    if eval_only:
        plan.mode, plan.eval_source = "evaluate", _evaluation_source(out, weights)
    else:
        plan.mode = _run_state(out, sha256_json(record_config), sha, resume, force)
        if force and record_path.is_file():
            # the run directory was just cleared: the old record would name a model_final.pth that is gone,
            # and a forced run killed before it writes its own would otherwise be "skipped" next time
            record_path.unlink()
    return plan, None


def _existing_record(path: Path, sha: str, config: dict[str, Any], force: bool) -> dict[str, Any] | None:
    from transfer.records import is_valid_for

    if force or not path.exists():
        return None
    try:
        existing = read_record(path)
    except RecordError:
        return None  # corrupt or foreign: recomputed and replaced
    if is_valid_for(existing, sha, config):
        return existing
    if existing.get("status") == "ok":
        raise DetectionSetupError(f"{path} holds a finished record for other weights or another config; pass "
                                  "--force to recompute it, or choose another --out / --record")
    return None


def run_detection(task: str, weights: str | os.PathLike, *, data_root: str | os.PathLike | None = None,
                  seed: int = 0, out: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                  overrides: Sequence[str] = (), name: str | None = None, preset: str = "custom",
                  record: str | os.PathLike | None = None, force: bool = False, resume: bool = False,
                  eval_only: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
                  dist_url: str = "auto", batch_policy: str = "accumulate", keep_checkpoints: str = "final",
                  progress: bool | None = None, verbose: bool = False) -> dict[str, Any]:
    """Train and evaluate one detection transfer run; return its record (the existing one if skipped).

    ``task`` is "voc" (Faster R-CNN, VOC07+12) or "coco" (Mask R-CNN, COCO 2017). The record's
    ``extra["skipped"]`` is true when a valid record was found and nothing ran. Raises
    :class:`~pretrain.checkpoint.CheckpointError`, :class:`~transfer.d2_datasets.DatasetLayoutError` or
    :class:`DetectionSetupError` (subclasses of ValueError) before anything trains on bad input.
    """
    from transfer.d2_run import launch_plan

    plan, existing = plan_detection(
        task, weights, data_root=data_root, seed=seed, out=out, config=config, overrides=overrides, name=name,
        preset=preset, record=record, force=force, resume=resume, eval_only=eval_only, num_gpus=num_gpus,
        num_machines=num_machines, batch_policy=batch_policy, keep_checkpoints=keep_checkpoints,
        progress=progress, verbose=verbose)
    if existing is not None:
        return {**existing, "extra": {**existing.get("extra", {}), "skipped": True}}
    return launch_plan(plan, num_gpus=num_gpus, num_machines=num_machines, machine_rank=machine_rank,
                       dist_url=dist_url)


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    configs = "\n".join(f"  --task {task:<5} {alias:<6} -> {stem}" for task, table in CONFIG_ALIASES.items()
                        for alias, stem in table.items())
    parser = argparse.ArgumentParser(
        prog="python -m transfer.detection",
        description="Detection (VOC07+12 Faster R-CNN) and instance segmentation (COCO Mask R-CNN) transfer "
                    "of a ResNet checkpoint on detectron2; writes one JSON results record.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"configs (--config, in {CONFIG_DIR}):\n{configs}\n\n"
               "stopping: the first SIGTERM or Ctrl-C during training ends the run after the step in progress and\n"
               "saves a checkpoint of it (--resume continues from there); a second one stops at once.\n\n"
               "exit status: 0 done or skipped, 1 refused or failed (message says why), 2 bad arguments,\n"
               "130 Ctrl-C, 143 SIGTERM.\n"
               "example: python -m transfer.detection --task voc --weights final.pth --config toy "
               "--data-root /data/toy SOLVER.MAX_ITER 100",
    )
    parser.add_argument("--task", required=True, choices=tuple(TASK_NAMES), help="voc (VOC07+12) or coco (COCO 2017)")
    parser.add_argument("--weights", required=True, type=Path,
                        help="checkpoint (ours, MoCo, torchvision, ...; converted and verified) or a converted .pkl")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder with VOCdevkit/ and coco/ (default: $DETECTRON2_DATASETS, else datasets/)")
    parser.add_argument("--config", default=None, help="config path, stem or alias (default: paper)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/detection/<protocol>/<name>/seed<N>)")
    parser.add_argument("--name", default=None, help="model name in the record (default: from checkpoint metadata)")
    parser.add_argument("--preset", default="custom", help="benchmark preset stored in the record (default custom)")
    parser.add_argument("--record", type=Path, default=None, help="record path (default: <out>/<task>__<name>__seed<N>.json)")
    parser.add_argument("--force", action="store_true", help="recompute even if a valid record exists; start over")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the run directory's last checkpoint (or --weights as a full detector)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine (default 1)")
    parser.add_argument("--num-machines", type=int, default=1, help="machines (default 1)")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (default 0)")
    parser.add_argument("--dist-url", default="auto", help="rendezvous URL, e.g. tcp://host:port (default auto)")
    parser.add_argument("--batch-policy", default="accumulate", choices=("accumulate", "linear-scaling"),
                        help="fewer devices than the protocol's: accumulate gradients (default) or scale lr/schedule")
    parser.add_argument("--keep-checkpoints", default="final", choices=KEEP_CHECKPOINTS,
                        help="training checkpoints kept after success (default final: model_final.pth)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="also print detectron2's log (always in OUT/log.txt)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="detectron2 config overrides, e.g. SOLVER.MAX_ITER 200")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transfer.d2compat import silence_import_warnings

    silence_import_warnings()
    previous = {signum: signal.signal(signum, _interrupt)  # a killed job says what was kept and how to go on
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(args)
    except KeyboardInterrupt as err:
        print("interrupted: no record written; rerun the same command with --resume to continue from the run "
              "directory's last checkpoint (see its last_checkpoint), or with --force to start over",
              file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130  # the shell's codes for SIGTERM / SIGINT, as pretrain
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum, frame):
    raise exception_for(signum)


def _main(args: argparse.Namespace) -> int:
    from transfer.d2_datasets import DatasetLayoutError

    try:
        record = run_detection(
            args.task, args.weights, data_root=args.data_root, seed=args.seed, out=args.out, config=args.config,
            overrides=args.overrides, name=args.name, preset=args.preset, record=args.record, force=args.force,
            resume=args.resume, eval_only=args.eval_only, num_gpus=args.num_gpus, num_machines=args.num_machines,
            machine_rank=args.machine_rank, dist_url=args.dist_url, batch_policy=args.batch_policy,
            keep_checkpoints=args.keep_checkpoints, progress=False if args.no_progress else None,
            verbose=args.verbose)
    except (CheckpointError, DatasetLayoutError, DetectionSetupError, RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FloatingPointError as err:
        print(f"error: training diverged ({err}); lower SOLVER.BASE_LR or check the weights", file=sys.stderr)
        return 1
    if record is None:  # a machine other than rank 0 of a multi-machine run
        return 0
    extra = record.get("extra", {})
    state = "skipped (valid record exists)" if extra.get("skipped") else f"done in {record['wall_time_s']:.0f} s"
    metrics = "  ".join(f"{k} {v:.1f}" for k, v in record["metrics"].items())
    print(f"{record['task']} {record['model']['name']} seed {record['seed']}: {state}\n  {metrics}\n"
          f"  iteration {extra.get('iteration')}/{extra.get('max_iter')}; record: {extra.get('record_path', args.record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
