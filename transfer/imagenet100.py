"""Build ImageNet-100 (the CMC 100-class subset) from a full ImageNet folder.

    python -m transfer make-imagenet100 IMAGENET_DIR OUT [--classes FILE] [--copy] [--force]

``IMAGENET_DIR`` is the usual ImageFolder layout of ILSVRC-2012, ``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG`` (the raw validation tarball is flat: sort it into class folders first, e.g. with
the widely used ``valprep.sh``). ``OUT`` gets ``train/`` and ``val/`` with one entry per listed class:
a symbolic link to the source class folder (default: instant, no extra disk) or a copy (``--copy``),
plus ``imagenet100.json`` describing what was built (written last: its presence marks a complete folder).
Every listed class is checked (present in both splits, with images) before anything is written, and the
result is assembled in a staging folder and moved into place, so an interrupted build leaves no half
dataset behind. ``python -m transfer.linear --dataset imagenet100`` reads ``OUT`` (or any folder of the
same layout).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretrain.fileio import atomic_write_json
from pretrain.provenance import utc_now
from transfer.classification_data import (
    IMAGENET100_CLASS_LIST,
    DataLayoutError,
    class_folders,
    list_images,
    read_class_list,
)

MANIFEST = "imagenet100.json"
SPLITS = ("train", "val")


def check_imagenet_source(imagenet: Path, wnids: list[str]) -> dict[str, dict[str, int]]:
    """Images per class and split of the listed classes; a DataLayoutError naming every problem found."""
    if not imagenet.is_dir():
        raise DataLayoutError(f"ImageNet folder {imagenet} does not exist")
    for split in SPLITS:
        if not (imagenet / split).is_dir():
            found = class_folders(imagenet)[:8]
            raise DataLayoutError(f"{imagenet} has no {split}/ folder (found: {found}); point at the folder that "
                                  "holds train/<wnid>/ and val/<wnid>/ (e.g. .../ILSVRC/Data/CLS-LOC)")
    if not class_folders(imagenet / "val") and list_images(imagenet / "val"):
        raise DataLayoutError(f"{imagenet / 'val'} holds the images directly (the raw ILSVRC val layout); sort them "
                              "into val/<wnid>/ class folders first (e.g. with ImageNet's valprep.sh)")
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    problems = []
    for split in SPLITS:
        present = set(class_folders(imagenet / split))
        for wnid in wnids:
            if wnid not in present:
                problems.append(f"{split}/{wnid} is missing")
                continue
            counts[split][wnid] = len(list_images(imagenet / split / wnid))
            if counts[split][wnid] == 0:
                problems.append(f"{split}/{wnid} has no images")
    if problems:
        raise DataLayoutError(f"{imagenet} cannot give ImageNet-100: {len(problems)} problems, e.g. "
                              f"{'; '.join(problems[:5])}. Is it the full ILSVRC-2012 in train/<wnid>/, val/<wnid>/?")
    return counts


def build_imagenet100(imagenet: str | os.PathLike, out: str | os.PathLike, class_list: str | os.PathLike = IMAGENET100_CLASS_LIST,
                      copy: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``out/{train,val}/<wnid>`` for the listed classes (links, or copies); return the manifest."""
    imagenet, out = Path(imagenet).expanduser().resolve(), Path(out).expanduser()
    wnids = read_class_list(class_list)
    counts = check_imagenet_source(imagenet, wnids)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --force to replace its train/, val/")
    if out.resolve() in (imagenet, *imagenet.parents):
        raise DataLayoutError(f"{out} is the ImageNet folder itself (or holds it); choose a separate output folder")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".imagenet100-staging-") as staging:
        stage = Path(staging)
        jobs = [(split, wnid) for split in SPLITS for wnid in wnids]
        for split, wnid in tqdm(jobs, desc="copying classes" if copy else "linking classes", unit="class",
                                disable=not progress):
            source, target = imagenet / split / wnid, stage / split / wnid
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                shutil.copytree(source, target)
            else:
                target.symlink_to(source, target_is_directory=True)
        for entry in (*SPLITS, MANIFEST):
            old = out / entry
            if old.is_symlink() or old.is_file():
                old.unlink()
            elif old.is_dir():
                shutil.rmtree(old)
        for split in SPLITS:
            (stage / split).rename(out / split)
    manifest = {"source": str(imagenet), "class_list": str(class_list), "classes": wnids,
                "mode": "copy" if copy else "symlink", "created": utc_now(),
                "images": {split: sum(counts[split].values()) for split in SPLITS}, "per_class": counts}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transfer make-imagenet100",
        description="Build ImageNet-100 (the CMC class subset) from a full ImageNet folder: OUT/{train,val}/<wnid> "
        "as symbolic links to the source class folders (default) or copies.",
    )
    parser.add_argument("imagenet", type=Path, help="full ImageNet folder with train/<wnid>/ and val/<wnid>/")
    parser.add_argument("out", type=Path, help="output folder (must be empty unless --force)")
    parser.add_argument("--classes", type=Path, default=IMAGENET100_CLASS_LIST,
                        help="class list, one wnid per line (default: the ImageNet-100 list shipped with the suite)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking the class folders")
    parser.add_argument("--force", action="store_true", help="replace train/, val/ of an existing OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = build_imagenet100(args.imagenet, args.out, args.classes, copy=args.copy, force=args.force)
    except (DataLayoutError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ImageNet-100 ({len(manifest['classes'])} classes, {manifest['images']['train']} train / "
          f"{manifest['images']['val']} val images, {manifest['mode']}) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
