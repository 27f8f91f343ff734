"""Training and evaluation on detectron2 for the suite's detection protocols.

:class:`DetectionTrainer` is detectron2's ``DefaultTrainer`` with what the MoCo protocol needs:

* weights and training checkpoints are read with :class:`~transfer.d2checkpoint.SafeDetectionCheckpointer`
  (never unpickling code);
* gradient accumulation (``SOLVER.GRADIENT_ACCUMULATION_STEPS``), so a run on fewer devices than the
  protocol's keeps its total batch, learning rate and schedule (:func:`adapt_to_world_size`);
* evaluation with detectron2's ``PascalVOCDetectionEvaluator`` or ``COCOEvaluator`` (bbox + segm,
  pycocotools: ``use_fast_impl=False``) chosen by the dataset's ``evaluator_type``; the final evaluation
  is left to the caller, who keeps the evaluator's returned dict;
* precise BN (detectron2's hook, ``TEST.PRECISE_BN``) before every evaluation and at the end;
* a stop request (SIGTERM or Ctrl-C, see :mod:`pretrain.stop_request`) ends training after the step in
  progress with a checkpoint of that step, so ``--resume`` loses nothing;
* a tqdm progress bar instead of a console log (the full log goes to ``OUTPUT_DIR/log.txt``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import weakref
from collections import defaultdict
from typing import Any

import torch
from tqdm.auto import tqdm

from pretrain.distributed import any_process
from pretrain.fileio import atomic_torch_save, atomic_write_text
from pretrain.stop_request import STOP, leave_signals_to_the_trainer
from transfer.d2checkpoint import SafeDetectionCheckpointer
from transfer.d2compat import import_detectron2

import_detectron2()
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, SimpleTrainer, create_ddp_model, hooks  # noqa: E402
from detectron2.engine.train_loop import AMPTrainer, TrainerBase  # noqa: E402
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import transfer.d2_modeling  # noqa: E402,F401  (registers the suite's ROI head and meta-architecture)

__all__ = ["DetectionTrainer", "AccumulatingTrainer", "RunCheckpointer", "add_training_config", "adapt_to_world_size",
           "use_plain_bn_on_one_device", "BATCH_POLICIES", "unwrap"]

BATCH_POLICIES = ("accumulate", "linear-scaling")
_SYNC_NORMS = ("SyncBN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN")
_NORM_KEYS = (("MODEL", "RESNETS", "NORM"), ("MODEL", "FPN", "NORM"), ("MODEL", "ROI_BOX_HEAD", "NORM"),
              ("MODEL", "ROI_MASK_HEAD", "NORM"))
logger = logging.getLogger(__name__)


def add_training_config(cfg: CfgNode) -> CfgNode:
    """Add ``SOLVER.GRADIENT_ACCUMULATION_STEPS`` (images per optimizer step stay ``IMS_PER_BATCH``)."""
    if "GRADIENT_ACCUMULATION_STEPS" not in cfg.SOLVER:
        cfg.SOLVER.GRADIENT_ACCUMULATION_STEPS = 1
    return cfg


def adapt_to_world_size(cfg: CfgNode, world_size: int, policy: str = "accumulate") -> dict[str, Any]:
    """Fit a config written for ``SOLVER.REFERENCE_WORLD_SIZE`` devices to ``world_size`` devices.

    ``accumulate`` keeps the total batch, learning rate and schedule: each device takes the reference's
    images per device (or fewer) and gradients are accumulated over ``ref / world`` micro-batches.
    ``linear-scaling`` keeps the images per device and scales batch, learning rate and schedule
    linearly (detectron2's ``DefaultTrainer.auto_scale_workers``). A reference of 0 means "as written".
    Afterwards ``REFERENCE_WORLD_SIZE == world_size``, so detectron2 does not scale again. Returns what
    was done, for the record.
    """
    if policy not in BATCH_POLICIES:
        raise ValueError(f"unknown batch policy '{policy}'; choose one of {', '.join(BATCH_POLICIES)}")
    add_training_config(cfg)
    reference = int(cfg.SOLVER.REFERENCE_WORLD_SIZE)
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    done = {"policy": "none", "reference_world_size": reference, "world_size": world_size,
            "ims_per_batch": total, "base_lr": cfg.SOLVER.BASE_LR, "max_iter": cfg.SOLVER.MAX_ITER,
            "accumulation_steps": int(cfg.SOLVER.GRADIENT_ACCUMULATION_STEPS)}
    if reference in (0, world_size):
        done["images_per_device"] = total // (world_size * done["accumulation_steps"])
        return done
    if total % reference:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by SOLVER.REFERENCE_WORLD_SIZE {reference}")
    if policy == "linear-scaling":
        scaled = DefaultTrainer.auto_scale_workers(cfg, world_size)
        cfg.merge_from_other_cfg(scaled)
        done.update(policy="linear-scaling", ims_per_batch=cfg.SOLVER.IMS_PER_BATCH, base_lr=cfg.SOLVER.BASE_LR,
                    max_iter=cfg.SOLVER.MAX_ITER, images_per_device=cfg.SOLVER.IMS_PER_BATCH // world_size)
        return done
    steps = math.ceil(reference / world_size)
    if total % (world_size * steps):
        raise ValueError(f"the protocol's batch of {total} images cannot be split evenly over {world_size} devices "
                         f"with {steps}-step gradient accumulation; use a device count that divides "
                         f"{reference} or --batch-policy linear-scaling")
    cfg.SOLVER.GRADIENT_ACCUMULATION_STEPS = steps
    cfg.SOLVER.REFERENCE_WORLD_SIZE = world_size
    done.update(policy="accumulate" if steps > 1 else "split", accumulation_steps=steps,
                images_per_device=total // (world_size * steps))
    return done


def use_plain_bn_on_one_device(cfg: CfgNode, world_size: int) -> dict[str, str]:
    """Synchronized BN needs a process group; on a single device it is plain BN (swapped explicitly).
    Returns {config key: "old -> new"} for what changed."""
    changed: dict[str, str] = {}
    if world_size != 1:
        return changed
    for path in _NORM_KEYS:
        node = cfg
        for part in path[:-1]:
            node = node[part]
        if node.get(path[-1]) in _SYNC_NORMS:
            changed[".".join(path)] = f"{node[path[-1]]} -> BN"
            node[path[-1]] = "BN"
    return changed


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class RunCheckpointer(SafeDetectionCheckpointer):
    """The safe checkpointer, writing each training checkpoint and the ``last_checkpoint`` tag atomically:
    a run killed while saving leaves the previous checkpoint as the one ``--resume`` continues from."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        self.logger.info("Saving checkpoint to %s", os.path.join(self.save_dir, basename))
        atomic_torch_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)


