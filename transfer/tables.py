"""``python -m transfer.tables RESULTS_DIR``: the paper's three tables from the JSON records alone.

Reads every results record under RESULTS_DIR (see :mod:`transfer.records`), keeps one preset and one
protocol per task (:mod:`transfer.results_data`), places each model in the paper's row order
(:mod:`transfer.table_layout`) and writes, under ``--out`` (default RESULTS_DIR)::

    tables/table_{A,B,C}.{csv,md,tex}            ours: mean (± std over seeds), n, best per base in bold
    tables/table_{A,B,C}_vs_paper.{csv,md,tex}   ours | paper | diff (ours - paper) per cell
    tables/cells.csv                             every cell, long format, with seeds and status
    figures/table_{A,B,C}.png                    grouped bars, ours beside the paper's numbers
    README.md                                    index: links, seeds per cell, failed/missing/invalid

Conventions: numbers are percentages; a missing cell is empty in CSV and "–" in Markdown/LaTeX, never 0;
a cell whose every seed failed says "failed". "Best" is bold per column within each base method's block
(MoCo v2 rows, SimCLR rows), compared at the printed precision (ties are all bold), only when the block
has at least two numbers in that column; Supervised, Random init and third-party rows are never bold.
Outputs are regenerated from the records on every run (they are a pure function of them), atomically.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transfer.results_data import ResultsData, TablesInputError, collect, parse_protocol_choices
from transfer.table_layout import (
    DEFAULT_PAPER_CSV,
    EXTERNAL_GROUP,
    REFERENCE_GROUP,
    TABLES,
    PaperReferenceError,
    PaperRow,
    TableRow,
    TableSpec,
    layout_rows,
    load_paper_reference,
)

DISPLAY_DECIMALS = 2
CELL_COLUMNS = tuple(
    "row group method mask_branch model base masking strategy arch saliency_source metric task protocol "
    "mean std n seeds status failed_seeds paper paper_method diff best".split()
)
# Published values that look wrong but are what the paper prints: shown as published, flagged.
PAPER_NOTES = {
    ("A", "Supervised", "caltech101_acc"): "paper-anomaly",
    ("A", "Supervised", "flowers102_acc"): "paper-anomaly",
}
PAPER_NOTE_TEXT = {
    "paper-anomaly": (
        "The paper prints 21.99 (Caltech-101) and 20.29 (Flowers-102) for the Supervised row, far below "
        "every SSL row (about 80-90) and below what a supervised ImageNet-100 ResNet-50 usually transfers. "
        "They are reproduced as published, not corrected: a supervised model that transfers like the SSL rows "
        "differs from them by about +60 points."
    ),
}
TABLE_NOTES = {
    "C": (
        "The paper does not state Table C's training setting (its MoCov2 baseline, 56.00, is below Table A's "
        "68.22, probably a shorter schedule): compare key vs query vs baseline, not absolute values."
    ),
}


@dataclass
class Table:
    """One of the paper's tables filled with our numbers: its rows and a long frame of its cells."""

    spec: TableSpec
    rows: list[TableRow]
    cells: pd.DataFrame  # one row per (table row, metric), columns CELL_COLUMNS

    @property
    def metrics(self) -> list[str]:
        return [column.metric for column in self.spec.columns]

    def _row_fields(self) -> pd.DataFrame:
        keep = ["row", "group", "method", "mask_branch", "model"]
        return self.cells[keep].drop_duplicates("row").set_index("row")

    def ours(self) -> pd.DataFrame:
        """Wide numeric frame (the CSV): per metric its mean, std, n and status."""
        frame = self._row_fields()
        for metric in self.metrics:
            part = self.cells[self.cells.metric == metric].set_index("row")
            frame[metric] = part["mean"]
            frame[f"{metric}_std"] = part["std"]
            frame[f"{metric}_n"] = part["n"]
            frame[f"{metric}_status"] = part["status"]
        return frame.reset_index(drop=True)

    def versus_paper(self) -> pd.DataFrame:
        """Wide numeric frame: per metric ours, the paper's, and ours - paper."""
        frame = self._row_fields()
        for metric in self.metrics:
            part = self.cells[self.cells.metric == metric].set_index("row")
            frame[metric] = part["mean"]
            frame[f"{metric}_paper"] = part["paper"]
            frame[f"{metric}_diff"] = part["diff"]
        return frame.reset_index(drop=True)


def build_table(spec: TableSpec, data: ResultsData, paper_rows: list[PaperRow]) -> Table:
    rows = layout_rows(spec, data.identities_for(spec.tasks), paper_rows)
    entries = []
    for position, row in enumerate(rows):
        identity = row.identity
        for column in spec.columns:
            cell = data.cell(identity, column.metric)
            paper = row.paper.values.get(column.metric, math.nan) if row.paper else math.nan
            mean = cell.mean
            entries.append(
                {
                    "row": position,
                    "group": row.group,
                    "method": row.label,
                    "mask_branch": row.branch,
                    "model": identity.name if identity else "",
                    "base": identity.base if identity else (row.paper.base if row.paper else ""),
                    "masking": identity.masking if identity else "",
                    "strategy": (identity.strategy or "") if identity else "",
                    "arch": (identity.arch or "") if identity else "",
                    "saliency_source": (identity.saliency_source or "") if identity else "",
                    "metric": column.metric,
                    "task": column.task,
                    "protocol": cell.protocol or data.protocols.get(column.task, ""),
                    "mean": mean,
                    "std": cell.std,
                    "n": cell.n,
                    "seeds": ";".join(map(str, sorted(cell.values))),
                    "status": cell.status,
                    "failed_seeds": ";".join(map(str, sorted(cell.failed))),
                    "paper": paper,
                    "paper_method": row.paper.method if row.paper else "",
                    "diff": mean - paper,  # NaN when either side is missing
                    "best": False,
                }
            )
    cells = pd.DataFrame(entries, columns=list(CELL_COLUMNS))
    cells["best"] = _best_mask(cells)
    return Table(spec, rows, cells)


