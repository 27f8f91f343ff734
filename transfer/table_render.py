"""Render a :class:`transfer.tables.Table` as CSV (numbers), Markdown and booktabs LaTeX (display).

The CSV files carry full-precision numbers (mean, std, n, status per metric; or ours, paper, diff); the
Markdown and LaTeX files print the same numbers at two decimals: ``mean ± std`` when a cell has several
seeds, ``(n=k)`` when a cell has fewer seeds than the rest of its row, "–" for a missing cell, "failed" when
every seed of the cell failed, bold for the best value per base-method block and column.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from pretrain.fileio import atomic_write_text
from transfer.table_layout import Column
from transfer.tables import DISPLAY_DECIMALS, PAPER_NOTE_TEXT, PAPER_NOTES, TABLE_NOTES, Table

MISSING = {"md": "–", "tex": "--"}
LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "±": r"$\pm$",
}
NOTE_MARK = {"md": "†", "tex": r"$^\dagger$"}


def escape_latex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _number(value: float, signed: bool = False) -> str:
    return f"{value:+.{DISPLAY_DECIMALS}f}" if signed else f"{value:.{DISPLAY_DECIMALS}f}"


def _bold(text: str, fmt: str) -> str:
    return f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"


def _cell_text(cell: pd.Series, row_max_n: int, fmt: str) -> str:
    if cell.status != "ok":
        return _missing_or(cell.status, fmt)
    text = _number(cell["mean"])
    if cell.best:
        text = _bold(text, fmt)
    if cell.n > 1:
        text += " ± " if fmt == "md" else r"\,$\pm$\,"
        text += _number(cell["std"])
    if cell.n < row_max_n:
        text += f" (n={cell.n})"
    return text


def escape_markdown(text: str) -> str:
    """A label safe inside a pipe-table cell: a ``|`` in a model name would otherwise split the row."""
    return str(text).replace("|", "\\|")


def _seeds_text(ns: pd.Series, fmt: str) -> str:
    present = ns[ns > 0]
    if present.empty:
        return MISSING[fmt]
    low, high = int(present.min()), int(present.max())
    return str(high) if low == high else f"{low}{'–' if fmt == 'md' else '--'}{high}"


def _label_columns(table: Table, fmt: str) -> dict[str, pd.Series]:
    first = table.cells.drop_duplicates("row").set_index("row")
    escape = escape_latex if fmt == "tex" else escape_markdown
    columns = {"Method": first["method"].map(escape)}
    if table.spec.branch_column:
        columns["Mask branch"] = first["mask_branch"].map(lambda b: escape(b) if b else MISSING[fmt])
    return columns


def _header(column: Column, fmt: str, suffix: str = "") -> str | tuple:
    if fmt == "md":
        return f"{column.text}{suffix}"
    return (column.group, column.latex_label) if column.group else column.latex_label


def display_ours(table: Table, fmt: str) -> pd.DataFrame:
    """The table as display strings (``fmt`` "md" or "tex"), one column per metric plus Seeds."""
    cells = table.cells.set_index(["row", "metric"])
    row_max_n = table.cells.groupby("row")["n"].max()
    columns = _label_columns(table, fmt)
    for column in table.spec.columns:
        part = cells.xs(column.metric, level="metric")
        columns[_header(column, fmt)] = pd.Series(
            {row: _cell_text(cell, row_max_n[row], fmt) for row, cell in part.iterrows()}
        )
    columns["Seeds"] = table.cells.groupby("row")["n"].apply(lambda ns: _seeds_text(ns, fmt))
    return _frame(columns, fmt)


def display_versus_paper(table: Table, fmt: str) -> pd.DataFrame:
    """Display strings of ours | paper | diff per metric."""
    cells = table.cells.set_index(["row", "metric"])
    columns = _label_columns(table, fmt)
    names = {"md": (" ours", " paper", " Δ"), "tex": ("Ours", "Paper", r"$\Delta$")}[fmt]
    for column in table.spec.columns:
        part = cells.xs(column.metric, level="metric")
        ours = part.apply(
            lambda c: _number(c["mean"]) if c.status == "ok" else _missing_or(c.status, fmt), axis=1
        )
        paper = part["paper"].map(lambda v: MISSING[fmt] if math.isnan(v) else _number(v))
        marked = part["paper_method"].map(
            lambda m, metric=column.metric: (table.spec.key, m, metric) in PAPER_NOTES
        )
        paper = paper.where(~marked, paper + NOTE_MARK[fmt])
        diff = part["diff"].map(lambda v: MISSING[fmt] if math.isnan(v) else _number(v, signed=True))
        for name, values in zip(names, (ours, paper, diff)):
            if fmt == "md":
                columns[_header(column, fmt, name)] = values
            else:
                header = _header(column, fmt)
                columns[(*header, name) if isinstance(header, tuple) else (header, name)] = values
    return _frame(columns, fmt)


def _missing_or(status: str, fmt: str) -> str:
    """The text of a cell without a number: "–" when nothing was recorded, else the status (failed/running)."""
    return MISSING[fmt] if status == "missing" else (status if fmt == "md" else rf"\textit{{{status}}}")


def _frame(columns: dict, fmt: str) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    if fmt == "tex" and any(isinstance(key, tuple) for key in columns):
        depth = max(len(key) if isinstance(key, tuple) else 1 for key in columns)
        keys = [
            (*[""] * (depth - len(k)), *k) if isinstance(k, tuple) else (*[""] * (depth - 1), k)
            for k in columns
        ]
        frame.columns = pd.MultiIndex.from_tuples(keys)
    return frame.reset_index(drop=True)


def notes(table: Table, comparison: bool, fmt: str = "md") -> list[str]:
    lines = [
        "Numbers are percentages; mean ± sample std over seeds when a cell has several; (n=k) marks a cell "
        "with fewer seeds than the rest of its row; – = no record; failed = every seed of the cell failed.",
    ]
    if not comparison:
        lines.append(
            "Bold: best printed value per column within each base method's block (MoCov2 rows, SimCLR rows); "
            "ties are all bold; Supervised, Random init and third-party rows are not ranked."
        )
    else:
        lines.append(
            "Δ = ours − paper. The paper pretrains ResNet-50 on ImageNet-100 (200 epochs for Tables A "
            "and B); only the paper preset matches that setting, so Δ is a reproduction check there only."
        )
        used = {note for (key, _, _), note in PAPER_NOTES.items() if key == table.spec.key}
        lines.extend(f"{NOTE_MARK['md']} {PAPER_NOTE_TEXT[note]}" for note in sorted(used))
    if table.spec.key in TABLE_NOTES:
        lines.append(TABLE_NOTES[table.spec.key])
    return lines


def markdown_body(table: Table, comparison: bool = False) -> str:
    """The pipe table alone (labels left-aligned, numbers right-aligned)."""
    frame = display_versus_paper(table, "md") if comparison else display_ours(table, "md")
    align = ["left"] * (2 if table.spec.branch_column else 1)
    align += ["right"] * (frame.shape[1] - len(align))
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


def render_markdown(table: Table, preset: str, comparison: bool = False) -> str:
    body = markdown_body(table, comparison)
    title = f"Table {table.spec.key}: {table.spec.title}" + (" — ours vs. the paper" if comparison else "")
    note_text = "\n".join(f"- {line}" for line in notes(table, comparison))
    return f"## {title} (preset `{preset}`)\n\n{body}\n\n{note_text}\n"


def render_latex(table: Table, preset: str, comparison: bool = False) -> str:
    frame = display_versus_paper(table, "tex") if comparison else display_ours(table, "tex")
    labels = 2 if table.spec.branch_column else 1
    caption = escape_latex(table.spec.title) + (r" --- ours vs.\ the paper" if comparison else "")
    caption += f". The paper's Table {table.spec.key}; preset {escape_latex(preset)}."
    latex = frame.style.hide(axis="index").to_latex(
        column_format="l" * labels + "r" * (frame.shape[1] - labels),
        hrules=True,
        multicol_align="c",
        caption=caption,
        label=f"tab:{table.spec.slug}{'_vs_paper' if comparison else ''}_{re.sub(r'[^A-Za-z0-9]+', '-', preset)}",
        position="t",
        position_float="centering",
    )
    latex = _group_midrules(latex, table.cells.drop_duplicates("row")["group"].tolist())
    comments = "".join(f"% {line}\n" for line in notes(table, comparison))
    preamble = "% Requires \\usepackage{booktabs}.\n"
    if frame.shape[1] > 12:
        preamble += (
            "% Wide: wrap the tabular in \\resizebox{\\textwidth}{!}{...} (graphicx) or set it landscape.\n"
        )
    return preamble + comments + latex


def _group_midrules(latex: str, groups: list[str]) -> str:
    """Booktabs finish: \\cmidrule under spanning headers, \\midrule between base-method blocks."""
    lines = latex.splitlines()
    start = lines.index(r"\midrule") + 1
    end = lines.index(r"\bottomrule")
    if end - start != len(groups):  # a cell with a line break would shift rows; leave the table as is
        return latex
    out = []
    for line in lines[:start]:
        out.append(line)
        if r"\multicolumn" in line:
            out.append(_cmidrules(line))
    for offset, line in enumerate(lines[start:end]):
        if offset and groups[offset] != groups[offset - 1]:
            out.append(r"\midrule")
        out.append(line)
    return "\n".join(out + lines[end:]) + "\n"


def _cmidrules(header_line: str) -> str:
    rules, column = [], 1
    for cell in header_line.removesuffix(r"\\").split(" & "):
        match = re.match(r"\s*\\multicolumn\{(\d+)\}", cell)
        span = int(match.group(1)) if match else 1
        if match and cell.strip().split("}{")[-1].rstrip("} "):
            rules.append(rf"\cmidrule(lr){{{column}-{column + span - 1}}}")
        column += span
    return " ".join(rules)


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, float_format="%.4f", lineterminator="\n")


def write_table_files(table: Table, directory: Path, preset: str) -> dict[str, Path]:
    """Write the six files of one table atomically; returns {"csv", "md", "tex", "vs_csv", ...} -> path."""
    directory = Path(directory)
    stem = table.spec.slug
    contents = {
        "csv": (f"{stem}.csv", _csv(table.ours())),
        "md": (f"{stem}.md", render_markdown(table, preset)),
        "tex": (f"{stem}.tex", render_latex(table, preset)),
        "vs_csv": (f"{stem}_vs_paper.csv", _csv(table.versus_paper())),
        "vs_md": (f"{stem}_vs_paper.md", render_markdown(table, preset, comparison=True)),
        "vs_tex": (f"{stem}_vs_paper.tex", render_latex(table, preset, comparison=True)),
    }
    written = {}
    for kind, (name, text) in contents.items():
        atomic_write_text(directory / name, text)
        written[kind] = directory / name
    return written


def write_cells_csv(cells: pd.DataFrame, path: Path) -> Path:
    atomic_write_text(path, _csv(cells))
    return Path(path)
