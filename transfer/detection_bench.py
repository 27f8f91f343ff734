"""``python -m transfer.detection_bench``: how fast the detection pieces run on this machine.

    python -m transfer.detection_bench --data-root /tmp/toy [--cases toy,micro,r50c4] [--iters 10]

For each case it builds the real run (:func:`transfer.detection.plan_detection`: conversion, config,
datasets) from a random-init checkpoint of the case's architecture, then times training iterations
(after two warm-up iterations) and inference per test image, and prints one line per task. Cases:

* ``toy`` / ``micro``: the toy and micro configs (ResNet-18 FPN), VOC and COCO;
* ``r50c4``: the COCO protocol's Mask R-CNN R50-C4 (with the extra-norm ROI head) shrunk to the toy
  world: 96-128 px, 32 RoIs per image, batch 2, 300 iterations, the DESIGN notes' reference point.

It also estimates a whole run (iterations x s/iter + test images x s/img) to compare with the budgets.
Numbers depend on the machine's load; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from transfer.d2compat import import_detectron2
from transfer.detection import plan_detection

CASES: dict[str, list[tuple[str, str, str, list[str]]]] = {  # case -> [(task, config, arch, overrides)]
    "toy": [("voc", "toy", "resnet18", []), ("coco", "toy", "resnet18", [])],
    "micro": [("voc", "micro", "resnet18", []), ("coco", "micro", "resnet18", [])],
    "r50c4": [("coco", "paper", "resnet50", [
        "INPUT.MIN_SIZE_TRAIN", "(96, 112, 128)", "INPUT.MAX_SIZE_TRAIN", "171", "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "171", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
        "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64, 128]]",
        "TEST.DETECTIONS_PER_IMAGE", "20", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "0",
        "SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(200, 260)", "DATALOADER.NUM_WORKERS", "0"])],
}


def _checkpoint(arch: str, directory: Path) -> Path:
    from pretrain.backbones import build_resnet, trunk_state_dict
    from pretrain.checkpoint import make_meta, save_checkpoint

    path = directory / f"random_{arch}.pth"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, trunk_state_dict(build_resnet(arch)), make_meta(arch=arch, method="random"))
    return path


def measure(task: str, config: str, arch: str, overrides: list[str], data_root: Path, work: Path,
            iters: int, test_images: int) -> dict[str, Any]:
    """Seconds per training iteration and per test image for one task/config."""
    import_detectron2()
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.utils.events import EventStorage

    from transfer.d2_datasets import DatasetInfo, register_datasets
    from transfer.d2_run import _config
    from transfer.d2_training import DetectionTrainer
    from transfer.verify import load_and_check

    plan, _ = plan_detection(task, _checkpoint(arch, work), data_root=data_root, config=config,
                             overrides=overrides, out=work / f"{task}_{config}_{arch}", force=True, progress=False)
    info = plan.datasets
    register_datasets(DatasetInfo(Path(info["root"]), tuple(info["datasets"]), list(info["thing_classes"])))
    cfg = _config(plan)
    trainer = DetectionTrainer(cfg, progress=False)
    load_and_check(trainer.model, plan.weights_pkl)
    times = []
    with EventStorage(0) as trainer.storage:
        for step in range(iters + 2):
            trainer.iter = trainer.storage.iter = step
            start = time.perf_counter()
            trainer.run_step()
            times.append(time.perf_counter() - start)
    train = sum(times[2:]) / iters
    model = trainer.model.eval()
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    count, start = 0, time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model(batch)
            count += len(batch)
            if count >= test_images:
                break
    infer = (time.perf_counter() - start) / count
    total_test = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
    estimate = cfg.SOLVER.MAX_ITER * train + total_test * infer
    return {"task": task, "config": config, "arch": arch, "s_per_iter": train, "s_per_image": infer,
            "max_iter": cfg.SOLVER.MAX_ITER, "test_images": total_test, "estimated_run_s": estimate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transfer.detection_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="toy world (python -m transfer make-toy-data)")
    parser.add_argument("--cases", default="toy,micro,r50c4", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--iters", type=int, default=10, help="timed training iterations per task (default 10)")
    parser.add_argument("--test-images", type=int, default=40, help="timed test images per task (default 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    print(f"torch threads {torch.get_num_threads()}; iterations timed {args.iters}")
    print(f"{'task':<5} {'config':<7} {'arch':<9} {'s/iter':>7} {'s/img':>7} {'iters':>6} {'est. run s':>10}")
    with tempfile.TemporaryDirectory(prefix="detection_bench_") as tmp:
        for case in args.cases.split(","):
            for task, config, arch, overrides in CASES[case]:
                r = measure(task, config, arch, overrides, args.data_root, Path(tmp), args.iters, args.test_images)
                print(f"{r['task']:<5} {r['config']:<7} {r['arch']:<9} {r['s_per_iter']:>7.3f} {r['s_per_image']:>7.3f} "
                      f"{r['max_iter']:>6} {r['estimated_run_s']:>10.0f}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
