"""Execute a planned detection run (:class:`transfer.detection.DetectionPlan`) in each process.

:func:`launch_plan` starts the processes with detectron2's ``launch`` (one process: in this one). Every
process registers the datasets, builds the :class:`~transfer.d2_training.DetectionTrainer`, then either

* loads the converted weights into the very model it trains and proves every trunk tensor arrived
  (:func:`transfer.verify.load_and_check`: "backbone: N/N loaded"), or
* resumes from the run directory's last checkpoint (model, optimizer, scheduler, iteration),

trains to ``SOLVER.MAX_ITER`` and evaluates the final model with the dataset's detectron2 evaluator.
The global rank 0 turns the evaluator's dict into the record's metrics (names of
:data:`transfer.records.TASKS`) and writes the record atomically; a failure during training or
evaluation leaves a ``failed`` record with the error. ``OUT/run.json`` ties the run directory to its
weights and config, so ``--resume`` never continues a different run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pretrain.fileio import atomic_write_json, atomic_write_text, sha256_json
from pretrain.provenance import device_description, utc_now
from transfer.records import TASKS, make_record, read_record, write_record

__all__ = ["launch_plan", "record_metrics", "read_run_state", "clear_run_dir", "RUN_STATE"]

RUN_STATE = "run.json"
_LOGGERS = ("detectron2", "fvcore", "transfer", "d2.checkpoint")
_METRICS = {"voc_detection": (("bbox", "voc"),), "coco_instance": (("bbox", "coco_bbox"), ("segm", "coco_segm"))}
_SECONDARY = ("APs", "APm", "APl")


def read_run_state(out: str | Path) -> dict[str, Any] | None:
    import json

    path = Path(out) / RUN_STATE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def clear_run_dir(out: str | Path) -> list[str]:
    """Remove the training state of a run directory (checkpoints, tag, state, metrics, evaluation dumps);
    the log and the converted weights stay."""
    out = Path(out)
    removed = []
    for path in [*out.glob("model_*.pth"), *out.glob("events.out.tfevents.*"), out / "last_checkpoint",
                 out / RUN_STATE, out / "metrics.json"]:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if (out / "inference").is_dir():
        shutil.rmtree(out / "inference")
        removed.append("inference/")
    return removed


def _prune_checkpoints(out: Path, keep: str) -> None:
    if keep == "all":
        return
    for path in out.glob("model_*.pth"):
        if keep == "none" or path.name != "model_final.pth":
            path.unlink()
    if keep == "none":
        (out / "last_checkpoint").unlink(missing_ok=True)


def record_metrics(record_task: str, results: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The record's metrics from a detectron2 evaluator's returned dict, and notes on what was done.

    COCOEvaluator answers NaN for every metric when the model made no detection at all; that is an AP of
    0 and is recorded as such (with a note). NaN for APs/APm/APl (no object of that size) is left out.
    """
    metrics: dict[str, float] = {}
    notes: list[str] = []
    for evaluator_key, prefix in _METRICS[record_task]:
        values = results.get(evaluator_key)
        if not isinstance(values, dict):
            raise ValueError(f"the evaluator returned no '{evaluator_key}' results (got keys {sorted(results)})")
        main = {k: float(values[k]) for k in ("AP", "AP50", "AP75")}
        if all(math.isnan(v) for v in main.values()):
            notes.append(f"{evaluator_key}: the model made no detections; AP counted as 0")
            main = dict.fromkeys(main, 0.0)
        for key, value in main.items():
            if not math.isfinite(value):
                raise ValueError(f"the evaluator returned {evaluator_key} {key} = {value}")
            metrics[f"{prefix}_{key}"] = value
        for key in _SECONDARY:
            if key in values and math.isfinite(float(values[key])):
                metrics[f"{prefix}_{key}"] = float(values[key])
    missing = [m for m in TASKS[record_task] if m not in metrics]
    if missing:
        raise ValueError(f"metrics {missing} missing from the evaluator's results")
    return metrics, notes


def _plain(value: Any) -> Any:
    """Evaluator results as JSON: numbers as floats, NaN as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


@contextlib.contextmanager
def _run_logging(out: Path, rank: int, verbose: bool):
    """detectron2's INFO log into OUT/log.txt (rank 0) instead of the console; restored afterwards."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    handlers: list[logging.Handler] = []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out / "log.txt")
        file_handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
        handlers.append(file_handler)
        if verbose:
            handlers.append(logging.StreamHandler())
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.propagate = False
        lg.handlers = list(handlers)
    try:
        yield
    finally:
        for handler in handlers:
            handler.close()
        for lg, (level, propagate, old) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = old


def _config(plan) -> Any:
    from detectron2.config import CfgNode

    from transfer.detection import _base_config

    cfg = _base_config()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(plan.cfg_yaml))
    return cfg


def _evaluation_model(plan, cfg, trainer_cls):
    """The model for --eval-only, with the weights chosen by the plan (a trained checkpoint)."""
    from transfer.d2_training import RunCheckpointer

    model = trainer_cls.build_model(cfg)
    extra = RunCheckpointer(model, plan.out).load(plan.eval_source, checkpointables=[])
    return model, {"evaluated": plan.eval_source, "iteration": int(extra.get("iteration", -1)) + 1}


