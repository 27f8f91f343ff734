"""The matrix as cells: which work a benchmark run holds, in which order, and what waits for what.

A *cell* is one unit of work with one log file and one state file: the toy data, a model's checkpoint
(pretraining, random init or an external file), its conversion to detectron2, one transfer task for one
seed, a masking picture, the tables. Cells are listed model by model (a model's checkpoint, conversion and
transfer runs, then the next model), so a run that is stopped early already holds complete rows, and with
``--jobs 2`` the transfer runs of one model overlap the pretraining of the next.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from transfer.benchmark_config import TASK_KINDS, BenchmarkConfig, BenchmarkConfigError

MODEL_KINDS = ("pretrain", "random_init", "external")  # cells whose output is a checkpoint
TRANSFER_KINDS = TASK_KINDS


@dataclass(frozen=True)
class Cell:
    id: str  # e.g. "pretrain/mocov2_hp/seed0", "voc/mocov2_hp/seed0", "tables"
    kind: str  # data | pretrain | random_init | external | convert | detection | linear | pictures | tables
    method: str | None = None
    task: str | None = None  # the benchmark task key (transfer cells)
    seed: int | None = None  # transfer seed (transfer cells) or pretraining seed (model, convert cells)
    deps: tuple[str, ...] = ()
    model_cell: str | None = None  # the cell whose checkpoint this cell uses

    @property
    def slug(self) -> str:
        """File-name form of the id (logs, state files)."""
        return self.id.replace("/", "__")

    @property
    def title(self) -> str:
        parts = [self.task or self.kind.replace("_", "-")]
        if self.method:
            parts.append(self.method)
        if self.seed is not None and self.kind != "external":
            parts.append(f"seed {self.seed}")
        return " · ".join(parts)


@dataclass
class Plan:
    cells: dict[str, Cell] = field(default_factory=dict)  # in execution order

    def add(self, cell: Cell) -> Cell:
        if cell.id in self.cells:
            raise BenchmarkConfigError(f"two cells share the id {cell.id}; method names must be unique")
        self.cells[cell.id] = cell
        return cell

    def __iter__(self):
        return iter(self.cells.values())

    def __len__(self) -> int:
        return len(self.cells)

    def dependents(self, cell_id: str) -> list[Cell]:
        """Every cell that needs ``cell_id``, directly or through others (for 'blocked' reports)."""
        found: dict[str, Cell] = {}
        frontier = [cell_id]
        while frontier:
            current = frontier.pop()
            for cell in self.cells.values():
                if current in cell.deps and cell.id not in found and cell.kind != "tables":
                    found[cell.id] = cell
                    frontier.append(cell.id)
        return list(found.values())


@dataclass
class Selection:
    """What the command line asked for (defaults: everything in the preset)."""

    methods: list[str] | None = None  # names or shell patterns (fnmatch); None: all
    only: list[str] | None = None  # task keys, task kinds, "pretrain", "pictures", "tables"; None: all
    tables: bool = True


def select_methods(config: BenchmarkConfig, patterns: list[str] | None) -> list[str]:
    names = list(config.methods)
    if not patterns:
        return names
    chosen: list[str] = []
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise BenchmarkConfigError(
                f"--methods: '{pattern}' matches no method of preset '{config.preset}'; methods: {', '.join(names)}"
            )
        chosen.extend(name for name in matched if name not in chosen)
    return [name for name in names if name in chosen]  # keep the config's (the tables') order


def select_stages(config: BenchmarkConfig, only: list[str] | None) -> tuple[list[str], set[str]]:
    """(task keys, stages) from ``--only``; stages are among pretrain / pictures / tables.

    A model's checkpoint is made whenever a selected task or picture needs it; the ``pretrain`` stage
    asks for every selected model's checkpoint even without a task.
    """
    if not only:
        return list(config.tasks), {"pretrain", "pictures", "tables"}
    groups = config.task_groups()
    tasks: list[str] = []
    stages: set[str] = {"tables"}
    for word in only:
        if word in ("pretrain", "pictures", "tables"):
            stages.add(word)
        elif word in groups:
            tasks.extend(key for key in groups[word] if key not in tasks)
        else:
            known = sorted(set(groups) | {"pretrain", "pictures", "tables"})
            raise BenchmarkConfigError(f"--only: unknown word '{word}'; choose from {', '.join(known)}")
    return [key for key in config.tasks if key in tasks], stages


def forced_cells(plan: Plan, config: BenchmarkConfig, selection: Selection) -> set[str]:
    """The cells ``--force`` reruns: those the selection names, not the checkpoints they merely need.

    ``--force --only linear`` reruns the linear evaluations, not the pretraining; ``--force`` alone (or with
    ``pretrain`` in ``--only``) reruns the checkpoints too. The toy data and the tables are never forced.
    """
    tasks, stages = select_stages(config, selection.only)
    chosen = set()
    for cell in plan:
        if cell.kind in (*MODEL_KINDS, "convert"):
            if "pretrain" in stages and cell.kind != "external":
                chosen.add(cell.id)
        elif cell.task in tasks or (cell.kind == "pictures" and "pictures" in stages):
            chosen.add(cell.id)
    return chosen


def build_plan(config: BenchmarkConfig, selection: Selection | None = None) -> Plan:
    selection = selection or Selection()
    methods = select_methods(config, selection.methods)
    tasks, stages = select_stages(config, selection.only)
    plan = Plan()
    data_deps: tuple[str, ...] = ()
    if config.toy_world:
        data_deps = (plan.add(Cell("data", "data")).id,)

    for name in methods:
        method = config.methods[name]
        method_tasks = [t for t in tasks if method.tasks is None or t in method.tasks]
        wants_pictures = "pictures" in stages and method.pictures and config.pictures is not None
        if not (method_tasks or wants_pictures or "pretrain" in stages):
            continue
        model_seeds = config.seeds if config.pretrain_per_seed else [config.pretrain_seed]
        for model_seed in model_seeds:
            if method.source == "external":
                model_id = f"external/{name}"
                if model_id in plan.cells:
                    continue
                model = plan.add(Cell(model_id, "external", name, seed=model_seed))
            else:
                deps = data_deps if method.source == "pretrain" else ()
                model = plan.add(Cell(f"{method.source}/{name}/seed{model_seed}", method.source, name,
                                      seed=model_seed, deps=deps))
            needs_pkl = any(config.tasks[t].needs == "pkl" for t in method_tasks)
            converted = None
            if needs_pkl:
                converted = plan.add(Cell(f"convert/{name}/seed{model_seed}", "convert", name, seed=model_seed,
                                          deps=(model.id,), model_cell=model.id))
            transfer_seeds = [model_seed] if config.pretrain_per_seed else config.seeds
            for task_key in method_tasks:
                task = config.tasks[task_key]
                weights = converted if task.needs == "pkl" else model
                for seed in transfer_seeds:
                    plan.add(Cell(f"{task_key}/{name}/seed{seed}", task.kind, name, task_key, seed,
                                  deps=(*data_deps, weights.id), model_cell=model.id))
            if wants_pictures and model_seed == model_seeds[0]:
                plan.add(Cell(f"pictures/{name}", "pictures", name, seed=model_seed,
                              deps=(*data_deps, model.id), model_cell=model.id))

    if (selection.methods or selection.only) and (tasks or stages - {"tables"}) and not any(c.method for c in plan):
        runs = "; ".join(f"{name}: {', '.join(config.methods[name].tasks or list(config.tasks))}" for name in methods)
        raise BenchmarkConfigError(
            f"--methods/--only select no cell: no chosen method runs {', '.join(tasks or sorted(stages - {'tables'}))} "
            f"(tasks per method: {runs}); choose tasks the methods have, or other methods")
    if data_deps and not any("data" in cell.deps for cell in plan):
        del plan.cells["data"]
    if selection.tables and "tables" in stages:
        # Runs last, whatever failed: the tables show failed cells as failed, never as zero.
        plan.add(Cell("tables", "tables", deps=tuple(plan.cells)))
    return plan
