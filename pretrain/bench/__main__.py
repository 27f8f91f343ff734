"""python -m pretrain.bench [--scale toy|paper] [--arch A --batch B --size S] [--device cpu|cuda] [--steps N]

What saliency-guided masking costs on top of the encoder passes MoCo v2 needs (issue 9), measured three
ways in one run and written (atomically) to one JSON file, with readable tables on stdout:

1. steps: real training steps of the real engine (pretrain.engine.Trainer + the MoCo v2 method) for each
   variant, timed per phase: data, input filter, saliency, masking, encoder (query fwd+bwd, key fwd,
   hard-negative fwd), optimizer (+ momentum update), other; total, images/s, peak memory. Variants:
     plain            MoCo v2 without masking
     plain_passes     MoCo v2 without masking whose key encoder also encodes one unmasked copy of each key
                      view as a "hard negative": the same encoder passes as the masked method (the reference)
     hp, blur, mean   saliency-guided masking, each strategy, momentum saliency (the key encoder's forward)
     hp_frozen_cache  frozen network's whole-image maps, cached once, mapped onto each crop
     hp_frozen_step   frozen network forwarded on both views every step (the released code's way)
     hp_none          uniform saliency (random masking)
   overhead = (saliency + masking) / step time of plain_passes; target <= 5% for hp/blur/mean (momentum)
   and hp_frozen_cache. Each variant runs in its own process (its own peak memory). The frozen network is a
   random-init ResNet (--frozen-checkpoint for a real one): its weights do not change its speed.
   Batches come from the real loader (two-crop aug+ on the dataset's JPEGs), decoded before the timing
   (--data live keeps the loader running alongside).
2. masking: batched masking vs the per-sample, per-cell loop reference on a 64x3x224x224 batch with the
   same draws (outputs must be equal); target >= 20x.
3. loader: images/s of the real loader (configured num_workers) vs the fastest step's images/s; target >= 1x.
   At paper scale small source images are first copied at ImageNet size (500x375 JPEGs) so decoding costs
   what it would on ImageNet.

Scales: toy = configs/pretrain/toy (ResNet-18, 64 px, batch 64); paper = configs/pretrain/paper (ResNet-50,
224 px; batch 64 here). Rerunning with the same settings resumes (measured parts are kept); --force
measures again. Timings depend on the machine's load: the JSON records the load average. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrain.bench.report import loader_checks, loader_table, masking_table, overheads, steps_table
from pretrain.bench.variants import CONFIG_DIR, REFERENCE, VARIANTS, Variant, parse_variants

SCALES = {"toy": {"arch": "resnet18", "batch": 64, "size": 64},
          "paper": {"arch": "resnet50", "batch": 64, "size": 224}}
FORMAT = "masked-ssl-bench/v1"


class BenchError(RuntimeError):
    """Bad benchmark input; the message names the fix."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper",
                        help="which configs/pretrain/<scale>/ files the variants use (default paper)")
    parser.add_argument("--arch", help="backbone (default: resnet18 toy, resnet50 paper)")
    parser.add_argument("--batch", type=int, help="batch size (default 64)")
    parser.add_argument("--size", type=int, help="image size (default: 64 toy, 224 paper)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--parts", default="steps,masking,loader", help="which measurements (default all three)")
    parser.add_argument("--data-root", type=Path, help="ImageFolder root with train/ (default: the config's "
                        "data.root; e.g. the toy world's imagenet100/ from python -m transfer make-toy-data)")
    parser.add_argument("--data", choices=["predecoded", "live"], default="predecoded",
                        help="step batches decoded before the timing (default) or the loader running alongside")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--out", type=Path, help="result JSON (default runs/bench/pretrain_<scale>.json)")
    parser.add_argument("--work-dir", type=Path, help="run dirs, frozen checkpoint, saliency cache, resized "
                        "JPEGs (default: next to --out)")
    parser.add_argument("--frozen-checkpoint", type=Path,
                        help="frozen saliency network (default: a random-init ResNet of --arch in the work dir)")
    parser.add_argument("--masking-batch", type=int, default=64, help="masking micro-benchmark batch (64)")
    parser.add_argument("--masking-size", type=int, default=224, help="masking micro-benchmark size (224)")
    parser.add_argument("--masking-repeats", type=int, default=5)
    parser.add_argument("--loader-batches", type=int, default=8, help="timed loader batches (default 8)")
    parser.add_argument("--loader-jpeg-size", default="auto",
                        help="WxH to copy small source JPEGs to for the loader ('auto': 500x375 at paper scale "
                             "when the images are under 256 px; 'none': use them as they are)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every variant, e.g. --set train.amp=off (repeatable)")
    parser.add_argument("--force", action="store_true", help="measure again although --out holds results")
    args = parser.parse_args(argv)
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = Path("runs") / "bench" / f"pretrain_{args.scale}.json"
    if args.work_dir is None:
        args.work_dir = args.out.parent / f"work_{args.scale}"
    return args


