"""``python -m transfer.convert INPUT OUTPUT.pkl``: any supported checkpoint -> detectron2 weights.

The trunk is found by :func:`transfer.checkpoints.load_backbone` (our checkpoints, MoCo, SimCLR ports,
torchvision, solo-learn/lightly ``backbone.``, DDP ``module.``, Lightning, detectron2 files; ``--prefix``
for anything else), renamed to detectron2's names (:mod:`transfer.d2names`), and written as::

    {"model": {detectron2 name: float32 numpy array}, "__author__": "masked-ssl ...",
     "matching_heuristics": True,
     "masked_ssl": {"meta": {arch, method, masking, strategy, mask_branch, input_filter, image_size, seed,
                             normalize, saliency_source}, "source_sha256", "source_path", "source_format",
                    "prefix", "container", "preprocessing", "code_version", "converted"}}

detectron2 ignores top-level keys other than "model" (its checkpointer hands them back unused), so the
``masked_ssl`` block lets the detection runner apply the right input filter from the ``.pkl`` alone.

Before the file appears under its name it is verified (``--verify``, on by default): loaded into the
detectron2 models the suite trains and compared tensor by tensor with the source
(:mod:`transfer.verify`). A JSON report lists every source tensor (mapped to which detectron2 name, or
dropped and why), counts, the input's sha256, the architecture and the preprocessing the weights expect.
Nothing is written when anything fails. An existing output converted from the same input is kept
("up to date"); one from a different input is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import IMAGENET_NORMALIZE, CheckpointError
from pretrain.fileio import atomic_torch_save, atomic_write_bytes, atomic_write_json, sha256_file
from pretrain.provenance import code_version, utc_now
from transfer.checkpoints import FORMAT_HELP, FORMATS, PRETRAIN_META_FIELDS, Backbone, load_backbone
from transfer.d2names import is_bn_counter, torchvision_to_detectron2_names
from transfer.safe_pickle import dumps_portable, load_detectron2_pickle

__all__ = ["convert_to_detectron2", "export_torchvision", "torchvision_to_detectron2_names",
           "load_detectron2_pickle", "conversion_provenance", "detectron2_weights", "expected_preprocessing", "main"]

META_FIELDS = (*PRETRAIN_META_FIELDS, "normalize", "saliency_source")
DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


class OutputExistsError(CheckpointError):
    """The output exists and was made from another input (or cannot be read); pass ``--force``."""


def detectron2_weights(backbone: Backbone) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({detectron2 name: float32 array}, {flat source key: detectron2 name}) for a loaded trunk."""
    names = torchvision_to_detectron2_names(backbone.state_dict, backbone.arch)
    weights = {d2: backbone.state_dict[tv].detach().cpu().numpy().astype(np.float32, copy=True)
               for tv, d2 in names.items()}
    mapping = {backbone.key_map.get(tv, tv): d2 for tv, d2 in names.items()}
    return weights, mapping


def expected_preprocessing(backbone: Backbone) -> dict[str, Any]:
    """How images must be prepared for these weights, in detectron2 terms and in torchvision terms."""
    normalize = backbone.meta.get("normalize") or dict(IMAGENET_NORMALIZE)
    pixel_mean = [round(255.0 * float(m), 4) for m in normalize["mean"]]
    pixel_std = [round(255.0 * float(s), 4) for s in normalize["std"]]
    ours = backbone.meta.get("method") != "external"
    return {
        "input_format": "RGB",
        "normalize": {"mean": list(normalize["mean"]), "std": list(normalize["std"])},
        "pixel_mean": pixel_mean,
        "pixel_std": pixel_std,
        "stride_in_1x1": False,
        "input_filter": backbone.input_filter,
        "image_size": backbone.meta.get("image_size"),
        "source": "checkpoint metadata" if ours else
                  "assumed: third-party checkpoints carry no preprocessing metadata; torchvision convention",
        "detectron2_config": {
            "INPUT.FORMAT": "RGB",
            "MODEL.PIXEL_MEAN": pixel_mean,
            "MODEL.PIXEL_STD": pixel_std,
            "MODEL.RESNETS.DEPTH": DEPTH[backbone.arch],
            "MODEL.RESNETS.STRIDE_IN_1X1": False,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if DEPTH[backbone.arch] < 50 else 256,
        },
    }


