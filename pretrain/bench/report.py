"""The benchmark's derived numbers (overheads, target checks) and its printed tables."""

from __future__ import annotations

from typing import Any

from pretrain.bench.variants import REFERENCE, VARIANTS

MS = 1000.0


def overheads(steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: (saliency + masking) / the reference's step time, and the related ratios."""
    reference = steps.get(REFERENCE)
    if not reference or "mean" not in reference:
        return {}
    base = reference["mean"]["total"]
    out = {}
    for name, result in steps.items():
        if "mean" not in result:
            continue
        mean = result["mean"]
        target = VARIANTS[name].overhead_target if name in VARIANTS else None
        saliency_masking = mean["saliency"] + mean["masking"]
        ratio = saliency_masking / base
        out[name] = {
            "saliency_masking_s": saliency_masking,
            "overhead": ratio,  # the measure
            "overhead_with_filter": (saliency_masking + mean["input_filter"]) / base,
            "step_time_ratio": mean["total"] / base,  # whole step vs the reference step
            "target": target,
            "meets_target": None if target is None else ratio <= target,
        }
    return out


def loader_checks(loader: dict[str, Any], steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Does the loader deliver at least what the fastest measured step consumes?"""
    rates = {name: r["images_per_s"] for name, r in steps.items() if "images_per_s" in r}
    if not rates or "images_per_s" not in loader:
        return {}
    fastest = max(rates, key=rates.get)
    return {"fastest_step_variant": fastest, "step_images_per_s": rates[fastest],
            "loader_images_per_s": loader["images_per_s"],
            "ratio": loader["images_per_s"] / rates[fastest],
            "meets_target": loader["images_per_s"] >= rates[fastest]}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([line, "-" * len(line), *body])


def _verdict(flag: bool | None) -> str:
    return "-" if flag is None else ("PASS" if flag else "FAIL")


def steps_table(steps: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> str:
    header = ["variant", "data", "filter", "saliency", "masking", "encoder", "optim", "other", "total ms",
              "img/s", "peak MiB", "overhead", "target"]
    rows = []
    for name, r in steps.items():
        if "mean" not in r:
            rows.append([name, *(["-"] * 11), f"error: {r.get('error', '?')[:60]}"])
            continue
        m = r["mean"]
        o = over.get(name, {})
        rows.append([
            name, *(f"{m[k] * MS:.1f}" for k in ("data", "input_filter", "saliency", "masking", "encoder")),
            f"{(m['optimizer'] + m['momentum_update']) * MS:.1f}", f"{(m['other'] + m['loss']) * MS:.1f}",
            f"{m['total'] * MS:.0f}", f"{r['images_per_s']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{o['overhead'] * 100:.2f}%" if o else "-",
            _verdict(o.get("meets_target")) + (f" (<= {o['target'] * 100:.0f}%)" if o.get("target") else ""),
        ])
    return _table(header, rows)


def masking_table(masking: dict[str, Any]) -> str:
    header = ["strategy", "kind", "draw ms", "fill ms", "batched ms", "loop ms", "speedup", "w/o fill", "bound",
              "equal", "target"]
    rows = [[r["strategy"], r["kind"], f"{r['draw_s'] * MS:.1f}", f"{r['fill_s'] * MS:.1f}",
             f"{r['batched_s'] * MS:.1f}", f"{r['reference_s'] * MS:.1f}", f"{r['speedup']:.2f}x",
             f"{r['speedup_without_fill']:.2f}x", f"{r['speedup_bound']:.2f}x", str(r["equal"]),
             f"{_verdict(r['meets_target'])} (>= {masking['target_speedup']:.0f}x)"] for r in masking["rows"]]
    shape = "x".join(map(str, masking["shape"]))
    return (f"masking one {shape} batch on {masking['device']} (median of {masking['repeats']}; clone of the "
            f"batch {masking['clone_s'] * MS:.1f} ms; bound = loop / clone)\n" + _table(header, rows))


def loader_table(loaders: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]]) -> str:
    header = ["scale", "JPEG px", "crop", "batch", "workers", "loader img/s", "step img/s", "ratio", "target"]
    rows = []
    for scale, r in loaders.items():
        if "images_per_s" not in r:
            rows.append([scale, *(["-"] * 7), f"error: {r.get('error', '?')[:60]}"])
            continue
        c = checks.get(scale, {})
        rows.append([scale, "x".join(map(str, r["source_image_size"])), str(r["image_size"]), str(r["batch"]),
                     str(r["num_workers"]), f"{r['images_per_s']:.1f}",
                     f"{c['step_images_per_s']:.1f} ({c['fastest_step_variant']})" if c else "-",
                     f"{c['ratio']:.1f}x" if c else "-", _verdict(c.get("meets_target")) + " (>= 1x)"])
    return _table(header, rows)