class AccumulatingTrainer(SimpleTrainer):
    """``SimpleTrainer`` that sums gradients of ``steps`` micro-batches per optimizer step."""

    def __init__(self, model, data_loader, optimizer, steps: int = 1):
        super().__init__(model, data_loader, optimizer)
        self.steps = int(steps)

    def run_step(self) -> None:
        if self.steps == 1:
            return super().run_step()
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad()
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        data_time = 0.0
        for index in range(self.steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = index == self.steps - 1
            # DDP all-reduces on every backward; only the last micro-batch needs it.
            sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else contextlib.nullcontext()
            with sync:
                loss_dict = self.model(data)
                (sum(loss_dict.values()) / self.steps).backward()
            for key, value in loss_dict.items():
                totals[key] = totals[key].to(value.device) + value.detach() / self.steps
        self._write_metrics(dict(totals), data_time)
        self.optimizer.step()


class _ProgressBar(hooks.HookBase):
    """One tqdm line for the run: iteration, ETA and the smoothed total loss."""

    def __init__(self, description: str, enabled: bool | None):
        self._description = description
        self._enabled = enabled
        self._bar = None

    def before_train(self):
        disable = (not comm.is_main_process()) or (self._enabled is False) or None
        self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc=self._description,
                         unit="it", dynamic_ncols=True, disable=disable)

    def after_step(self):
        self._bar.update(1)
        history = self.trainer.storage.histories().get("total_loss")
        if history is not None and (self.trainer.iter % 5 == 0 or self.trainer.iter + 1 == self.trainer.max_iter):
            self._bar.set_postfix(loss=f"{history.median(20):.3f}", refresh=False)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()