def _meta_subset(backbone: Backbone) -> dict[str, Any]:
    return {k: backbone.meta.get(k) for k in META_FIELDS if k in backbone.meta or k in PRETRAIN_META_FIELDS}


def _provenance(backbone: Backbone) -> dict[str, Any]:
    return {
        "meta": _meta_subset(backbone),
        "source_sha256": backbone.sha256,
        "source_path": str(Path(backbone.path).resolve()),
        "source_format": backbone.source_format,
        "prefix": backbone.prefix,
        "container": backbone.container,
        "arch": backbone.arch,
        "preprocessing": expected_preprocessing(backbone),
        "code_version": code_version(),
        "converted": utc_now(),
    }


def _architecture(arch: str) -> dict[str, Any]:
    from pretrain.backbones import BLOCKS_PER_STAGE, BOTTLENECK_ARCHS

    return {"arch": arch, "depth": DEPTH[arch], "block": "Bottleneck" if arch in BOTTLENECK_ARCHS else "BasicBlock",
            "blocks_per_stage": list(BLOCKS_PER_STAGE[arch])}


def build_report(backbone: Backbone, mapping: dict[str, str], format_requested: str,
                 prefix_requested: str | None) -> dict[str, Any]:
    """Everything about one conversion except the output and verification sections."""
    dropped = dict(backbone.dropped_reasons)
    for tv, source in backbone.key_map.items():
        if is_bn_counter(tv):
            dropped[source] = "BatchNorm num_batches_tracked counter (not a weight; detectron2 does not load it)"
    accounted = len(mapping) + len(dropped)
    if accounted != backbone.source_tensor_count or set(mapping) & set(dropped):
        raise CheckpointError(f"internal error: {accounted} keys accounted for, {backbone.source_tensor_count} "
                              "tensors in the file")
    params = sum(1 for d2 in mapping.values() if not d2.endswith(("running_mean", "running_var")))
    return {
        "report_version": 1,
        "input": {
            "path": str(Path(backbone.path).resolve()),
            "sha256": backbone.sha256,
            "size_bytes": Path(backbone.path).stat().st_size,
            "format": backbone.source_format,
            "format_requested": format_requested,
            "prefix_requested": prefix_requested,
            "container": backbone.container,
            "prefix": backbone.prefix,
            "key_prefix": backbone.key_prefix,
        },
        "choice": {"notes": list(backbone.notes), "candidates": list(backbone.candidates)},
        "architecture": _architecture(backbone.arch),
        "meta": _meta_subset(backbone),
        "preprocessing": expected_preprocessing(backbone),
        "counts": {
            "source_tensors": backbone.source_tensor_count,
            "mapped": len(mapping),
            "dropped": len(dropped),
            "trunk_parameters": params,
            "trunk_bn_buffers": len(mapping) - params,
            "dropped_by_reason": dict(collections.Counter(dropped.values()).most_common()),
        },
        "mapping": dict(mapping),
        "dropped": dict(sorted(dropped.items())),
        "code_version": code_version(),
        "created": utc_now(),
    }