# ------------------------------------------------------------------------------------------- settings

def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"steps", "masking", "loader"})
    if unknown or not parts:
        raise BenchError(f"--parts takes a comma list of steps, masking, loader; got {text!r}")
    return parts


def _data_root(args: argparse.Namespace) -> Path:
    if args.data_root is not None:
        root = args.data_root
    else:
        from pretrain.config import read_yaml_tree

        root = Path(str(read_yaml_tree(CONFIG_DIR / args.scale / "mocov2.yaml").data.root))
    if not (root / "train").is_dir():
        raise BenchError(f"no training images at {root / 'train'}: pass --data-root DIR (an ImageFolder root "
                         "with train/<class>/*.JPEG, e.g. the toy world's imagenet100/ made by "
                         "python -m transfer make-toy-data DIR)")
    return root.resolve()


def settings(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    return {"scale": args.scale, "arch": args.arch, "batch": args.batch, "size": args.size,
            "device": args.device, "steps": args.steps, "warmup": args.warmup, "data": args.data,
            "data_root": str(root), "threads": args.threads, "overrides": list(args.overrides),
            "frozen_checkpoint": str(args.frozen_checkpoint) if args.frozen_checkpoint else None,
            "masking": [args.masking_batch, args.masking_size, args.masking_repeats],
            "loader": [args.loader_batches, args.loader_jpeg_size]}


def machine(threads: int | None) -> dict[str, Any]:
    import torch

    from pretrain.provenance import code_version

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": threads or torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": list(os.getloadavg()), "code_version": code_version()}
    return info


