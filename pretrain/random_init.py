"""``python -m pretrain.random_init OUT.pth``: a randomly initialised ResNet as a suite checkpoint.

Every table carries a "Random init" sanity row: transfer from an untrained backbone tells how much of a
result the pretraining earned. The checkpoint has the same format and metadata as a trained one
(``method: random``), so the converter and every transfer runner take it unchanged. The weights come
from torchvision's default initialisation under ``--seed``; the same seed gives the same weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.backbones import FEATURE_DIMS, build_resnet, trunk_state_dict
from pretrain.checkpoint import load_checkpoint, make_meta, save_checkpoint


def random_init_checkpoint(out: str | Path, arch: str = "resnet50", seed: int = 0, image_size: int = 224,
                           force: bool = False) -> Path:
    """Write a random-init checkpoint; an existing one with the same arch and seed is kept as is."""
    out = Path(out)
    if out.exists() and not force:
        existing = load_checkpoint(out)["meta"]
        wanted = ("random", arch, seed, image_size)
        if (existing.get("method"), existing.get("arch"), existing.get("seed"), existing.get("image_size")) == wanted:
            return out
        raise FileExistsError(f"{out} exists and is not a random-init {arch} with seed {seed} and image size "
                              f"{image_size}; choose another path or pass --force to replace it")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_resnet(arch)
    finally:
        torch.random.set_rng_state(generator_state)
    meta = make_meta(arch=arch, method="random", image_size=image_size, seed=seed,
                     config={"method": "random", "arch": arch, "seed": seed}, epoch=0, epochs=0, finished=True)
    save_checkpoint(out, trunk_state_dict(model), meta)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.random_init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output checkpoint (.pth)")
    parser.add_argument("--arch", default="resnet50", choices=sorted(FEATURE_DIMS),
                        help="torchvision ResNet to initialise (default: resnet50)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation (default: 0)")
    parser.add_argument("--image-size", type=int, default=224, help="recorded in the metadata only")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        path = random_init_checkpoint(args.out, args.arch, args.seed, args.image_size, args.force)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror}): choose a writable path", file=sys.stderr)
        return 2
    print(f"random-init {args.arch} (seed {args.seed}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