class _StopOnRequest(hooks.HookBase):
    """After each step: if any process was asked to stop, save this step (unless the periodic checkpointer
    just did) and raise the stop. The last hook, so the step's own checkpoint and metrics come first."""

    def after_step(self):
        device = torch.device(self.trainer.cfg.MODEL.DEVICE)
        if not any_process([STOP.requested], device)[0]:
            return
        iteration, max_iter = self.trainer.iter, self.trainer.max_iter
        name = "model_final" if iteration + 1 >= max_iter else f"model_{iteration:07d}"
        checkpointer = self.trainer.checkpointer
        tag = os.path.join(checkpointer.save_dir, "last_checkpoint")
        saved = os.path.isfile(tag) and open(tag).read().strip() == f"{name}.pth"
        if not saved:
            checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # the other processes stop only once rank 0 has written the checkpoint
        if comm.is_main_process():
            print(f"stopped after iteration {iteration + 1} of {max_iter}; checkpoint {name}.pth", file=sys.stderr,
                  flush=True)
        raise STOP.exception()


class _IntermediateEvalHook(hooks.EvalHook):
    """Detectron2's periodic evaluation, minus the one after the last iteration: the runner evaluates the
    final model itself and keeps the evaluator's dict for the record."""

    def after_train(self):
        del self._func


class DetectionTrainer(DefaultTrainer):
    """``DefaultTrainer`` for the suite (see module docstring). ``cfg`` must already be adapted to the
    world size (:func:`adapt_to_world_size`); it is used as given."""

    def __init__(self, cfg: CfgNode, progress: bool | None = None, description: str = "train"):
        TrainerBase.__init__(self)
        add_training_config(cfg)
        self._progress = progress
        self._description = description
        steps = int(cfg.SOLVER.GRADIENT_ACCUMULATION_STEPS)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        if cfg.SOLVER.AMP.ENABLED:
            if steps > 1:
                raise ValueError("SOLVER.AMP.ENABLED with gradient accumulation is not supported; use "
                                 "--batch-policy linear-scaling or disable AMP")
            self._trainer = AMPTrainer(model, data_loader, optimizer)
        else:
            self._trainer = AccumulatingTrainer(model, data_loader, optimizer, steps)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = RunCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        from detectron2.modeling import build_model

        model = build_model(cfg)
        logging.getLogger(__name__).info("Model:\n%s", model)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        steps = int(cfg.SOLVER.get("GRADIENT_ACCUMULATION_STEPS", 1))
        if steps > 1:  # the loader yields one micro-batch; IMS_PER_BATCH counts a whole optimizer step
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.IMS_PER_BATCH = cfg.SOLVER.IMS_PER_BATCH // steps
        # torch's workers die on a SIGTERM that is not their parent's: a job-wide SIGTERM would break the
        # step that the stop request is about to save
        return leave_signals_to_the_trainer(build_detection_train_loader(cfg))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if kind == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        if kind == "coco":
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, use_fast_impl=False,
                                 output_dir=os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name))
        raise ValueError(f"no evaluator for dataset '{dataset_name}' (evaluator_type {kind!r}); the suite "
                         "evaluates 'pascal_voc' and 'coco' datasets")

    def build_hooks(self):
        result = []
        for hook in super().build_hooks():
            if isinstance(hook, hooks.EvalHook):
                hook = _IntermediateEvalHook(self.cfg.TEST.EVAL_PERIOD, lambda: self.test(self.cfg, self.model))
            result.append(hook)
        result.append(_ProgressBar(self._description, self._progress))
        result.append(_StopOnRequest())
        return result