def bn_splits(batch: int, wanted: int = 8) -> int:
    """Split batch-norm sub-batches for ``batch``: the configs' 8 when it divides the batch into sub-batches
    of at least 2 (batch-norm needs 2 values), else the largest divisor that does."""
    return max(s for s in range(1, wanted + 1) if batch % s == 0 and (batch // s >= 2 or s == 1))


def subset_size(images: int, root: Path) -> int:
    """``data.limit_train_images`` giving at least ``images`` (the subset is balanced over the classes)."""
    from pretrain.data import find_images

    classes = len(find_images(root, "train")[0])
    return math.ceil(images / classes) * classes


def variant_overrides(args: argparse.Namespace, variant: Variant, root: Path, frozen: Path | None) -> list[str]:
    images = subset_size((args.warmup + args.steps) * args.batch, root)
    values = [
        f"data.root={root}", f"data.batch_size={args.batch}", f"data.limit_train_images={images}",
        f"model.arch={args.arch}", f"augment.image_size={args.size}", "train.epochs=1",
        f"train.device={args.device}", "knn.enabled=false", "visualize.enabled=false", "log.progress=false",
        "log.every_steps=1", f"out_dir={args.work_dir / 'runs' / variant.name}",  # every step logs alike
    ]
    splits = bn_splits(args.batch)
    if splits != 8:
        values.append(f"mocov2.bn_splits={splits}")
    values += list(variant.overrides)
    if variant.frozen:
        values.append(f"saliency.checkpoint={frozen}")
    if variant.cached:
        values.append(f"saliency.cache_dir={args.work_dir / 'saliency_cache'}")
    return values + list(args.overrides)


def check_overrides(args: argparse.Namespace, variants: list[Variant], root: Path) -> None:
    """Resolve every variant's config here, so a bad --set fails once, now, not once per variant process."""
    from pretrain.config import load_config

    placeholder = args.work_dir / "frozen.pth"  # the frozen checkpoint is only made when the steps run
    for variant in variants:
        load_config(CONFIG_DIR / args.scale / variant.config, variant_overrides(args, variant, root, placeholder))


def frozen_checkpoint(args: argparse.Namespace) -> Path:
    if args.frozen_checkpoint is not None:
        if not args.frozen_checkpoint.is_file():
            raise BenchError(f"--frozen-checkpoint {args.frozen_checkpoint} does not exist")
        return args.frozen_checkpoint.resolve()
    from pretrain.random_init import random_init_checkpoint

    return random_init_checkpoint(args.work_dir / f"frozen_random_{args.arch}.pth", args.arch, seed=0).resolve()


# -------------------------------------------------------------------------------------------- parts

def run_steps(args: argparse.Namespace, variants: list[Variant], root: Path, result: dict[str, Any],
              save) -> None:
    from tqdm import tqdm

    frozen = frozen_checkpoint(args) if any(v.frozen for v in variants) else None
    steps = result.setdefault("steps", {})
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    bar = tqdm(variants, desc="variants", unit="variant", file=sys.stderr)
    for variant in bar:
        bar.set_postfix_str(variant.name)
        if "mean" in steps.get(variant.name, {}):
            continue  # measured by an interrupted run with the same settings
        spec = {"variant": variant.name, "config": str(CONFIG_DIR / args.scale / variant.config),
                "overrides": variant_overrides(args, variant, root, frozen), "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads or 0, "data": args.data,
                "extra_unmasked_passes": variant.extra_unmasked_passes}
        load = list(os.getloadavg())
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps(spec))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pretrain.bench.steps", str(spec_path), str(out_path)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0 or not out_path.exists():
                lines = (done.stderr or done.stdout).strip().splitlines()
                steps[variant.name] = {"variant": variant.name, "error": lines[-1] if lines else "failed",
                                       "log_tail": lines[-20:]}
                tqdm.write(f"{variant.name}: failed: {steps[variant.name]['error']}", file=sys.stderr)
            else:
                steps[variant.name] = json.loads(out_path.read_text())
                steps[variant.name]["wall_s"] = time.perf_counter() - started
        steps[variant.name]["load_average_before"] = load
        save()


def run_masking(args: argparse.Namespace, device: str, result: dict[str, Any], save) -> None:
    if "masking" in result:
        return
    from pretrain.bench.masking_speed import masking_benchmark

    result["masking"] = masking_benchmark(args.masking_batch, args.masking_size, repeats=args.masking_repeats,
                                          device=device)
    save()


def _jpeg_size(args: argparse.Namespace, root: Path) -> tuple[int, int] | None:
    if args.loader_jpeg_size == "none":
        return None
    if args.loader_jpeg_size == "auto":
        if args.scale != "paper":
            return None
        from PIL import Image

        from pretrain.data import find_images

        with Image.open(find_images(root, "train")[1][0][0]) as image:
            return (500, 375) if max(image.size) < 256 else None
    try:
        width, height = (int(v) for v in args.loader_jpeg_size.lower().split("x"))
    except ValueError as err:
        raise BenchError(f"--loader-jpeg-size takes WxH (e.g. 500x375), 'auto' or 'none', got "
                         f"{args.loader_jpeg_size!r}") from err
    return width, height


def run_loader(args: argparse.Namespace, root: Path, result: dict[str, Any], save) -> None:
    if "images_per_s" in result.get("loader", {}):
        return
    from pretrain.bench.loader_speed import imagenet_sized_copy, loader_batches, loader_benchmark
    from pretrain.config import load_config
    from pretrain.data import find_images

    config = CONFIG_DIR / args.scale / VARIANTS["hp"].config
    common = [f"data.batch_size={args.batch}", f"augment.image_size={args.size}", f"model.arch={args.arch}",
              "train.device=cpu", f"out_dir={args.work_dir / 'runs' / 'loader'}"]
    workers = int(load_config(config, [f"data.root={root}", *common, *args.overrides]).data.num_workers)
    batches = loader_batches(args.loader_batches, workers)
    needed = subset_size(batches * args.batch, root)
    size = _jpeg_size(args, root)
    loader_root = root
    if size is not None:
        per_class = needed // len(find_images(root, "train")[0])
        loader_root = imagenet_sized_copy(root, args.work_dir / f"jpeg_{size[0]}x{size[1]}", per_class, size)
    overrides = [f"data.root={loader_root}", f"data.limit_train_images={needed}", *common, *args.overrides]
    try:
        result["loader"] = loader_benchmark(config, overrides, batches)
        result["loader"]["resized_copy"] = list(size) if size else None
    except ValueError as err:
        result["loader"] = {"error": str(err)}
    save()


# ---------------------------------------------------------------------------------------------- main

def _load_previous(out: Path, current: dict[str, Any], force: bool) -> dict[str, Any] | None:
    if force or not out.exists():
        return None
    try:
        previous = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchError(f"{out} exists but is not a benchmark result ({err}); remove it or pass --force") from err
    if previous.get("format") != FORMAT or previous.get("settings") != current:
        raise BenchError(f"{out} holds results measured with other settings; pass --force to measure again "
                         "with these, or choose another --out")
    return previous


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    steps = result.get("steps", {})
    result["overhead"] = overheads(steps)
    result["loader_check"] = loader_checks(result.get("loader", {}), steps)
    targets = []
    for name, o in result["overhead"].items():
        if o["target"] is not None:
            targets.append({"target": f"{name}: saliency + masking <= {o['target']:.0%} of {REFERENCE}",
                            "value": o["overhead"], "pass": o["meets_target"]})
    masking = result.get("masking")
    if masking:
        targets.append({"target": f"batched masking >= {masking['target_speedup']:.0f}x the loop reference "
                                  "(every strategy and kind)", "value": masking["min_speedup"],
                        "pass": masking["min_speedup"] >= masking["target_speedup"]})
        targets.append({"target": "batched masking equals the loop reference", "value": masking["all_equal"],
                        "pass": masking["all_equal"]})
    if result["loader_check"]:
        c = result["loader_check"]
        targets.append({"target": "loader images/s >= step images/s", "value": c["ratio"], "pass": c["meets_target"]})
    result["targets"] = targets
    return result


def print_report(result: dict[str, Any]) -> None:
    s, m = result["settings"], result["machine"]
    print(f"pretrain.bench ({s['scale']} scale): {s['arch']}, batch {s['batch']}, {s['size']} px, device "
          f"{s['device']}, {m['threads']} thread(s), {s['steps']} timed + {s['warmup']} warm-up steps, "
          f"data {s['data']}; load average {m['load_average_start'][0]:.2f} at start, "
          f"{m.get('load_average_end', [float('nan')])[0]:.2f} at the end")
    if result.get("steps"):
        first = next((r for r in result["steps"].values() if "mean" in r), None)
        if first:
            print(f"steps on {first['device']}, {first['amp']}{', channels_last' if first['channels_last'] else ''}"
                  " (ms per step; encoder = query fwd+bwd + key fwd + hard-negative fwd; overhead = (saliency + "
                  f"masking) / {REFERENCE} step)")
        print(steps_table(result["steps"], result["overhead"]))
        print()
    if result.get("masking"):
        print(masking_table(result["masking"]))
        print()
    if result.get("loader"):
        print(loader_table({s["scale"]: result["loader"]}, {s["scale"]: result["loader_check"]}))
        print()
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {shown}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        parts = _parts(args.parts)
        variants = parse_variants(args.variants)
        if args.steps < 1 or args.warmup < 0:
            raise BenchError("--steps must be >= 1 and --warmup >= 0")
        if args.batch < 2:
            raise BenchError("--batch must be at least 2")
        root = _data_root(args)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda but CUDA is not available here; use --device cpu")
        if "steps" in parts:
            check_overrides(args, variants, root)
        current = settings(args, root)
        previous = _load_previous(args.out, current, args.force)
        result = previous or {"format": FORMAT, "settings": current, "machine": machine(args.threads)}
        args.work_dir.mkdir(parents=True, exist_ok=True)
        from pretrain.fileio import atomic_write_json

        def save() -> None:
            result["machine"]["load_average_end"] = list(os.getloadavg())
            atomic_write_json(args.out, summarize(result))

        if "steps" in parts:
            run_steps(args, variants, root, result, save)
        if "masking" in parts:
            run_masking(args, args.device, result, save)
        if "loader" in parts:
            run_loader(args, root, result, save)
        save()
    except (BenchError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (measured variants are kept)", file=sys.stderr)
        return 130
    print_report(result)
    print(f"\nwritten: {args.out}")
    failed = [name for name, r in result.get("steps", {}).items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
