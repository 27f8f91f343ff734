"""The cell kinds of a benchmark run, by name (the ``kind`` of :class:`transfer.benchmark_plan.Cell`)."""

from __future__ import annotations

from transfer.benchmark_cells import (
    CellKind,
    Convert,
    External,
    Pictures,
    Pretrain,
    RandomInit,
    Tables,
    ToyData,
)
from transfer.benchmark_transfer import Transfer

KINDS: dict[str, CellKind] = {
    "data": ToyData(),
    "pretrain": Pretrain(),
    "random_init": RandomInit(),
    "external": External(),
    "convert": Convert(),
    "detection": Transfer(),
    "linear": Transfer(),
    "pictures": Pictures(),
    "tables": Tables(),
}
