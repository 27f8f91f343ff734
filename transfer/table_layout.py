"""The paper's three tables: their columns, their rows in the paper's order, and which row a model fills.

A row of our tables is one *model identity*: the record's ``model`` fields (base method, masking,
strategy, mask branch, arch, input filter, saliency source) plus its ``name``. Records of one identity
are seeds of one model; records of different identities are never averaged together.

Each identity is matched to a published row by (base, masking, strategy, mask branch), the way the
paper's ``reference_results.csv`` describes its rows:

* ``mocov2`` + ``saliency`` + ``hp`` + branch ``query`` -> "+ Ours (High-pass filtering)" under MoCov2
  (Table C also has the ``key`` rows), ``mscn`` -> "+ MSCN", ``adios`` -> "+ ADIOS", unmasked -> the
  base row, ``supervised`` -> "Supervised";
* ``random`` -> a "Random init" sanity row (not in the paper) that every table shows;
* ``external`` (third-party checkpoints) -> a row named by ``model.name``, after every other row;
* anything else (mask on ``both`` branches, a key-branch model in Table A, an unknown strategy) -> its
  own row inside its base method's block, after the paper rows, labelled from its fields.

For an unmasked model ``strategy`` and ``mask_branch`` carry no meaning and are ignored; a masked model
without a branch uses the default, ``query``; for MSCN/ADIOS the strategy is part of the method and
ignored. When several identities land on the same label (two saliency sources, two archs, two names)
each keeps its own row, labelled with the fields that tell them apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from transfer.records import TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAPER_CSV = REPO_ROOT / "results" / "paper" / "reference_results.csv"

BASE_LABELS = {"mocov2": "MoCov2", "simclr": "SimCLR", "supervised": "Supervised", "random": "Random init"}
MASKING_LABELS = {"mscn": "MSCN", "adios": "ADIOS"}
STRATEGY_LABELS = {"hp": "High-pass filtering", "blur": "Strong blurring", "mean": "Mean filling"}
MASKING_ORDER = ("none", "mscn", "adios", "saliency")
STRATEGY_ORDER = ("hp", "blur", "mean")
BRANCH_ORDER = ("query", "key", "both")
REFERENCE_GROUP = "reference"  # Supervised and Random init: no base method to be "best" within
EXTERNAL_GROUP = "external"
NO_BRANCH = ""  # unmasked rows have no mask branch

METRIC_TASK = {metric: task for task, metrics in TASKS.items() for metric in metrics}


@dataclass(frozen=True)
class Column:
    """One metric column: ``group`` is the spanning header (e.g. "COCO detection"), may be empty."""

    metric: str
    group: str
    label: str
    latex_label: str

    @property
    def task(self) -> str:
        return METRIC_TASK[self.metric]

    @property
    def text(self) -> str:
        return f"{self.group} {self.label}".strip()


@dataclass(frozen=True)
class TableSpec:
    key: str
    title: str
    columns: tuple[Column, ...]
    branch_column: bool = False  # Table C shows the mask branch as its own column

    @property
    def slug(self) -> str:
        return f"table_{self.key}"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(column.task for column in self.columns))


def _detection_columns() -> tuple[Column, ...]:
    columns = []
    for prefix, group, superscript in (
        ("voc", "VOC07+12 detection", ""),
        ("coco_bbox", "COCO detection", "bb"),
        ("coco_segm", "COCO instance segmentation", "mk"),
    ):
        for suffix, sub in (("AP", "all"), ("AP50", "50"), ("AP75", "75")):
            sup = f"^{{{superscript}}}" if superscript else ""
            columns.append(Column(f"{prefix}_{suffix}", group, suffix, f"AP$_{{{sub}}}{sup}$"))
    return tuple(columns)


TABLES = {
    "A": TableSpec(
        "A",
        "Linear classification (ImageNet-100 top-1; Caltech-101 / Flowers-102 mean per-class accuracy, %)",
        (
            Column("imagenet100_top1", "", "ImageNet-100", "ImageNet-100"),
            Column("caltech101_acc", "", "Caltech-101", "Caltech-101"),
            Column("flowers102_acc", "", "Flowers-102", "Flowers-102"),
        ),
    ),
    "B": TableSpec("B", "Transfer detection and instance segmentation (AP, %)", _detection_columns()),
    "C": TableSpec(
        "C",
        "Mask branch: key vs query (ImageNet-100 linear top-1, %)",
        (Column("imagenet100_top1", "", "Top-1", "Top-1"),),
        branch_column=True,
    ),
}


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two records seeds of the same model (see the module docstring)."""

    base: str
    masking: str
    strategy: str | None
    mask_branch: str | None
    arch: str | None
    input_filter: str
    saliency_source: str | None
    name: str

    @classmethod
    def from_model(cls, model: dict[str, Any]) -> ModelIdentity:
        masking = str(model.get("masking") or "none")
        strategy, branch = model.get("strategy"), model.get("mask_branch")
        if masking == "none":
            strategy, branch = None, None
        else:
            branch = branch or "query"
        return cls(
            base=str(model.get("base") or "external"),
            masking=masking,
            strategy=None if strategy is None else str(strategy),
            mask_branch=None if branch is None else str(branch),
            arch=model.get("arch"),
            input_filter=_filter_text(model.get("input_filter")),
            saliency_source=model.get("saliency_source"),
            name=str(model["name"]),
        )

    @property
    def paper_key(self) -> tuple[str, str | None, str | None]:
        """(base, strategy, branch) as the paper's CSV spells its rows (MSCN/ADIOS in ``strategy``)."""
        if self.masking == "none":
            return (self.base, None, None)
        if self.masking in MASKING_LABELS:
            return (self.base, self.masking, self.mask_branch)
        if self.masking == "saliency":
            return (self.base, self.strategy, self.mask_branch)
        return (self.base, f"{self.masking}:{self.strategy}", self.mask_branch)

    @property
    def group(self) -> str:
        if self.base == "external":
            return EXTERNAL_GROUP
        if self.base in ("supervised", "random"):
            return REFERENCE_GROUP
        return self.base

    def method_label(self, branch_column: bool) -> str:
        """A label from the fields, in the paper's style ("+ Ours (Strong blurring)")."""
        if self.base == "external":
            return self.name
        base_label = BASE_LABELS.get(self.base, self.base)
        if self.masking == "none":
            return base_label
        if self.masking == "saliency":
            label = f"+ Ours ({STRATEGY_LABELS.get(self.strategy or '', f'strategy {self.strategy}')})"
        else:
            label = f"+ {MASKING_LABELS.get(self.masking, self.masking)}"
            if self.masking not in MASKING_LABELS and self.strategy:
                label += f" ({self.strategy})"
        if not branch_column and self.mask_branch != "query":
            label += f", mask on {self.mask_branch}"
        if self.group == REFERENCE_GROUP:
            label = f"{base_label} {label}"
        return label

    def distinguishing(self, others: Iterable[ModelIdentity]) -> str:
        """A " [field=value, ...]" suffix naming the fields in which this identity differs from ``others``."""
        fields = ("arch", "input_filter", "saliency_source", "strategy", "name")
        others = list(others)
        parts = []
        for name in fields:
            value = getattr(self, name)
            if any(getattr(other, name) != value for other in others):
                parts.append(f"model={value}" if name == "name" else f"{name.replace('_', ' ')}={value}")
        return f" [{', '.join(parts)}]" if parts else ""