def convert_to_detectron2(path: str | os.PathLike, output_pkl: str | os.PathLike, format: str = "auto",
                          prefix: str | None = None, verify: bool = True, report_path: str | os.PathLike | None = None,
                          force: bool = False, export_torchvision_path: str | os.PathLike | None = None,
                          ) -> dict[str, Any]:
    """Convert ``path`` to a detectron2 ``.pkl`` (see module docstring); return the report.

    ``report_path`` defaults to ``<output stem>.report.json`` beside the output. Raises
    :class:`~pretrain.checkpoint.CheckpointError` (nothing written) if the input cannot be converted or
    verification fails, and :class:`OutputExistsError` if ``output_pkl`` exists from another input.
    """
    output_pkl = Path(output_pkl)
    if output_pkl.suffix != ".pkl":
        raise ValueError(f"the detectron2 output must end in .pkl (detectron2 picks its reader by suffix): {output_pkl}")
    report_path = Path(report_path) if report_path else output_pkl.with_suffix(".report.json")
    outputs = [(output_pkl, "output"), (report_path, "report")]
    if export_torchvision_path is not None:
        outputs.append((Path(export_torchvision_path), "--export-torchvision output"))
    for output, what in outputs:
        _check_output_path(output, path, what)
    backbone = load_backbone(path, format=format, prefix=prefix)
    weights, mapping = detectron2_weights(backbone)
    report = build_report(backbone, mapping, format, prefix)
    expected = {d2: torch.from_numpy(array) for d2, array in weights.items()}

    status = _existing_output_status(output_pkl, backbone, force)
    if status == "up-to-date":
        report["status"] = "up-to-date (existing output kept)"
        report["verification"] = _verify(output_pkl, backbone.arch, expected) if verify else {"skipped": True}
    else:
        payload = {"model": weights, "__author__": f"masked-ssl {code_version()}", "matching_heuristics": True,
                   "masked_ssl": _provenance(backbone)}
        temporary = output_pkl.with_name(f".{output_pkl.stem}.{os.getpid()}.tmp.pkl")
        try:
            atomic_write_bytes(temporary, dumps_portable(payload))
            report["verification"] = _verify(temporary, backbone.arch, expected) if verify else {"skipped": True}
            os.replace(temporary, output_pkl)
        finally:
            with contextlib.suppress(OSError):  # must not mask the error that stopped the write
                os.unlink(temporary)
        report["status"] = "converted"
    report["output"] = {"detectron2_pkl": str(output_pkl.resolve()), "sha256": sha256_file(output_pkl),
                        "report": str(report_path.resolve())}
    if export_torchvision_path is not None:
        report["output"]["torchvision_pth"] = _write_torchvision(backbone, Path(export_torchvision_path), force)
    atomic_write_json(report_path, report)
    return report