def _best_mask(cells: pd.DataFrame) -> pd.Series:
    """Bold cells: the highest printed value per (base block, metric), when the block has two or more."""
    best = pd.Series(False, index=cells.index)
    comparable = cells[~cells.group.isin([REFERENCE_GROUP, EXTERNAL_GROUP]) & cells["mean"].notna()]
    for _, block in comparable.groupby(["group", "metric"]):
        if len(block) < 2:
            continue
        printed = block["mean"].round(DISPLAY_DECIMALS)
        best[block.index[printed == printed.max()]] = True
    return best


def not_beating_random_init(table: Table) -> tuple[int, list[str]]:
    """Sanity check: SSL cells (base-method blocks) not above the Random init row's number.

    Returns (number of SSL cells compared, descriptions of those at or below Random init).
    """
    cells = table.cells[table.cells["mean"].notna()]
    random_init = cells[(cells.group == REFERENCE_GROUP) & (cells.base == "random")]
    reference = dict(zip(random_init.metric, random_init["mean"]))
    ssl = cells[~cells.group.isin([REFERENCE_GROUP, EXTERNAL_GROUP]) & cells.metric.isin(reference)]
    losers = [
        f"{row.group} · {row.method}{f' [{row.mask_branch}]' if table.spec.branch_column else ''} · {row.metric}: "
        f"{row.mean:.2f} <= Random init {reference[row.metric]:.2f}"
        for row in ssl.itertuples()
        if row.mean <= reference[row.metric]
    ]
    return len(ssl), losers


def build_tables(data: ResultsData, paper: dict[str, list[PaperRow]]) -> dict[str, Table]:
    return {key: build_table(spec, data, paper.get(key, [])) for key, spec in TABLES.items()}


def all_cells(tables: dict[str, Table]) -> pd.DataFrame:
    return pd.concat([table.cells.assign(table=key) for key, table in tables.items()], ignore_index=True)[
        ["table", *CELL_COLUMNS]
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.tables",
        description="Write the paper's tables (CSV, LaTeX, Markdown), the comparison with the published "
        "numbers, bar charts and a README index from the JSON results records under RESULTS_DIR.",
        epilog="Example: python -m transfer.tables results/toy   (writes results/toy/{tables,figures,README.md})",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="folder searched recursively for records")
    parser.add_argument("--out", help="output folder (default: RESULTS_DIR)")
    parser.add_argument(
        "--preset",
        help="build this preset only (records' extra.preset); default: the only one present, "
        "named after RESULTS_DIR when records are untagged",
    )
    parser.add_argument(
        "--protocol",
        action="append",
        metavar="TASK=PROTOCOL",
        help="use this protocol for TASK when several are present (repeatable)",
    )
    parser.add_argument(
        "--paper", default=str(DEFAULT_PAPER_CSV), help="published numbers CSV (default: %(default)s)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG bar charts")
    return parser.parse_args(argv)


def write_all(
    results_dir: str | Path,
    out: str | Path | None = None,
    preset: str | None = None,
    protocols: dict[str, str] | None = None,
    paper_csv: str | Path = DEFAULT_PAPER_CSV,
    figures: bool = True,
) -> tuple[ResultsData, Path]:
    """Everything ``python -m transfer.tables`` writes; returns the data used and the index path.

    Raises :class:`TablesInputError` / :class:`PaperReferenceError` before writing anything.
    """
    from transfer.results_index import write_index
    from transfer.table_render import write_cells_csv, write_table_files

    paper = load_paper_reference(paper_csv)
    data = collect(results_dir, preset=preset, protocols=protocols)
    out = Path(out or results_dir)
    tables = build_tables(data, paper)
    written = {key: write_table_files(table, out / "tables", data.preset) for key, table in tables.items()}
    write_cells_csv(all_cells(tables), out / "tables" / "cells.csv")
    charts = {}
    if figures:
        from transfer.figures import write_bar_chart

        for key, table in tables.items():
            charts[key] = write_bar_chart(table, out / "figures" / f"{table.spec.slug}.png", data.preset)
    return data, write_index(out, data, tables, written, charts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data, index = write_all(
            args.results_dir,
            args.out,
            args.preset,
            parse_protocol_choices(args.protocol),
            args.paper,
            figures=not args.no_figures,
        )
    except (TablesInputError, PaperReferenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the tables under {args.out or args.results_dir}: {err}", file=sys.stderr)
        return 2
    for path, problem in data.invalid:
        print(f"warning: invalid record {path}: {problem}", file=sys.stderr)
    statuses = dict(sorted(Counter(item.record["status"] for item in data.winners).items()))
    print(
        f"preset '{data.preset}': {len(data.winners)} records {statuses}, {len(data.invalid)} invalid, "
        f"{len(data.excluded)} left out; index: {index}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
