"""The pretraining loop: data, method steps, checkpoints, resume, monitoring.

:func:`train` runs one config to completion on one process or under torchrun. The method does the
step (:mod:`pretrain.methods`); the engine does everything around it:

* exact resume: a checkpoint records epoch, step within the epoch, the method's state (weights,
  queue, ...), every optimizer and AMP scaler, and the RNG states of every process (torch, CUDA,
  Python, the method's generators); data order and augmentations are a function of (seed, epoch,
  index), so a resumed run continues with exactly the batches and draws the uninterrupted run had;
* checkpoints every epoch, every ``checkpoint.every_minutes`` / ``every_steps``, atomically;
* tqdm (images/s), TensorBoard scalars, ``metrics.jsonl``, the kNN monitor, the per-epoch picture;
* unreadable images are skipped (one warning per file) and counted into the log and the meta.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretrain import distributed, rundir
from pretrain.augment import TwoCropTransform, to_device_batch
from pretrain.backbones import trunk_state_dict
from pretrain.checkpoint import load_checkpoint, make_meta, save_checkpoint
from pretrain.config import to_container, to_yaml
from pretrain.data import ImageFolderDataset, ResumableSampler, balanced_subset, collate_samples, worker_init
from pretrain.fileio import atomic_write_text
from pretrain.knn import KnnMonitor
from pretrain.methods import METHODS
from pretrain.provenance import device_description
from pretrain.stepping import StepRunner, amp_dtype
from pretrain.stop_request import STOP
from pretrain.timing import NULL_TIMER, PhaseTimer
from pretrain.visualize import write_picture

log = logging.getLogger("pretrain")
StepHook = Callable[["Trainer"], None]


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss diverged); the message says what to change."""


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(out_dir: Path, world: distributed.World) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = _TqdmHandler()
    prefix = "" if not world.distributed else f"[rank {world.rank}] "
    console.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    console.setLevel(logging.INFO if world.is_main else logging.WARNING)
    log.addHandler(console)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(out_dir / rundir.LOG, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(to_file)


def note_in_log_file(out_dir: str | os.PathLike, message: str) -> None:
    """Append why the run stopped to ``out_dir``'s log.txt if this process opened it (the console already
    shows the message): the log then tells the whole story of a run, including an error or an interruption."""
    log_file = os.path.abspath(Path(out_dir) / rundir.LOG)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == log_file:
            handler.handle(record)  # FileHandler flushes every record


def _broadcast_object(obj: Any) -> Any:
    if not distributed.is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(obj: Any) -> list[Any]:
    if not distributed.is_distributed():
        return [obj]
    out: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """One pretraining run (see the module docstring); build with a resolved config, then :meth:`run`."""

    def __init__(self, cfg: DictConfig, world: distributed.World, force: bool = False,
                 step_hook: StepHook | None = None, timer: PhaseTimer = NULL_TIMER):
        self.cfg, self.world, self.force = cfg, world, force
        self.step_hook, self.timer = step_hook, timer
        self.out_dir = Path(cfg.out_dir)
        self.config = to_container(cfg)
        self.device = world.device
        self.skipped: set[str] = set()
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0
        self.elapsed = 0.0
        self.last_knn: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ set-up

    def _decide(self) -> rundir.Decision:
        decision = None
        error = None
        if self.world.is_main:
            try:
                decision = rundir.decide(self.out_dir, self.config, str(self.cfg.resume), self.force)
            except rundir.RunDirError as err:
                error = str(err)
        decision, error = _broadcast_object((decision, error))
        if error:
            raise rundir.RunDirError(error)
        return decision

    def _seed(self) -> None:
        seed = int(self.cfg.seed) * 1000 + self.world.rank
        random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _build_data(self) -> None:
        cfg, world = self.cfg, self.world
        if cfg.data.batch_size % world.world_size:
            raise ValueError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of "
                             f"processes ({world.world_size})")
        self.per_process_batch = cfg.data.batch_size // world.world_size
        self.train_set = ImageFolderDataset(cfg.data.root, cfg.data.train_split, TwoCropTransform(cfg.augment),
                                            seed=int(cfg.seed), limit=cfg.data.limit_train_images)
        self.sampler = ResumableSampler(len(self.train_set), self.per_process_batch, world.rank,
                                        world.world_size, seed=int(cfg.seed))
        workers = int(cfg.data.num_workers)
        self.loader = DataLoader(
            self.train_set, batch_size=self.per_process_batch, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_samples, pin_memory=bool(cfg.data.pin_memory) and self.device.type == "cuda",
            persistent_workers=workers > 0, worker_init_fn=worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = self.steps_per_epoch * int(cfg.train.epochs)

    def _build_method(self) -> None:
        cfg, world = self.cfg, self.world
        method_cls = METHODS[cfg.method]
        self.method = method_cls(cfg, world, num_classes=len(self.train_set.classes)).to(self.device)
        self.channels_last = bool(cfg.train.channels_last) and self.device.type == "cuda"
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.amp = amp_dtype(str(cfg.train.amp), self.device)
        files = [path for path, _ in self.train_set.samples]
        if world.is_main:
            self.method.attach_dataset(files, build=True)
        distributed.barrier()
        if not world.is_main:
            self.method.attach_dataset(files, build=False)

    def _wrap(self) -> None:
        if self.world.distributed:
            self.wrapped = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.method.find_unused_parameters,
            )
        else:
            self.wrapped = self.method
        self.runner = StepRunner(self.method, self.wrapped, self.method.optimizer_specs(), device=self.device,
                                 amp=self.amp, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                                 timer=self.timer)

    # -------------------------------------------------------------------------------------- checkpoint

    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "generators": self.method.generator_states()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        self.method.load_generator_states(state["generators"])

    def meta(self, finished: bool) -> dict[str, Any]:
        cfg = self.cfg
        return make_meta(
            arch=cfg.model.arch, **self.method.meta(), image_size=int(cfg.augment.image_size), seed=int(cfg.seed),
            config=self.config, epoch=self.epoch, epochs=int(cfg.train.epochs), step_in_epoch=self.step_in_epoch,
            finished=finished, world_size=self.world.world_size, global_batch=int(cfg.data.batch_size),
            amp=str(self.amp).replace("torch.", "") if self.amp else "fp32", device=device_description(self.device),
            skipped_images=len(self.skipped), train_images=len(self.train_set), **self.last_knn,
        )

    def save_last(self) -> None:
        """checkpoint_last.pth (every process takes part: RNG states are gathered)."""
        rng_states = _gather_objects(self._rng_state())
        skipped = set().union(*_gather_objects(sorted(self.skipped)))
        self.skipped |= skipped
        if self.world.is_main:
            training = {
                "method": self.method.state_dict(), "runner": self.runner.state_dict(), "rng": rng_states,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "elapsed": self.elapsed,
                "skipped": sorted(self.skipped), "world_size": self.world.world_size,
            }
            save_checkpoint(self.out_dir / rundir.LAST, trunk_state_dict(self.method.backbone()),
                            self.meta(finished=False), training)
        distributed.barrier()
        self._last_save = time.monotonic()

    def _resume(self, path: Path) -> None:
        checkpoint = load_checkpoint(path, map_location="cpu")
        training = checkpoint.get("training")
        if training is None:
            raise rundir.RunDirError(f"{path} has no training state (a final.pth?); resume needs checkpoint_last.pth")
        self.method.load_state_dict(training["method"])
        self.method.to(self.device)
        self.runner.load_state_dict(training["runner"])
        self.epoch, self.step_in_epoch = int(training["epoch"]), int(training["step_in_epoch"])
        self.elapsed = float(training.get("elapsed", 0.0))
        self.skipped = set(training.get("skipped", []))
        states = training["rng"]
        if len(states) == self.world.world_size:
            self._load_rng_state(states[self.world.rank])
        else:
            log.warning(f"resuming a {len(states)}-process run on {self.world.world_size} processes: data order "
                        "and weights continue, but random draws will not match the original run exactly")
        for key in ("knn_top1", "knn_top5"):
            if key in checkpoint["meta"]:
                self.last_knn[key] = checkpoint["meta"][key]

    # ---------------------------------------------------------------------------------------- monitors

    def _knn(self) -> dict[str, float]:
        if self.monitor is None:
            return {}
        was_training = self.method.training
        self.method.eval()
        try:
            with self.runner.autocast():
                result = self.monitor.evaluate(self.method.features)
        finally:
            self.method.train(was_training)
        self._handle_skipped(sorted(self.monitor.skipped))  # bank and query images: warned like training's
        self.last_knn = {k: round(v, 4) for k, v in result.items()}
        return result

    def _picture_batch(self):
        cfg = self.cfg
        dataset = ImageFolderDataset(cfg.data.root, cfg.data.val_split, TwoCropTransform(cfg.augment),
                                     seed=int(cfg.seed))
        wanted = int(cfg.visualize.num_images)
        dataset.samples = balanced_subset(dataset.samples, wanted, int(cfg.seed))[:wanted]  # one class per row first
        raw = collate_samples([dataset[i] for i in range(len(dataset))])
        self._handle_skipped(raw["skipped"])
        return to_device_batch(raw, self.device)

    def _picture(self) -> None:
        if not (self.world.is_main and self.cfg.visualize.enabled):
            return
        if self._pictures_batch is None:
            self._pictures_batch = self._picture_batch()
        generator = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed))
        panels = self.method.pictures(self._pictures_batch, generator)
        if panels:
            filtered = self.method.input_filter.spec["name"] != "none"
            title = f"{self.cfg.name}: epoch {self.epoch}/{self.cfg.train.epochs}"
            write_picture(self.out_dir / rundir.PICTURES / f"epoch_{self.epoch:03d}.png", panels, filtered, title)

    def _record_epoch(self, row: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        rundir.append_metrics(self.out_dir, row)
        for key, value in row.items():
            if key not in ("epoch", "global_step") and isinstance(value, int | float):
                self.writer.add_scalar(f"epoch/{key}", value, self.epoch)

    # -------------------------------------------------------------------------------------------- loop

    def _handle_skipped(self, paths: list[str]) -> None:
        for path in paths:
            if path not in self.skipped:
                self.skipped.add(path)
                log.warning(f"warning: cannot read image {path}; skipped (replaced by the next readable image). "
                            f"{len(self.skipped)} unreadable image(s) so far")

    def _log_step(self, sums: dict[str, torch.Tensor], count: int, lrs: dict[str, float], bar: tqdm) -> None:
        values = {k: float(v) / count for k, v in sums.items()}
        loss = values.get("loss", float("nan"))
        if not torch.isfinite(torch.tensor(loss)):
            raise TrainingError(f"the loss is {loss} at step {self.runner.global_step}: training diverged. Lower "
                                "optim.lr (or enable optim.grad_clip) and rerun with --force")
        if self.world.is_main:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, self.runner.global_step)
            for name, lr in lrs.items():
                self.writer.add_scalar(f"train/lr_{name}" if len(lrs) > 1 else "train/lr", lr, self.runner.global_step)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{values.get('contrastive_acc', 0):.0f}", refresh=False)

    def _stop_requested(self) -> bool:
        """SIGTERM / Ctrl-C seen by any process (pretrain.stop_request); every process takes part."""
        return distributed.any_process([STOP.requested], self.device)[0]

    def _save_point(self) -> tuple[bool, bool]:
        """(checkpoint now, then stop) after a step; every process takes part in one collective and agrees."""
        ckpt = self.cfg.checkpoint
        due = bool(ckpt.every_steps) and self.runner.global_step % int(ckpt.every_steps) == 0
        timed = bool(ckpt.every_minutes) and (time.monotonic() - self._last_save) >= 60 * float(ckpt.every_minutes)
        timed, stop = distributed.any_process([timed, STOP.requested], self.device)
        return due or timed or stop, stop

    def _train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        self.method.train()
        sums: dict[str, torch.Tensor] = {}
        epoch_sums: dict[str, float] = {}
        count = epoch_count = 0
        images = 0
        start = time.monotonic()
        bar = tqdm(total=self.steps_per_epoch * cfg.data.batch_size, initial=self.step_in_epoch * cfg.data.batch_size,
                   unit="img", unit_scale=True, dynamic_ncols=True, leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   disable=not (self.world.is_main and cfg.log.progress))
        iterator = iter(self.loader)
        lrs: dict[str, float] = {}
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                with self.timer("data"):
                    raw = next(iterator)
                self._handle_skipped(raw["skipped"])
                batch = to_device_batch(raw, self.device, self.channels_last)
                lrs = self.runner.set_learning_rates()
                metrics = self.method.train_step(self.runner, batch)
                self.runner.global_step += 1
                self.step_in_epoch += 1
                for key, value in metrics.items():
                    value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                    sums[key] = sums[key] + value if key in sums else value
                count += 1
                images += cfg.data.batch_size
                bar.update(cfg.data.batch_size)
                if self.runner.global_step % int(cfg.log.every_steps) == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self._log_step(sums, count, lrs, bar)
                    for key, value in sums.items():
                        epoch_sums[key] = epoch_sums.get(key, 0.0) + float(value)
                    epoch_count += count
                    sums, count = {}, 0
                # an epoch's last step is saved (and stopped after) with the epoch's metrics, in _train_epochs
                if self.step_in_epoch < self.steps_per_epoch:
                    save, stop = self._save_point()
                    if save:
                        self.elapsed += time.monotonic() - start
                        start = time.monotonic()
                        self.save_last()
                    if stop:
                        log.info(f"stopped on request at epoch {self.epoch + 1}, step {self.step_in_epoch}/"
                                 f"{self.steps_per_epoch}: {self.out_dir / rundir.LAST} holds that step")
                        raise STOP.exception()
                if self.step_hook is not None:
                    self.step_hook(self)
        finally:
            bar.close()  # also when interrupted: the message then starts on a clean line
        seconds = time.monotonic() - start
        self.elapsed += seconds
        means = {k: v / max(1, epoch_count) for k, v in epoch_sums.items()}
        means = distributed.all_reduce_mean(means, self.device)
        means["lr"] = next(iter(lrs.values())) if lrs else 0.0
        means["images_per_s"] = images / max(seconds, 1e-9)
        return means

    def run(self) -> Path:
        cfg, world = self.cfg, self.world
        decision = self._decide()  # may clear the run directory (--force): set up the log file after it
        _setup_logging(self.out_dir, world)
        if decision.action == "skip":
            log.info(decision.message)
            return decision.checkpoint
        if decision.message:
            log.info(decision.message)
        self._seed()
        self._build_data()
        self._build_method()
        self._wrap()
        resumed = decision.action == "resume"
        if resumed:
            self._resume(decision.checkpoint)
        self.monitor = KnnMonitor(cfg, world) if cfg.knn.enabled else None
        self._pictures_batch = None
        self._last_save = time.monotonic()
        if world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            atomic_write_text(self.out_dir / rundir.CONFIG, to_yaml(cfg))
            self.writer = SummaryWriter(str(self.out_dir / rundir.TB),
                                        purge_step=self.runner.global_step if resumed else None)
            if resumed:
                rundir.truncate_metrics(self.out_dir, self.epoch)
        self._log_start(resumed)
        if not resumed and self.epoch == 0:
            row: dict[str, Any] = {"epoch": 0, "global_step": 0}
            if cfg.knn.enabled and cfg.knn.at_start:
                row.update(self._knn())
                log.info(f"epoch 0 (initialization): {self._format(row)}")
            self._record_epoch(row)
            self._picture()
        try:
            with STOP.armed():
                return self._train_epochs()
        finally:
            if world.is_main:
                self.writer.close()

    def _train_epochs(self) -> Path:
        cfg, world = self.cfg, self.world
        while self.epoch < int(cfg.train.epochs):
            means = self._train_epoch()
            self.epoch += 1
            self.step_in_epoch = 0
            row = {"epoch": self.epoch, "global_step": self.runner.global_step, **means,
                   "skipped_images": len(self.skipped), "elapsed_s": round(self.elapsed, 1)}
            if cfg.knn.enabled and (self.epoch % int(cfg.knn.every_epochs) == 0 or self.epoch == cfg.train.epochs):
                row.update(self._knn())
            if self.epoch % int(cfg.visualize.every_epochs) == 0 or self.epoch == cfg.train.epochs:
                self._picture()
            self._record_epoch(row)
            log.info(f"epoch {self.epoch}/{cfg.train.epochs}: {self._format(row)}")
            self.save_last()
            if self.epoch < int(cfg.train.epochs) and self._stop_requested():
                log.info(f"stopped on request after epoch {self.epoch}: {self.out_dir / rundir.LAST} holds it")
                raise STOP.exception()
        final = self.out_dir / rundir.FINAL
        if world.is_main:
            save_checkpoint(final, trunk_state_dict(self.method.backbone()), self.meta(finished=True))
            log.info(f"finished: {final} ({self.elapsed / 60:.1f} min of training"
                     f"{f', {len(self.skipped)} unreadable image(s) skipped' if self.skipped else ''})")
        distributed.barrier()
        return final

    def _log_start(self, resumed: bool) -> None:
        cfg, world = self.cfg, self.world
        meta = self.method.meta()
        layer = f" ({meta['saliency_layer']} map)" if "saliency_layer" in meta else ""
        log.info(f"{cfg.name}: {cfg.method} on {cfg.model.arch}, masking={meta['masking']} strategy={meta['strategy']} "
                 f"branch={meta['mask_branch']} saliency={meta['saliency_source']}{layer}, input filter {meta['input_filter']}")
        log.info(f"data: {len(self.train_set)} images / {len(self.train_set.classes)} classes in "
                 f"{Path(cfg.data.root) / cfg.data.train_split}; {self.steps_per_epoch} steps/epoch of "
                 f"{cfg.data.batch_size} ({world.world_size} process(es) x {self.per_process_batch})")
        log.info(f"device: {device_description(self.device)}; precision "
                 f"{str(self.amp).replace('torch.', '') if self.amp else 'fp32'}"
                 f"{', channels_last' if self.channels_last else ''}")
        for line in self.method.describe():
            log.info(line)
        log.info(f"run directory: {self.out_dir}{' (resumed)' if resumed else ''}")

    @staticmethod
    def _format(row: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k not in ("epoch",))


def train(cfg: DictConfig, force: bool = False, step_hook: StepHook | None = None,
          timer: PhaseTimer = NULL_TIMER) -> Path:
    """Run a resolved config (see :func:`pretrain.config.load_config`); returns ``final.pth``'s path."""
    already_joined = dist.is_available() and dist.is_initialized()
    world = distributed.setup(str(cfg.train.device))
    started_group = world.distributed and not already_joined
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return Trainer(cfg, world, force, step_hook, timer).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if started_group:
            distributed.teardown()