def _check_output_path(output: Path, source: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output that would replace the input or that cannot be written.

    Checked up front because the failures otherwise come late (after loading and verifying) and as raw
    OS errors, and because ``--force`` over the input would destroy the weights being converted (and,
    for a ``.pkl`` input, the link to the checkpoint it was made from).
    """
    output, source = Path(output), Path(source)
    if output.is_dir():
        raise CheckpointError(f"the {what} {output} is a directory; pass a file path")
    if output.exists() and source.is_file() and os.path.samefile(output, source):
        raise CheckpointError(f"the {what} {output} is the input checkpoint itself; writing it would replace the "
                              "weights being converted. Choose another output path")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # missing folders are created when the output is written
    if not folder.is_dir():
        raise CheckpointError(f"cannot write the {what} {output}: {folder} is a file, not a folder. "
                              "Choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write the {what} {output}: no write permission in {folder}. "
                              "Choose another output path")


def _verify(pkl: Path, arch: str, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        from transfer.verify import verify_detectron2

        return verify_detectron2(pkl, arch, expected=expected)
    except ModuleNotFoundError as err:
        raise CheckpointError(f"cannot verify the conversion: {err} Or pass --no-verify (verify=False) to "
                              "convert without loading the result into detectron2.") from err


def conversion_provenance(pkl_path: str | os.PathLike) -> dict[str, Any]:
    """The ``masked_ssl`` block of a converted ``.pkl`` (meta with input filter, source sha256 ...);
    ``{}`` for detectron2 files this converter did not write. Read with the restricted unpickler."""
    return dict(load_detectron2_pickle(pkl_path).get("masked_ssl") or {})


def _existing_output_status(output_pkl: Path, backbone: Backbone, force: bool) -> str:
    if force or not output_pkl.exists():
        return "write"
    try:
        existing = load_detectron2_pickle(output_pkl).get("masked_ssl") or {}
    except CheckpointError as err:
        raise OutputExistsError(f"{output_pkl} exists and cannot be read ({err}); pass --force to replace it") from err
    same = (existing.get("source_sha256") == backbone.sha256 and existing.get("prefix") == backbone.prefix
            and existing.get("container") == backbone.container)
    if not same:
        raise OutputExistsError(
            f"{output_pkl} exists and was converted from another checkpoint "
            f"({existing.get('source_path', 'unknown source')}, sha256 {str(existing.get('source_sha256'))[:12]}...). "
            "Choose another output name or pass --force to replace it."
        )
    return "up-to-date"


def _write_torchvision(backbone: Backbone, output: Path, force: bool) -> dict[str, Any]:
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to replace it")
    atomic_torch_save({k: v.clone() for k, v in backbone.state_dict.items()}, output)
    return {"path": str(output.resolve()), "sha256": sha256_file(output), "tensors": len(backbone.state_dict),
            "arch": backbone.arch, "note": "torchvision ResNet trunk state_dict without fc: "
                                           "model.load_state_dict(sd, strict=False) leaves only fc missing"}


def export_torchvision(path: str | os.PathLike, output_pth: str | os.PathLike, format: str = "auto",
                       prefix: str | None = None, force: bool = False) -> dict[str, Any]:
    """Write the trunk of any supported checkpoint as a plain torchvision ``state_dict`` (no fc)."""
    _check_output_path(Path(output_pth), path, "output")
    backbone = load_backbone(path, format=format, prefix=prefix)
    return _write_torchvision(backbone, Path(output_pth), force)


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    formats = "\n".join(f"  {name:<12} {FORMAT_HELP[name]}" for name in FORMATS)
    parser = argparse.ArgumentParser(
        prog="python -m transfer.convert",
        description="Convert a ResNet checkpoint (ours or third-party) to detectron2 weights (.pkl), verified.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"formats:\n{formats}\n\nexit status: 0 converted or up to date, 1 refused (message says why), "
               "2 bad arguments.\nexample: python -m transfer.convert moco_v2_800ep.pth.tar moco.pkl --report moco.json",
    )
    parser.add_argument("input", type=Path, help="checkpoint to read (.pth/.pt/.ckpt/.tar/.pkl)")
    parser.add_argument("output", type=Path, help="detectron2 weights to write (.pkl)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="input layout (default: auto)")
    parser.add_argument("--prefix", default=None,
                        help="key prefix of the trunk, e.g. 'module.encoder_q.' (overrides auto-detection)")
    parser.add_argument("--report", type=Path, default=None,
                        help="where to write the JSON report (default: OUTPUT with .report.json)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="load the result into detectron2 C4/FPN models and compare every tensor (default: on)")
    parser.add_argument("--export-torchvision", type=Path, default=None, metavar="OUT.pth",
                        help="also write the trunk as a plain torchvision state_dict")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transfer.d2compat import silence_import_warnings

    silence_import_warnings()
    try:
        report = convert_to_detectron2(args.input, args.output, format=args.format, prefix=args.prefix,
                                       verify=args.verify, report_path=args.report, force=args.force,
                                       export_torchvision_path=args.export_torchvision)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # what the up-front path checks cannot foresee: a full disk, a read-only mount
        print(f"error: cannot write the outputs ({err}). Free space or choose an output path in a writable "
              "folder", file=sys.stderr)
        return 1
    print(_summary(report))
    return 0


def _summary(report: dict[str, Any]) -> str:
    source, counts = report["input"], report["counts"]
    prep = report["preprocessing"]
    lines = [
        f"input:    {source['path']} (sha256 {source['sha256'][:16]}..., format {source['format']})",
        f"trunk:    '{source['key_prefix']}' -> {report['architecture']['arch']}"
        + "".join(f"\n          {note}" for note in report["choice"]["notes"][1:]),
        f"mapped:   {counts['mapped']} tensors to detectron2 names; dropped {counts['dropped']}"
        + "".join(f"\n          {n:>5}  {reason}" for reason, n in counts["dropped_by_reason"].items()),
        f"expects:  {prep['input_format']}, PIXEL_MEAN {prep['pixel_mean']}, PIXEL_STD {prep['pixel_std']}, "
        f"STRIDE_IN_1X1 False, input filter {prep['input_filter']}",
    ]
    verification = report["verification"]
    if verification.get("skipped"):
        lines.append("verify:   skipped (--no-verify)")
    else:
        lines.append("verify:   " + "; ".join(f"{layout}: {r['summary']}" for layout, r in verification["models"].items()))
    lines.append(f"{report['status']}: {report['output']['detectron2_pkl']}")
    if "torchvision_pth" in report["output"]:
        lines.append(f"torchvision state_dict: {report['output']['torchvision_pth']['path']}")
    lines.append(f"report:   {report['output']['report']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
