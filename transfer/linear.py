"""Linear evaluation of a pretrained backbone: ``python -m transfer.linear --dataset D --weights CKPT``.

Datasets and protocols (``configs/linear/``, SPEC section 3):

* ``imagenet100``: the MoCo linear probe (:mod:`transfer.linear_probe`), also under ``torchrun``;
  task ``linear_imagenet100``, metrics ``imagenet100_top1`` / ``imagenet100_top5``.
* ``caltech101``, ``flowers102``: Ericsson et al.'s logistic regression on cached frozen features
  (:mod:`transfer.logreg`, :mod:`transfer.feature_cache`); tasks ``logreg_caltech101`` /
  ``logreg_flowers102``, metrics ``caltech101_acc`` / ``flowers102_acc`` (mean per-class accuracy).

Every run reads the weights through :func:`transfer.checkpoints.load_backbone` (any supported checkpoint),
applies the checkpoint's input filter (e.g. high-pass) to its normalized inputs, checks the dataset layout
before any long work, and writes one JSON record (:mod:`transfer.records`) at ``--record`` (default:
``<out>/<task>__<name>__seed<N>.json``). A valid record for the same weights and config is reused unless
``--force``; an interrupted probe resumes. :func:`run_linear` is the same as a Python function.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.checkpoint import CheckpointError
from pretrain.fileio import atomic_write_json, sha256_json
from pretrain.provenance import device_description
from transfer import records as rec
from transfer.checkpoints import Backbone, load_backbone
from transfer.classification_data import (
    ClassificationData,
    DataLayoutError,
    apply_split,
    caltech_split,
    find_dataset_root,
    read_caltech101_classes,
    read_flowers102,
    read_imagenet_subset,
)
from transfer.distributed import DistContext, init_distributed

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "linear"
DATASETS = ("imagenet100", "caltech101", "flowers102")
TASK_OF = {"imagenet100": "linear_imagenet100", "caltech101": "logreg_caltech101", "flowers102": "logreg_flowers102"}
SPLIT_FILE = "caltech101_split.json"
DEFAULT_DATA_ROOT = Path("data")
DEFAULT_OUT_ROOT = Path("runs") / "linear"


class LinearEvalError(RuntimeError):
    """A user-facing problem with the inputs of a linear evaluation (message says what and how to fix)."""


# ----------------------------------------------------------------------------------------------- config


def resolve_config_path(dataset: str, config: str | Path) -> Path:
    """``paper``/``toy`` (-> ``configs/linear/<name>_<dataset>.yaml``), a name in that folder, or a path."""
    candidates = [Path(config), CONFIG_DIR / f"{config}_{dataset}.yaml", CONFIG_DIR / f"{config}.yaml",
                  CONFIG_DIR / str(config)]
    for path in candidates:
        if path.is_file():
            return path
    names = sorted({p.stem.rsplit("_", 1)[0] for p in CONFIG_DIR.glob(f"*_{dataset}.yaml")})
    raise LinearEvalError(f"config '{config}' not found (tried {', '.join(str(p) for p in candidates[:2])}); "
                          f"use a YAML file or one of: {', '.join(names)}")


def load_linear_config(dataset: str, config: str | Path = "paper", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config dict: the YAML plus ``key=value`` overrides (unknown keys are refused)."""
    if dataset not in DATASETS:
        raise LinearEvalError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    path = resolve_config_path(dataset, config)
    try:
        base = OmegaConf.load(path)
        OmegaConf.set_struct(base, True)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise LinearEvalError(f"bad config {path} or override {list(overrides)}: {str(err).splitlines()[0]}") from err
    if cfg.get("dataset") != dataset:
        raise LinearEvalError(f"config {path} is for dataset '{cfg.get('dataset')}', not '{dataset}'")
    changed = _protocol_overrides(OmegaConf.to_container(base, resolve=True), cfg, overrides)
    if changed and not any(o.split("=", 1)[0].strip() == "protocol" for o in overrides):
        # Numbers from a changed protocol are not those of the named one: the tables must keep them apart.
        cfg["protocol"] = "+".join([str(cfg["protocol"]), *changed])
    cfg["_source"] = str(path)
    return cfg