def _filter_text(spec: Any) -> str:
    if not spec or (isinstance(spec, dict) and spec.get("name", "none") == "none"):
        return "none"
    if isinstance(spec, dict):
        params = ",".join(f"{k}={spec[k]}" for k in sorted(spec) if k != "name")
        return f"{spec.get('name')}({params})" if params else str(spec.get("name"))
    return json.dumps(spec, sort_keys=True)


@dataclass(frozen=True)
class PaperRow:
    table: str
    method: str
    base: str
    strategy: str | None
    mask_branch: str | None
    order: int
    values: dict[str, float] = field(hash=False, compare=False)

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.base, self.strategy, self.mask_branch)


class PaperReferenceError(ValueError):
    """The published-numbers CSV is missing or malformed."""


def load_paper_reference(path: str | os.PathLike = DEFAULT_PAPER_CSV) -> dict[str, list[PaperRow]]:
    """Table key -> published rows in the paper's order (the CSV's row order)."""
    path = Path(path)
    if not path.is_file():
        raise PaperReferenceError(
            f"paper reference numbers not found at {path}; restore results/paper/reference_results.csv "
            "from the repository (git checkout -- results/paper) or pass --paper PATH"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        needed = {"table", "method", "base", "strategy", "mask_branch", "metric", "value"}
        if missing := needed - set(frame.columns):
            raise PaperReferenceError(f"{path}: missing columns {sorted(missing)}")
        frame["value"] = frame["value"].astype(float)
    except (ValueError, pd.errors.ParserError) as err:
        if isinstance(err, PaperReferenceError):
            raise
        raise PaperReferenceError(f"{path}: not a valid reference CSV ({err})") from err
    unknown = sorted(set(frame["metric"]) - set(METRIC_TASK))
    if unknown:
        raise PaperReferenceError(f"{path}: unknown metrics {unknown}; known: {sorted(METRIC_TASK)}")
    tables: dict[str, list[PaperRow]] = {}
    index: dict[tuple, PaperRow] = {}
    for item in frame.itertuples(index=False):
        key = (item.table, item.base, item.strategy or None, item.mask_branch or None)
        if key not in index:
            row = PaperRow(
                item.table, item.method, item.base, key[2], key[3], len(tables.get(item.table, [])), {}
            )
            index[key] = row
            tables.setdefault(item.table, []).append(row)
        index[key].values[item.metric] = float(item.value)
    return tables


@dataclass
class TableRow:
    """One rendered row: where it sits, how it is labelled, which model fills it, what the paper says."""

    label: str
    group: str
    branch: str  # display value of the mask-branch column (Table C)
    identity: ModelIdentity | None
    paper: PaperRow | None
    sort_key: tuple = ()


def _group_rank(group: str) -> tuple:
    fixed = {REFERENCE_GROUP: 0, "mocov2": 1, "simclr": 2}
    if group == EXTERNAL_GROUP:
        return (9, group)
    return (fixed.get(group, 5), group)


def _extra_sort_key(identity: ModelIdentity) -> tuple:
    def rank(value: Any, order: tuple) -> tuple:
        return (order.index(value), "") if value in order else (len(order), str(value))

    return (
        rank(identity.masking, MASKING_ORDER),
        rank(identity.strategy, STRATEGY_ORDER),
        rank(identity.mask_branch, BRANCH_ORDER),
        identity.name,
    )


def _belongs_to_table_c(identity: ModelIdentity, ablated_bases: set[str]) -> bool:
    """Table C is the mask-branch ablation: a base's plain and saliency rows, for bases ablated in it."""
    if identity.base in ("random", "external"):
        return True
    return identity.base in ablated_bases and identity.masking in ("none", "saliency")


def layout_rows(
    spec: TableSpec, identities: Iterable[ModelIdentity], paper_rows: list[PaperRow]
) -> list[TableRow]:
    """Every row of one table, in order: paper rows (filled or empty), Random init, extras, externals."""
    identities = sorted(set(identities), key=lambda i: (i.name, str(i)))
    if spec.key == "C":
        ablated = {"mocov2"} | {
            i.base for i in identities if i.masking == "saliency" and i.mask_branch != "query"
        }
        identities = [i for i in identities if _belongs_to_table_c(i, ablated)]
    paper_by_key = {row.key: row for row in paper_rows}
    random_row = PaperRow(spec.key, BASE_LABELS["random"], "random", None, None, len(paper_rows), {})
    slots: dict[tuple, list[ModelIdentity]] = {row.key: [] for row in [*paper_rows, random_row]}
    extras: list[ModelIdentity] = []
    for identity in identities:
        key = identity.paper_key
        if identity.base != "external" and key in slots:
            slots[key].append(identity)
        else:
            extras.append(identity)

    rows: list[TableRow] = []
    for paper_row in [*paper_rows, random_row]:
        group = ModelIdentity(paper_row.base, "none", None, None, None, "none", None, "").group
        published = paper_row if paper_row.key in paper_by_key else None
        filled = slots[paper_row.key] or [None]
        for identity in filled:
            rows.append(
                TableRow(
                    label=paper_row.method,
                    group=group,
                    branch=paper_row.mask_branch or NO_BRANCH,
                    identity=identity,
                    paper=published,
                    sort_key=(_group_rank(group), 0, paper_row.order, identity.name if identity else ""),
                )
            )
    for identity in extras:
        rows.append(
            TableRow(
                label=identity.method_label(spec.branch_column),
                group=identity.group,
                branch=identity.mask_branch or NO_BRANCH,
                identity=identity,
                paper=None,
                sort_key=(_group_rank(identity.group), 1, _extra_sort_key(identity)),
            )
        )
    rows.sort(key=lambda row: row.sort_key)
    _disambiguate(rows)
    return rows


def _disambiguate(rows: list[TableRow]) -> None:
    """Give rows that share a label (and branch) a suffix naming what differs between their models."""
    by_label: dict[tuple[str, str, str], list[TableRow]] = {}
    for row in rows:
        by_label.setdefault((row.group, row.label, row.branch), []).append(row)
    for same in by_label.values():
        models = [row.identity for row in same if row.identity is not None]
        if len(models) < 2:
            continue
        for row in same:
            if row.identity is not None:
                row.label += row.identity.distinguishing(m for m in models if m is not row.identity)
