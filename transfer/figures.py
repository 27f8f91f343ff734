"""Bar charts of the tables: one panel per metric, each row's number beside the paper's.

Horizontal bars keep the long row labels readable. Ours is a solid bar with the seed std as an error bar;
the paper's number is a hatched grey bar just below it. A missing or failed cell gets no bar but the word
"missing"/"failed", so an absent number never reads as a zero. Rendered with matplotlib's Agg canvas
(no display, no pyplot global state) and written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.fileio import atomic_write_bytes
from transfer.table_layout import BASE_LABELS, EXTERNAL_GROUP, NO_BRANCH, REFERENCE_GROUP
from transfer.tables import Table

OURS_COLOR = "#1f77b4"
PAPER_COLOR = "#b0b0b0"
MAX_COLUMNS = 3


def figure_labels(table: Table) -> list[str]:
    """Row labels that stand on their own ("SimCLR + MSCN" rather than "+ MSCN")."""
    labels = []
    for row in table.rows:
        label = row.label
        if row.group not in (REFERENCE_GROUP, EXTERNAL_GROUP) and label.startswith("+"):
            label = f"{BASE_LABELS.get(row.group, row.group)} {label}"
        if table.spec.branch_column and row.branch != NO_BRANCH:
            label += f" [{row.branch}]"
        labels.append(label)
    return labels


def render_bar_chart(table: Table, preset: str) -> Figure:
    columns = table.spec.columns
    n_cols = min(MAX_COLUMNS, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    labels = figure_labels(table)
    height_per_panel = 0.32 * len(labels) + 0.9
    figure = Figure(figsize=(3.0 + 3.4 * n_cols, height_per_panel * n_rows + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False, sharey=True)
    positions = np.arange(len(labels))[::-1].astype(float)  # first row at the top
    groups = [row.group for row in table.rows]
    for index, column in enumerate(columns):
        ax = axes[index // n_cols][index % n_cols]
        part = table.cells[table.cells.metric == column.metric].sort_values("row")
        ours = part["mean"].to_numpy(dtype=float)
        stds = np.nan_to_num(part["std"].to_numpy(dtype=float))
        paper = part["paper"].to_numpy(dtype=float)
        ax.barh(
            positions + 0.2,
            np.nan_to_num(ours),
            height=0.38,
            xerr=stds,
            color=OURS_COLOR,
            label="ours (mean ± std over seeds)",
            error_kw={"elinewidth": 0.8, "capsize": 2},
        )
        ax.barh(
            positions - 0.2,
            np.nan_to_num(paper),
            height=0.38,
            color=PAPER_COLOR,
            hatch="//",
            edgecolor="white",
            label="paper",
        )
        top = np.nanmax(np.concatenate([ours + stds, paper, [1.0]]))
        ax.set_xlim(0, min(100.0, top * 1.12) if top > 0 else 1.0)
        for y, value, status in zip(positions, ours, part["status"]):
            if math.isnan(value):
                ax.text(
                    ax.get_xlim()[1] * 0.01,
                    y + 0.2,
                    status,
                    va="center",
                    fontsize=7,
                    style="italic",
                    color="#a00000" if status == "failed" else "#555555",
                )
        for offset, (above, below) in enumerate(zip(groups, groups[1:])):
            if above != below:
                ax.axhline(positions[offset] - 0.5, color="#dddddd", linewidth=0.8)
        ax.set_title(column.text, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_yticks(positions, labels, fontsize=7)
    for index in range(len(columns), n_rows * n_cols):
        axes[index // n_cols][index % n_cols].set_visible(False)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    figure.suptitle(f"Table {table.spec.key} (preset {preset}): {table.spec.title}", fontsize=10)
    return figure


def write_bar_chart(table: Table, path: str | Path, preset: str) -> Path:
    figure = render_bar_chart(table, preset)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