def _train_and_evaluate(plan, cfg) -> dict[str, Any]:
    from detectron2.utils import comm

    from transfer.d2_training import DetectionTrainer, unwrap
    from transfer.verify import load_and_check

    info: dict[str, Any] = {"mode": plan.mode}
    timings: dict[str, float] = {}
    if plan.mode == "evaluate":
        model, loaded = _evaluation_model(plan, cfg, DetectionTrainer)
        info.update(loaded, eval_only=True)
        iteration = loaded["iteration"]
    else:
        description = f"{plan.task} {plan.model['name']}"
        trainer = DetectionTrainer(cfg, progress=plan.progress, description=description)
        if plan.mode == "resume" and trainer.checkpointer.has_checkpoint():
            checkpoint = trainer.checkpointer.get_checkpoint_file()
            trainer.resume_or_load(resume=True)
            info.update(resumed_from=Path(checkpoint).name, resumed_from_iteration=trainer.start_iter)
            if comm.is_main_process():
                print(f"resuming {plan.out} from {Path(checkpoint).name} (iteration {trainer.start_iter} of "
                      f"{trainer.max_iter})", flush=True)
        else:
            check = load_and_check(unwrap(trainer.model), plan.weights_pkl)
            info.update(weights_loaded=check["summary"], resumed_from=None, resumed_from_iteration=0)
        start = time.monotonic()
        if trainer.start_iter < trainer.max_iter:
            with _stop_at_a_step_boundary():
                trainer.train()
        timings["train_s"] = round(time.monotonic() - start, 3)
        iteration = min(trainer.iter, trainer.max_iter) if trainer.start_iter < trainer.max_iter else trainer.start_iter
        model = trainer.model
    start = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # pycocotools prints its summary tables
        results = DetectionTrainer.test(cfg, model)
    if printed.getvalue().strip():
        logging.getLogger(__name__).info("evaluator output:\n%s", printed.getvalue())
    timings["eval_s"] = round(time.monotonic() - start, 3)
    info.update(iteration=iteration, max_iter=int(cfg.SOLVER.MAX_ITER), timings=timings)
    return {"results": results, "info": info}


@contextlib.contextmanager
def _stop_at_a_step_boundary():
    """While training, a first SIGTERM / Ctrl-C ends the run after the step in progress, with its checkpoint."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    from pretrain.stop_request import STOP

    with STOP.installed(), STOP.armed():
        yield


def _write(plan, status: str, metrics: dict[str, float], extra: dict[str, Any], error: str | None = None):
    record = make_record(
        task=plan.record_task, protocol=plan.protocol, seed=plan.seed, model=plan.model,
        weights_path=plan.weights_path, weights_sha256=plan.weights_sha256, metrics=metrics,
        config=plan.record_config, status=status, error=error, device=device_description(), extra=extra)
    record["started"] = plan.started
    record["wall_time_s"] = round(time.time() - plan.started_wall, 3)
    write_record(plan.record_path, record)
    return record


def _base_extra(plan) -> dict[str, Any]:
    return {"preset": plan.preset, "config_file": plan.config_file, "overrides": plan.overrides,
            "conversion": plan.conversion, "datasets": plan.datasets, "batch_adaptation": plan.adaptation,
            "norm_changes": plan.norm_changes, "input_filter": plan.model.get("input_filter"),
            "world_size": plan.world_size, "run_dir": plan.out, "record_path": plan.record_path,
            "config_hash": sha256_json(plan.record_config), "notes": list(plan.notes)}


def _worker(plan) -> None:
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from transfer.d2_datasets import DatasetInfo, register_datasets

    rank = comm.get_rank()
    out = Path(plan.out)
    with _run_logging(out, rank, plan.verbose):
        register_datasets(DatasetInfo(root=Path(plan.datasets["root"]), names=tuple(plan.datasets["datasets"]),
                                      thing_classes=list(plan.datasets["thing_classes"])))
        seed_all_rng(plan.seed + rank)
        cfg = _config(plan)
        if rank == 0 and plan.mode != "evaluate":
            atomic_write_json(out / RUN_STATE, {"config_hash": sha256_json(plan.record_config),
                                                "weights_sha256": plan.weights_sha256, "updated": utc_now(),
                                                "record": plan.record_path, "mode": plan.mode})
            atomic_write_text(out / "config.yaml", plan.cfg_yaml)
        extra = _base_extra(plan)
        try:
            outcome = _train_and_evaluate(plan, cfg)
            if rank != 0:
                return
            metrics, notes = record_metrics(plan.record_task, outcome["results"])
        except BaseException as err:
            if rank == 0 and not isinstance(err, KeyboardInterrupt):
                logging.getLogger(__name__).error("run failed:\n%s", traceback.format_exc())
                extra["traceback"] = traceback.format_exc(limit=8)
                _write(plan, "failed", {}, extra, error=f"{type(err).__name__}: {err}")
            raise
        extra.update(outcome["info"])
        extra["notes"] += notes
        extra["evaluator_results"] = _plain(outcome["results"])
        _write(plan, "ok", metrics, extra)
        _prune_checkpoints(out, plan.keep_checkpoints)


def launch_plan(plan, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
                dist_url: str = "auto") -> dict[str, Any] | None:
    """Run ``plan`` on ``num_gpus`` x ``num_machines`` processes; return the record (machine rank 0)."""
    from detectron2.engine import launch

    if num_gpus * num_machines > 1 and num_machines > 1 and dist_url == "auto":
        raise ValueError("a multi-machine run needs --dist-url tcp://HOST:PORT of machine 0")
    launch(_worker, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url, args=(plan,))
    if machine_rank != 0:
        return None
    return read_record(plan.record_path)