def _protocol_overrides(base: dict[str, Any], merged: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """``key=value`` for each override that changes a protocol value (``runtime.*`` does not)."""
    changed = []
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith("runtime.") or key in ("runtime", "protocol"):
            continue
        old, new = _lookup(base, key), _lookup(merged, key)
        if old != new:
            changed.append(f"{key}={json.dumps(new, separators=(',', ':')) if isinstance(new, list) else new}")
    return sorted(set(changed))


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def protocol_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of the config that decides the numbers (hashed into the record); runtime is left out."""
    return {k: v for k, v in cfg.items() if k not in ("runtime", "_source")}


# ------------------------------------------------------------------------------------------------- data


def read_dataset(dataset: str, data_root: str | Path, cfg: dict[str, Any], out: Path, write_split: bool = True
                 ) -> tuple[ClassificationData, dict[str, Any]]:
    """The dataset's splits, checked; for Caltech-101 the split is drawn (or read) and written to ``out``."""
    root = find_dataset_root(data_root, dataset)
    info: dict[str, Any] = {}
    if dataset == "imagenet100":
        data = read_imagenet_subset(root)
    elif dataset == "flowers102":
        data = read_flowers102(root)
    else:
        split_cfg = cfg["split"]
        everything = read_caltech101_classes(root, keep_background=bool(split_cfg["keep_background"]))
        split_file = cfg["runtime"].get("split_file")
        if split_file:
            try:
                split = json.loads(Path(split_file).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise DataLayoutError(f"cannot read split file {split_file}: {err}") from err
            for key in ("train_per_class", "val_fraction", "seed"):
                if split.get(key) != split_cfg[key]:
                    raise DataLayoutError(f"split file {split_file} was drawn with {key}={split.get(key)}, the "
                                          f"config says {split_cfg[key]}; make them agree or drop runtime.split_file")
            info["split_source"] = str(split_file)
        else:
            split = caltech_split(everything, int(split_cfg["train_per_class"]), float(split_cfg["val_fraction"]),
                                  int(split_cfg["seed"]))
            info["split_source"] = "drawn"
        data = apply_split(everything, split, source=str(split_file or "split"))
        if write_split:
            atomic_write_json(out / SPLIT_FILE, {"root": str(root), **split})
        info["split_file"] = str(out / SPLIT_FILE)
    info.update(data.summary())
    if data.notes:
        info["notes"] = data.notes
    return data, info


# ---------------------------------------------------------------------------------------------- the run


def default_out_dir(task: str, model_name: str, seed: int) -> Path:
    """``runs/linear/<task>/<name>__seed<N>`` (the name made file-safe as in record file names)."""
    safe = rec.record_filename(task, model_name, seed)[len(task) + 2:-len(".json")]
    return DEFAULT_OUT_ROOT / task / safe


def _record_path(out: Path, task: str, model_name: str, seed: int, record: str | Path | None) -> Path:
    return Path(record) if record else out / rec.record_filename(task, model_name, seed)


def _existing_record(path: Path, weights_sha: str, config: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """A valid finished record to reuse, None to (re)compute; refuse to replace good results silently."""
    if force or not path.exists():
        return None
    try:
        found = rec.read_record(path)
    except rec.RecordError:
        return None  # corrupt or half-known file: recompute (it is replaced atomically)
    if rec.is_valid_for(found, weights_sha, config):
        return found
    if found.get("status") == "ok":
        raise LinearEvalError(f"{path} already holds a finished record for other weights or another config; "
                              "pass --force to replace it, or choose another --out / --record")
    return None


def run_linear(
    dataset: str,
    weights: str | Path,
    *,
    data_root: str | Path | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    config: str | Path = "paper",
    overrides: Sequence[str] = (),
    name: str | None = None,
    preset: str = "custom",
    record: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``weights`` on ``dataset`` and return the record (also written to disk; see module docstring)."""
    timer = rec.RecordTimer()
    cfg = load_linear_config(dataset, config, overrides)
    if cache_dir is not None:
        cfg["runtime"]["cache_dir"] = str(cache_dir)
    task = TASK_OF[dataset]
    ctx = init_distributed(str(cfg["runtime"]["device"])) if dataset == "imagenet100" else _single_process(cfg)
    try:
        with torch_threads(cfg["runtime"].get("threads")):
            return _run(dataset, task, cfg, ctx, timer, weights, data_root=data_root, seed=seed, out=out, name=name,
                        preset=preset, record=record, force=force, progress=progress, on_epoch_end=on_epoch_end)
    finally:
        ctx.close()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch CPU threads inside the block (None: unchanged). On a shared CPU, OpenMP threads
    that wait for each other while other processes hold the cores make a run several times slower."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(dataset, task, cfg, ctx, timer, weights, *, data_root, seed, out, name, preset, record, force, progress,
         on_epoch_end) -> dict[str, Any]:
    """The body of :func:`run_linear` inside its process context and thread setting."""
    backbone = _load_weights(weights)
    model = rec.model_from_meta(backbone.meta, name)
    warnings = []
    if backbone.meta.get("finished") is False:
        warnings.append(f"{weights} is an unfinished pretraining checkpoint (epoch {backbone.meta.get('epoch')} of "
                        f"{backbone.meta.get('epochs')}); transfer tasks normally take the run's final.pth")
        if ctx.is_main:
            print(f"warning: {warnings[-1]}", file=sys.stderr)
    out = Path(out) if out else default_out_dir(task, model["name"], seed)
    data, data_info = read_dataset(dataset, data_root or DEFAULT_DATA_ROOT, cfg, out, write_split=ctx.is_main)
    config_for_record = {**protocol_config(cfg), "data": {"fingerprint": data.fingerprint(),
                                                          "classes": len(data.classes),
                                                          "images": data.summary()["images"]}}
    record_path = _record_path(out, task, model["name"], seed, record)
    existing = _existing_record(record_path, backbone.sha256, config_for_record, force)
    if existing is not None:
        if progress and ctx.is_main:
            print(f"skipped: {record_path} is a valid record for these weights and config (--force recomputes)")
        return existing
    if force and ctx.is_main:
        _discard_probe_state(out)
    ctx.barrier()
    setup_s = timer.elapsed()
    identity = {"weights_sha256": backbone.sha256, "config_hash": sha256_json(config_for_record), "seed": int(seed)}
    if dataset == "imagenet100":
        metrics, extra = _run_probe(backbone, data, cfg, out, identity, seed, ctx, progress, on_epoch_end)
    else:
        metrics, extra = _run_logreg(dataset, backbone, data, cfg, out, ctx, progress)
    extra = {"preset": preset, "data": data_info, "weights_notes": backbone.notes, "warnings": warnings,
             "timings_s": {"setup": round(setup_s, 3), "protocol": round(timer.elapsed() - setup_s, 3)}, **extra}
    result = rec.make_record(task=task, protocol=str(cfg["protocol"]), seed=seed, model=model,
                             weights_path=backbone.path, weights_sha256=backbone.sha256, metrics=metrics,
                             config=config_for_record, timer=timer, device=_device_text(ctx), extra=extra)
    if ctx.is_main:
        rec.write_record(record_path, result)
        if progress:
            shown = ", ".join(f"{k} = {v:.2f}" for k, v in metrics.items())
            print(f"{task} [{model['name']}, seed {seed}]: {shown}  ({result['wall_time_s']:.1f} s; record {record_path})")
    ctx.barrier()
    return result


def _single_process(cfg: dict[str, Any]) -> DistContext:
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LinearEvalError("the logistic-regression tasks run in one process; start them without torchrun")
    device = str(cfg["runtime"]["device"])
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))


def _load_weights(weights: str | Path) -> Backbone:
    path = Path(weights)
    try:
        stat = path.stat()
    except OSError as err:
        raise LinearEvalError(f"cannot evaluate {weights}: checkpoint not found ({err.strerror})") from err
    try:
        return _load_backbone_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except CheckpointError as err:
        raise LinearEvalError(f"cannot evaluate {weights}: {err}") from err


@functools.lru_cache(maxsize=2)
def _load_backbone_cached(path: str, size: int, mtime_ns: int) -> Backbone:
    # The benchmark driver runs the three tasks of a model in one process: read and check its file once.
    # (size, mtime) in the key: a rewritten file is read again. Callers never modify the returned trunk.
    return load_backbone(path)


def _device_text(ctx: DistContext) -> str:
    description = device_description(ctx.device)
    return f"{description} x{ctx.world_size} processes" if ctx.distributed else description


def _discard_probe_state(out: Path) -> None:
    from transfer.linear_probe import PROBE_CHECKPOINT

    (out / PROBE_CHECKPOINT).unlink(missing_ok=True)
    if (out / "tb").is_dir():
        shutil.rmtree(out / "tb")


def _run_probe(backbone, data, cfg, out, identity, seed, ctx, progress, on_epoch_end):
    from transfer.eval_transforms import normalization_of
    from transfer.frozen_encoder import FrozenEncoder
    from transfer.linear_probe import ProbeSettings, train_linear_probe

    settings = ProbeSettings.from_config(cfg["probe"], cfg["preprocess"])
    encoder = FrozenEncoder(backbone, ctx.device)
    runtime = cfg["runtime"]
    result = train_linear_probe(
        encoder, data, settings, normalize=normalization_of(backbone.meta), work_dir=out, identity=identity,
        seed=seed, ctx=ctx, num_workers=int(runtime["num_workers"]), progress=progress,
        tensorboard=bool(runtime.get("tensorboard", False)), on_epoch_end=on_epoch_end,
    )
    metrics = {"imagenet100_top1": result.top1, "imagenet100_top5": result.top5}
    extra = {"epochs": result.epochs, "resumed_from_epoch": result.resumed_from_epoch, "history": result.history,
             "backbone_sanity_check": f"{result.backbone_tensors_checked} tensors unchanged",
             "fc_checkpoint": result.fc_path, "world_size": ctx.world_size,
             "input_filter": backbone.input_filter}
    return metrics, extra


def _run_logreg(dataset, backbone, data, cfg, out, ctx, progress):
    from transfer.logreg_eval import evaluate_logreg

    return evaluate_logreg(dataset, backbone, data, cfg, out, ctx.device, progress)


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.linear",
        description="Linear evaluation of a pretrained ResNet: the MoCo linear probe on ImageNet-100 (also under "
        "torchrun) or Ericsson et al.'s logistic regression on Caltech-101 / Flowers-102. Writes one JSON record.",
        epilog="Layouts under --data-root: imagenet100/{train,val}/<wnid>/, caltech101/101_ObjectCategories/<class>/, "
        "flowers-102/{jpg,imagelabels.mat,setid.mat}. Configs: configs/linear/{paper,toy}_<dataset>.yaml; override "
        "any value with key=value (e.g. probe.lr=10 runtime.num_workers=2). Example: torchrun --nproc_per_node 8 -m "
        "transfer.linear --dataset imagenet100 --weights final.pth --data-root /data",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint: ours, MoCo, torchvision, ... (any "
                        "file `python -m transfer.convert` reads)")
    parser.add_argument("--data-root", type=Path, default=None, help=f"folder holding the datasets (default: {DEFAULT_DATA_ROOT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"work dir of the run (default: {DEFAULT_OUT_ROOT}/<task>/<name>__seed<N>)")
    parser.add_argument("--config", default="paper", help="paper | toy | a YAML file (default: paper)")
    parser.add_argument("--name", default=None, help="the record's model name (default: from the checkpoint metadata)")
    parser.add_argument("--preset", default="custom", help="benchmark preset stored in the record (default: custom)")
    parser.add_argument("--record", type=Path, default=None, help="where the JSON record goes (default: in --out)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (logistic regression; "
                        "default <out>/features; safe to share between runs)")
    parser.add_argument("--force", action="store_true", help="recompute even if a valid record exists; restart the probe")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def one_line(err: BaseException) -> str:
    """The message of an error, also when a DataLoader worker re-raised it with its traceback inside."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: overrides must look like key=value, got {bad}", file=sys.stderr)
        return 2
    previous = {signum: signal.signal(signum, _interrupt)  # a killed job says what was kept and how to go on
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _SIGNALLED.clear()


def _main(args: argparse.Namespace) -> int:
    try:
        run_linear(args.dataset, args.weights, data_root=args.data_root, seed=args.seed, out=args.out,
                   config=args.config, overrides=args.overrides, name=args.name, preset=args.preset,
                   record=args.record, force=args.force, progress=not args.quiet, cache_dir=args.cache_dir)
    except KeyboardInterrupt:
        return _interrupted()
    except (LinearEvalError, DataLayoutError, CheckpointError, ValueError, FloatingPointError, OSError) as err:
        if _SIGNALLED:  # e.g. "DataLoader worker is killed by signal": the signal, not the input, ended the run
            return _interrupted()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. ProbeStateError, BackboneChangedError
        if _SIGNALLED:
            return _interrupted()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


_SIGNALLED: list[int] = []


def _interrupt(signum, frame):
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> int:
    print("interrupted: no record written; rerun the same command to continue (the ImageNet-100 probe from "
          "its last finished epoch in probe_last.pth, logistic regression from its cached features), "
          "or add --force to start over", file=sys.stderr)
    return 143 if _SIGNALLED[:1] == [signal.SIGTERM] else 130  # the shell's codes, as pretrain and detection


if __name__ == "__main__":
    sys.exit(main())
