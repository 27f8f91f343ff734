"""``python -m transfer.tables``: numbers in the right cells, never mixed, never invented, rendered alike.

Synthetic records are written through ``transfer.records.make_record`` (the runners' own path), plus
hand-made failed and corrupt files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transfer.records import TASKS, make_record, record_filename, write_record
from transfer.results_data import TablesInputError, collect
from transfer.table_layout import load_paper_reference
from transfer.table_render import markdown_body, render_latex
from transfer.tables import build_tables, main

PAPER = load_paper_reference()
HP = {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
MODELS = {  # short name -> model fields
    "supervised": {"base": "supervised"},
    "random": {"base": "random"},
    "moco": {"base": "mocov2"},
    "moco_mscn": {
        "base": "mocov2",
        "masking": "mscn",
        "strategy": "hp",
        "mask_branch": "query",
        "input_filter": HP,
    },
    "moco_hp": {
        "base": "mocov2",
        "masking": "saliency",
        "strategy": "hp",
        "mask_branch": "query",
        "input_filter": HP,
    },
    "moco_blur": {"base": "mocov2", "masking": "saliency", "strategy": "blur", "mask_branch": "query"},
    "moco_hp_key": {
        "base": "mocov2",
        "masking": "saliency",
        "strategy": "hp",
        "mask_branch": "key",
        "input_filter": HP,
    },
    "simclr": {"base": "simclr"},
    "simclr_mean": {"base": "simclr", "masking": "saliency", "strategy": "mean", "mask_branch": "query"},
    "simclr_adios": {"base": "simclr", "masking": "adios", "mask_branch": "query"},
    "thirdparty": {"base": "external", "name": "torchvision-R18"},
}


def model(short: str) -> dict:
    fields = {
        "masking": "none",
        "strategy": None,
        "mask_branch": None,
        "arch": "resnet18",
        "input_filter": {"name": "none"},
        "name": short,
        **MODELS[short],
    }
    return fields


def write_result(
    root: Path,
    short: str,
    task: str,
    seed: int,
    value: float | dict | None = None,
    *,
    status: str = "ok",
    preset: str | None = "toy",
    protocol: str | None = None,
    finished: str | None = None,
    subdir: str = "records",
) -> Path:
    """One record for ``short`` on ``task``; every metric of the task gets ``value`` unless a dict is given."""
    metrics = {}
    if status == "ok":
        metrics = value if isinstance(value, dict) else {m: float(value) for m in TASKS[task]}
    record = make_record(
        task=task,
        protocol=protocol or f"{preset or 'manual'}_{task}",
        seed=seed,
        model=model(short),
        weights_path=f"/ckpt/{short}_{seed}.pth",
        weights_sha256=f"sha-{short}-{seed}",
        metrics=metrics,
        config={"seed": seed},
        status=status,
        error="RuntimeError: CUDA out of memory" if status == "failed" else None,
        extra={"preset": preset} if preset else {},
    )
    if finished:
        record["finished"] = finished
    name = record_filename(task, short, seed)
    if finished:
        name = name.replace(".json", f"__{status}_{finished[:10]}.json")
    return write_record(root / subdir / name, record)


def linear(root: Path, short: str, values: list[float], **kwargs) -> None:
    """ImageNet-100, Caltech-101 and Flowers-102 records, one per seed (same value on each task +0/+1/+2)."""
    for seed, value in enumerate(values):
        for offset, task in enumerate(("linear_imagenet100", "logreg_caltech101", "logreg_flowers102")):
            write_result(root, short, task, seed, value + offset, **kwargs)


def run(results: Path, *args: str, capsys=None) -> int:
    return main([str(results), "--no-figures", *args])


def row_of(
    frame: pd.DataFrame, method: str, group: str | None = None, branch: str | None = None
) -> pd.Series:
    match = frame[frame.method == method]
    if group:
        match = match[match.group == group]
    if branch is not None:
        match = match[match.mask_branch.fillna("") == branch]
    assert len(match) == 1, (method, group, match)
    return match.iloc[0]


def first_by_label(text: str) -> dict[str, list[str]]:
    """Markdown rows by their label; for labels used in several blocks, the first (MoCov2) one."""
    rows: dict[str, list[str]] = {}
    for cells in md_rows(text)[1:]:
        rows.setdefault(cells[0], cells)
    return rows


def md_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


# ---------------------------------------------------------------------------------------------- layout/cells


def test_paper_row_order_and_numbers_in_the_right_cells(tmp_path):
    linear(tmp_path, "moco", [60.0, 62.0, 64.5])
    linear(tmp_path, "simclr_mean", [70.0])
    linear(tmp_path, "supervised", [80.0])
    write_result(
        tmp_path, "moco_hp", "voc_detection", 0, {"voc_AP": 40.0, "voc_AP50": 65.0, "voc_AP75": 41.5}
    )
    assert run(tmp_path) == 0

    table_a = pd.read_csv(tmp_path / "tables" / "table_A.csv")
    paper_methods = [row.method for row in PAPER["A"]]
    assert [m for m in table_a.method if m != "Random init"] == paper_methods
    moco = row_of(table_a, "MoCov2")
    assert moco.imagenet100_top1 == pytest.approx(statistics.fmean([60, 62, 64.5]), abs=1e-4)
    assert moco.imagenet100_top1_std == pytest.approx(statistics.stdev([60, 62, 64.5]), abs=1e-4)
    assert moco.imagenet100_top1_n == 3 and moco.caltech101_acc == pytest.approx(63.1667, abs=1e-4)
    mean_row = row_of(table_a, "+ Ours (Mean filling)", "simclr")
    assert (mean_row.flowers102_acc, mean_row.flowers102_acc_n) == (72.0, 1)
    assert math.isnan(mean_row.flowers102_acc_std)  # one seed: no std
    assert math.isnan(row_of(table_a, "+ Ours (Mean filling)", "mocov2").imagenet100_top1)

    table_b = pd.read_csv(tmp_path / "tables" / "table_B.csv")
    hp = row_of(table_b, "+ Ours (High-pass filtering)", "mocov2")
    assert (hp.voc_AP, hp.voc_AP50, hp.voc_AP75, hp.voc_AP_n) == (40.0, 65.0, 41.5, 1)
    assert math.isnan(hp.coco_bbox_AP) and hp.coco_bbox_AP_status == "missing"
    assert row_of(table_b, "+ Ours (High-pass filtering)", "simclr").voc_AP_status == "missing"

    md = md_rows((tmp_path / "tables" / "table_A.md").read_text())
    assert md[0] == ["Method", "ImageNet-100", "Caltech-101", "Flowers-102", "Seeds"]
    by_label = first_by_label((tmp_path / "tables" / "table_A.md").read_text())
    assert by_label["MoCov2"][1:] == ["62.17 ± 2.25", "63.17 ± 2.25", "64.17 ± 2.25", "3"]
    assert by_label["Supervised"][1:] == ["80.00", "81.00", "82.00", "1"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.floats(0, 100, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=5),
    failed=st.sets(st.integers(0, 4), max_size=2),
)
def test_mean_std_n_over_seeds_ignore_failed_seeds(tmp_path_factory, values, failed):
    root = tmp_path_factory.mktemp("seeds")
    ok_values = [value for seed, value in enumerate(values) if seed not in failed]
    for seed, value in enumerate(values):
        write_result(
            root, "simclr", "linear_imagenet100", seed, value, status="failed" if seed in failed else "ok"
        )
    tables = build_tables(collect(root), PAPER)
    cell = tables["A"].cells.query("method == 'SimCLR' and metric == 'imagenet100_top1'").iloc[0]
    assert cell.n == len(ok_values)
    if ok_values:
        assert cell["mean"] == pytest.approx(statistics.fmean(ok_values))
        assert cell.status == "ok" and cell.seeds == ";".join(
            str(s) for s in range(len(values)) if s not in failed
        )
        if len(ok_values) > 1:
            assert cell["std"] == pytest.approx(statistics.stdev(ok_values))
        else:
            assert math.isnan(cell["std"])
    else:  # every seed failed: no number at all, never a zero
        assert math.isnan(cell["mean"]) and cell.status == "failed"
    shown = {row[0]: row[1] for row in md_rows(markdown_body(tables["A"]))[1:]}["SimCLR"]
    if not ok_values:
        assert shown == "failed"
    elif len(ok_values) == 1:
        assert shown == f"{ok_values[0]:.2f}"
    else:
        assert shown == f"{statistics.fmean(ok_values):.2f} ± {statistics.stdev(ok_values):.2f}"


def test_missing_cells_are_shown_as_missing_never_zero(tmp_path):
    linear(tmp_path, "moco", [55.0])
    write_result(tmp_path, "moco_blur", "linear_imagenet100", 0, 0.0)  # a real zero stays a zero
    assert main([str(tmp_path)]) == 0
    csv_text = (tmp_path / "tables" / "table_A.csv").read_text()
    adios = next(line for line in csv_text.splitlines() if ",+ ADIOS," in line)
    assert ",,," in adios and ",0.0000," not in adios and "missing" in adios
    blur = row_of(pd.read_csv(tmp_path / "tables" / "table_A.csv"), "+ Ours (Strong blurring)", "mocov2")
    assert blur.imagenet100_top1 == 0.0 and math.isnan(blur.caltech101_acc)
    md = first_by_label((tmp_path / "tables" / "table_A.md").read_text())
    assert md["+ ADIOS"][1:] == ["–", "–", "–", "–"]
    assert md["+ Ours (Strong blurring)"][1:3] == ["0.00", "–"]
    tex = (tmp_path / "tables" / "table_A.tex").read_text()
    assert re.search(r"^\+ ADIOS & -- & -- & -- & -- \\\\$", tex, re.M)
    # Table B has no detection record at all: every cell is missing, none is 0
    table_b = pd.read_csv(tmp_path / "tables" / "table_B.csv")
    assert table_b[[c for c in table_b.columns if c in TASKS["voc_detection"]]].isna().all().all()
    assert (table_b["voc_AP_status"] == "missing").all()
    missing = (tmp_path / "README.md").read_text().split("### Missing cells")[1].split("###")[0]
    assert "- Table A, + ADIOS (mocov2): no record\n" in missing
    assert (
        "- Table A, + Ours (Strong blurring) (mocov2): no record for caltech101_acc, flowers102_acc"
        in missing
    )
    assert "- Table B: no record for any row yet" in missing
    assert "Table A, MoCov2 (mocov2)" not in missing  # complete: all three linear tasks recorded


def test_failed_runs_give_no_number_and_are_listed(tmp_path):
    write_result(tmp_path, "moco_hp", "voc_detection", 0, 50.0)
    write_result(tmp_path, "moco_hp", "voc_detection", 1, 52.0)
    write_result(tmp_path, "moco_hp", "voc_detection", 2, status="failed")
    write_result(tmp_path, "simclr", "coco_instance", 0, status="failed")
    assert run(tmp_path) == 0
    table_b = pd.read_csv(tmp_path / "tables" / "table_B.csv")
    hp = row_of(table_b, "+ Ours (High-pass filtering)", "mocov2")
    assert (hp.voc_AP, hp.voc_AP_n) == (51.0, 2)
    simclr = row_of(table_b, "SimCLR")
    assert math.isnan(simclr.coco_bbox_AP) and simclr.coco_bbox_AP_status == "failed"
    md = first_by_label((tmp_path / "tables" / "table_B.md").read_text())
    assert md["SimCLR"][4] == "failed"
    readme = (tmp_path / "README.md").read_text()
    section = readme.split("### Failed runs")[1].split("###")[0]
    assert ": 2" in section.splitlines()[0]
    assert "voc_detection · moco_hp · seed 2: RuntimeError: CUDA out of memory" in section
    assert "coco_instance · simclr · seed 0" in section


def test_a_rerun_supersedes_a_failed_record_of_the_same_seed(tmp_path):
    write_result(
        tmp_path, "moco", "linear_imagenet100", 0, status="failed", finished="2024-01-01T00:00:00+00:00"
    )
    write_result(tmp_path, "moco", "linear_imagenet100", 0, 61.0, finished="2024-02-01T00:00:00+00:00")
    write_result(tmp_path, "moco", "linear_imagenet100", 1, 63.0)
    data = collect(tmp_path)
    assert data.failed == [] and len(data.superseded) == 1
    cell = (
        build_tables(data, PAPER)["A"]
        .cells.query("method == 'MoCov2' and metric == 'imagenet100_top1'")
        .iloc[0]
    )
    assert (cell["mean"], cell.n) == (62.0, 2)


# ---------------------------------------------------------------------------------------------- bold & paper


def test_bold_marks_the_best_per_base_method_and_column(tmp_path):
    write_result(tmp_path, "supervised", "linear_imagenet100", 0, 99.0)  # higher, but not ranked
    write_result(tmp_path, "thirdparty", "linear_imagenet100", 0, 98.0)
    for short, value in {
        "moco": 60.0,
        "moco_hp": 70.0,
        "moco_blur": 70.001,
        "moco_mscn": 65.0,
        "simclr": 72.0,
        "simclr_mean": 71.0,
    }.items():
        write_result(tmp_path, short, "linear_imagenet100", 0, value)
    write_result(tmp_path, "moco", "logreg_caltech101", 0, 50.0)  # alone in its block: nothing to beat
    assert run(tmp_path) == 0
    tex = (tmp_path / "tables" / "table_A.tex").read_text()
    lines: dict[str, list[str]] = {}
    for line in tex.splitlines():
        if " & " in line:
            lines.setdefault(line.split(" & ")[0], line.removesuffix(r" \\").split(" & "))  # first block wins
    assert lines["+ Ours (High-pass filtering)"][1] == r"\textbf{70.00}"  # tie at printed precision
    assert lines["+ Ours (Strong blurring)"][1] == r"\textbf{70.00}"
    assert lines["MoCov2"][1] == "60.00" and lines["MoCov2"][2] == "50.00"
    assert lines["SimCLR"][1] == r"\textbf{72.00}"
    assert lines["Supervised"][1] == "99.00" and lines["torchvision-R18"][1] == "98.00"
    assert tex.count(r"\textbf") == 3
    md = (tmp_path / "tables" / "table_A.md").read_text()
    assert md.count("**") == 6 and "**72.00**" in md
    # booktabs rules, one \midrule per block boundary
    assert all(rule in tex for rule in (r"\toprule", r"\bottomrule"))
    assert tex.count(r"\midrule") == 1 + 3  # header + reference|MoCo|SimCLR|third-party


def test_paper_column_and_difference(tmp_path):
    linear(tmp_path, "moco_hp", [70.0, 72.0])
    linear(tmp_path, "supervised", [75.0])
    linear(tmp_path, "thirdparty", [50.0])
    write_result(tmp_path, "moco_hp_key", "linear_imagenet100", 0, 50.0)
    assert run(tmp_path) == 0
    versus = pd.read_csv(tmp_path / "tables" / "table_A_vs_paper.csv")
    for paper_row in PAPER["A"]:
        row = row_of(
            versus, paper_row.method, "reference" if paper_row.base == "supervised" else paper_row.base
        )
        for metric, value in paper_row.values.items():
            assert row[f"{metric}_paper"] == pytest.approx(value)
    hp = row_of(versus, "+ Ours (High-pass filtering)", "mocov2")
    assert hp.imagenet100_top1 == 71.0 and hp.imagenet100_top1_diff == pytest.approx(71.0 - 73.80)
    assert hp.caltech101_acc_diff == pytest.approx(72.0 - 84.91)
    assert math.isnan(row_of(versus, "+ MSCN", "mocov2").imagenet100_top1_diff)  # ours missing
    third = row_of(versus, "torchvision-R18")
    assert math.isnan(third.imagenet100_top1_paper) and math.isnan(third.imagenet100_top1_diff)
    assert third.imagenet100_top1 == 50.0 and versus.method.iloc[-1] == "torchvision-R18"

    md = first_by_label((tmp_path / "tables" / "table_A_vs_paper.md").read_text())
    assert md["Supervised"][1:7] == ["75.00", "82.72", "-7.72", "76.00", "21.99†", "+54.01"]
    assert md["+ Ours (High-pass filtering), mask on key"][1:4] == ["50.00", "–", "–"]
    text = (tmp_path / "tables" / "table_A_vs_paper.md").read_text()
    assert "† The paper prints 21.99 (Caltech-101) and 20.29 (Flowers-102)" in text
    assert (
        "anomalous" in (tmp_path / "README.md").read_text()
        or "far below" in (tmp_path / "README.md").read_text()
    )

    table_c = pd.read_csv(tmp_path / "tables" / "table_C_vs_paper.csv", keep_default_na=False)
    key = table_c[(table_c.method == "+ Ours (High-pass filtering)") & (table_c.mask_branch == "key")].iloc[0]
    assert float(key.imagenet100_top1_paper) == 52.25 and float(key.imagenet100_top1_diff) == pytest.approx(
        -2.25
    )


# ---------------------------------------------------------------------------------------------- files agree


def _format(value: float) -> str:
    return f"{value:.2f}"


def test_csv_markdown_latex_png_exist_and_agree(tmp_path):
    linear(tmp_path, "moco", [60.0, 61.5, 63.0])
    linear(tmp_path, "moco_hp", [66.0, 67.0])
    linear(tmp_path, "simclr_adios", [58.25])
    linear(tmp_path, "random", [10.0, 12.0, 11.0])
    for seed in range(2):
        write_result(tmp_path, "moco_hp", "coco_instance", seed, 30.0 + seed)
        write_result(tmp_path, "moco_hp", "voc_detection", seed, 45.0 + seed)
    write_result(tmp_path, "moco_hp_key", "linear_imagenet100", 0, 49.0)
    out = tmp_path / "out"
    assert main([str(tmp_path), "--out", str(out)]) == 0

    for key in "ABC":
        for suffix in ("", "_vs_paper"):
            for ext in ("csv", "md", "tex"):
                assert (out / "tables" / f"table_{key}{suffix}.{ext}").stat().st_size > 0
        with Image.open(out / "figures" / f"table_{key}.png") as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300
        ours = pd.read_csv(out / "tables" / f"table_{key}.csv")
        md = md_rows((out / "tables" / f"table_{key}.md").read_text())
        tex_rows = [
            line.removesuffix(r" \\").split(" & ")
            for line in (out / "tables" / f"table_{key}.tex").read_text().splitlines()
            if line.endswith(r"\\") and " & " in line and not line.startswith((" &", "Method"))
        ]
        assert len(md) - 1 == len(ours) == len(tex_rows)
        metrics = [c for c in ours.columns if c in {m for ms in TASKS.values() for m in ms}]
        offset = 2 if key == "C" else 1
        for (_, row), md_row, tex_row in zip(ours.iterrows(), md[1:], tex_rows):
            for position, metric in enumerate(metrics, start=offset):
                md_cell = md_row[position].replace("**", "")
                tex_cell = tex_row[position].replace(r"\textbf{", "").replace("}", "")
                if math.isnan(row[metric]):
                    assert md_cell in ("–", "failed") and tex_cell in ("--", r"\textit{failed")
                else:
                    assert md_cell.split(" ")[0] == _format(row[metric])
                    assert tex_cell.split(r"\,")[0].split(" ")[0] == _format(row[metric])
                    if row[f"{metric}_n"] > 1:
                        assert md_cell.split(" ± ")[1].split(" ")[0] == _format(row[f"{metric}_std"])
    cells = pd.read_csv(out / "tables" / "cells.csv")
    table_a = pd.read_csv(out / "tables" / "table_A.csv")
    joined = cells[(cells.table == "A") & (cells.metric == "caltech101_acc")].reset_index(drop=True)
    pd.testing.assert_series_equal(joined["mean"], table_a["caltech101_acc"], check_names=False)
    readme = (out / "README.md").read_text()
    for key in "ABC":
        for name in (
            f"tables/table_{key}.csv",
            f"tables/table_{key}_vs_paper.tex",
            f"figures/table_{key}.png",
        ):
            assert f"]({name})" in readme
    assert "1 seed: " in readme and "2 seeds: " in readme and "3 seeds: " in readme


def test_latex_is_structurally_sound(tmp_path):
    linear(tmp_path, "moco", [60.0, 61.0])
    write_result(tmp_path, "moco_hp", "coco_instance", 0, 33.3)
    data = collect(tmp_path)
    for table in build_tables(data, PAPER).values():
        for comparison in (False, True):
            tex = render_latex(table, "toy", comparison)
            body = tex[tex.index(r"\begin{table}") :]
            assert body.count("{") == body.count("}") and body.count("$") % 2 == 0
            n_columns = len(re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1))
            for line in body.splitlines():
                if line.endswith(r"\\"):
                    spans = [int(m) for m in re.findall(r"\\multicolumn\{(\d+)\}", line)]
                    cells = line.count(" & ") + 1
                    assert cells - len(spans) + sum(spans) == n_columns, line


def test_bar_chart_marks_missing_and_failed_cells(tmp_path):
    from transfer.figures import render_bar_chart

    write_result(tmp_path, "moco", "linear_imagenet100", 0, 60.0)
    write_result(tmp_path, "moco_hp", "linear_imagenet100", 0, status="failed")
    figure = render_bar_chart(build_tables(collect(tmp_path), PAPER)["C"], "toy")
    (axes,) = [ax for ax in figure.axes if ax.get_visible()]
    texts = [text.get_text() for text in axes.texts]
    # 8 rows: MoCov2 has a number, hp-query failed; Random init and the other 5 strategy rows have no record
    assert texts.count("failed") == 1 and texts.count("missing") == 6
    labels = [tick.get_text() for tick in axes.get_yticklabels()]
    assert "MoCov2 + Ours (High-pass filtering) [key]" in labels and labels[0] == "Random init"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- bad input


def test_corrupt_and_invalid_records_are_reported_and_excluded(tmp_path, capsys):
    linear(tmp_path, "moco", [60.0])
    records = tmp_path / "records"
    (records / "truncated.json").write_text('{"schema": "masked-ssl-record/v1", "status": "o')
    bad = json.loads(next(records.glob("linear_imagenet100__moco__*")).read_text())
    bad["metrics"]["imagenet100_top1"] = 150.0
    bad["seed"] = 7
    (records / "out_of_range.json").write_text(json.dumps(bad))
    missing = dict(bad, metrics={}, seed=8)
    (records / "no_metrics.json").write_text(json.dumps(missing))
    (records / "report.json").write_text(json.dumps({"not": "a record"}))  # other JSON beside records
    assert run(tmp_path) == 0
    warnings = capsys.readouterr().err
    assert "truncated.json" in warnings and "out_of_range.json" in warnings and "no_metrics.json" in warnings
    table_a = pd.read_csv(tmp_path / "tables" / "table_A.csv")
    assert (
        row_of(table_a, "MoCov2").imagenet100_top1 == 60.0
        and row_of(table_a, "MoCov2").imagenet100_top1_n == 1
    )
    readme = (tmp_path / "README.md").read_text()
    section = readme.split("### Invalid record files")[1].split("###")[0]
    assert ": 3" in section.splitlines()[0]
    assert "out_of_range.json`: " in section and "150.0" in section and "not valid JSON" not in section
    assert "report.json" not in readme


def test_a_file_named_like_a_record_without_its_schema_is_reported(tmp_path, capsys):
    linear(tmp_path, "moco", [60.0])
    records = tmp_path / "records"
    (records / "logreg_caltech101__moco__seed0.json").write_text("[1, 2]")  # overwritten by something else
    (records / "logreg_flowers102__moco__seed0.json").write_text(json.dumps({"status": "ok", "seed": 0}))
    (records / "run_state__moco__notes.json").write_text(json.dumps({"not": "a record"}))  # not a record's name
    assert run(tmp_path) == 0
    warnings = capsys.readouterr().err
    assert "logreg_caltech101__moco__seed0.json" in warnings and "logreg_flowers102__moco__seed0.json" in warnings
    readme = (tmp_path / "README.md").read_text()
    section = readme.split("### Invalid record files")[1].split("###")[0]
    assert ": 2" in section.splitlines()[0] and "named like a record" in section
    assert "run_state__moco__notes.json" not in readme


def test_toy_and_paper_presets_are_never_mixed(tmp_path, capsys):
    linear(tmp_path, "moco", [40.0, 42.0], preset="toy")
    linear(tmp_path, "moco", [68.0], preset="paper", protocol="in100_probe_100ep", subdir="paper_records")
    assert run(tmp_path) == 2
    error = capsys.readouterr().err
    assert "several presets" in error and "'paper' (3 records)" in error and "--preset" in error

    assert run(tmp_path, "--preset", "toy") == 0
    moco = row_of(pd.read_csv(tmp_path / "tables" / "table_A.csv"), "MoCov2")
    assert (moco.imagenet100_top1, moco.imagenet100_top1_n) == (41.0, 2)
    readme = (tmp_path / "README.md").read_text()
    assert (
        "# Results: preset `toy`" in readme and "### Records left out (other preset or protocol): 3" in readme
    )

    assert run(tmp_path, "--preset", "paper") == 0
    moco = row_of(pd.read_csv(tmp_path / "tables" / "table_A.csv"), "MoCov2")
    assert (moco.imagenet100_top1, moco.imagenet100_top1_n) == (68.0, 1)


def test_untagged_records_with_two_protocols_need_a_choice(tmp_path, capsys):
    write_result(tmp_path, "moco", "linear_imagenet100", 0, 30.0, preset=None, protocol="toy_probe")
    write_result(tmp_path, "moco", "linear_imagenet100", 1, 32.0, preset=None, protocol="toy_probe")
    write_result(
        tmp_path,
        "moco",
        "linear_imagenet100",
        0,
        68.0,
        preset=None,
        protocol="moco_probe_100ep",
        subdir="other",
    )
    with pytest.raises(TablesInputError, match="mixes evaluation protocols"):
        collect(tmp_path)
    assert run(tmp_path) == 2
    assert "--protocol linear_imagenet100=toy_probe" in capsys.readouterr().err
    assert run(tmp_path, "--protocol", "linear_imagenet100=moco_probe_100ep") == 0
    moco = row_of(pd.read_csv(tmp_path / "tables" / "table_A.csv"), "MoCov2")
    assert (moco.imagenet100_top1, moco.imagenet100_top1_n) == (68.0, 1)
    assert "`moco_probe_100ep`" in (tmp_path / "README.md").read_text()


def test_third_party_checkpoint_gets_its_own_row_in_every_table(tmp_path):
    linear(tmp_path, "thirdparty", [90.0])
    write_result(tmp_path, "thirdparty", "voc_detection", 0, 55.0)
    write_result(tmp_path, "thirdparty", "coco_instance", 0, 40.0)
    write_result(tmp_path, "moco", "linear_imagenet100", 0, 60.0)
    assert run(tmp_path) == 0
    for key, metric, value in (
        ("A", "flowers102_acc", 92.0),
        ("B", "coco_segm_AP75", 40.0),
        ("C", "imagenet100_top1", 90.0),
    ):
        table = pd.read_csv(tmp_path / "tables" / f"table_{key}.csv")
        last = table.iloc[-1]
        assert (last.method, last.group, last[metric]) == ("torchvision-R18", "external", value)
        assert "Random init" in set(table.method)  # the sanity row is in every table


def test_masking_figures_are_linked_when_present(tmp_path):
    linear(tmp_path, "moco", [60.0])
    assert run(tmp_path) == 0
    assert "not rendered for this preset yet" in (tmp_path / "README.md").read_text()
    (tmp_path / "figures").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "figures" / "masking_hp.png")
    assert run(tmp_path) == 0
    assert "](figures/masking_hp.png)" in (tmp_path / "README.md").read_text()


def test_module_entry_point_runs(tmp_path):
    linear(tmp_path, "moco", [60.0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "transfer.tables", str(tmp_path), "--no-figures"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "preset 'toy'" in done.stdout and (tmp_path / "README.md").is_file()


def test_cli_help_and_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "RESULTS_DIR" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results records" in capsys.readouterr().err
    linear(tmp_path / "r", "moco", [1.0])
    assert main([str(tmp_path / "r"), "--protocol", "linear_imagenet100"]) == 2
    assert "TASK=PROTOCOL" in capsys.readouterr().err
    assert main([str(tmp_path / "r"), "--paper", str(tmp_path / "missing.csv")]) == 2
    assert "--paper" in capsys.readouterr().err


def test_saliency_source_reaches_records_and_keeps_models_apart(tmp_path, monkeypatch):
    from pretrain.checkpoint import make_meta
    from transfer.records import model_from_meta

    metas = [
        make_meta(
            arch="resnet18",
            method="mocov2",
            masking="saliency",
            strategy="hp",
            mask_branch="query",
            saliency_source=source,
        )
        for source in ("momentum", "supervised_r50")
    ]
    models = [model_from_meta(meta, name="moco-hp") for meta in metas]  # same name on purpose
    assert [m["saliency_source"] for m in models] == ["momentum", "supervised_r50"]
    for seed, (meta_model, value) in enumerate(zip(models, (70.0, 74.0))):
        record = make_record(
            task="linear_imagenet100",
            protocol="p",
            seed=seed,
            model=meta_model,
            weights_path="w",
            weights_sha256=str(seed),
            config={},
            metrics={"imagenet100_top1": value, "imagenet100_top5": 90.0},
        )
        write_record(tmp_path / f"r{seed}.json", record)
    monkeypatch.setattr("transfer.results_data.BIG_JSON_BYTES", 500)  # records here are ~1 kB: still read
    (tmp_path / "big.json").write_text("[" + "0," * 5000 + "oops")  # big, no schema in its head: not parsed
    data = collect(tmp_path)
    assert data.invalid == [] and len(data.winners) == 2
    table_a = build_tables(data, PAPER)["A"].ours()
    hp = table_a[table_a.method.str.startswith("+ Ours (High-pass filtering)") & (table_a.group == "mocov2")]
    assert sorted(hp.imagenet100_top1) == [70.0, 74.0] and (hp.imagenet100_top1_n == 1).all()
    assert any("saliency source=supervised_r50" in label for label in hp.method)


def test_index_reports_ssl_rows_that_do_not_beat_random_init(tmp_path):
    linear(tmp_path, "random", [20.0, 22.0])
    linear(tmp_path, "moco", [40.0])
    linear(tmp_path, "simclr_mean", [21.5])  # 21.5 / 22.5 / 23.5 vs Random init 21 / 22 / 23: above
    linear(tmp_path, "moco_hp", [20.5])  # 20.5 / 21.5 / 22.5 vs 21 / 22 / 23 -> below on all three
    linear(tmp_path, "thirdparty", [1.0])  # not an SSL row of ours: not checked
    assert run(tmp_path) == 0
    section = (tmp_path / "README.md").read_text().split("## Sanity check")[1].split("##")[0]
    assert "3 of 9 SSL cells of Table A are NOT above the Random init row" in section
    assert "mocov2 · + Ours (High-pass filtering) · caltech101_acc: 21.50 <= Random init 22.00" in section
    assert "torchvision" not in section and "SimCLR" not in section


def test_a_pipe_in_a_model_name_does_not_split_the_markdown_row(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "piped", {"base": "external", "name": "ours|v2"})
    linear(tmp_path, "moco", [60.0])
    linear(tmp_path, "piped", [50.0])
    assert run(tmp_path) == 0
    text = (tmp_path / "tables" / "table_A.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(re.findall(r"(?<!\\)\|", line)) for line in lines}) == 1, text
    assert any("ours\\|v2" in line for line in lines)
