"""The benchmark matrix config (``configs/benchmark/<preset>.yaml``): read, check, and type it.

One YAML file per preset describes everything ``bash run_all.sh`` runs: the data, the methods (rows of the
paper's tables, each a pretraining config, a random init, or an external checkpoint), the transfer tasks
(columns: the runner module, its arguments and the preset's schedule overrides), the seeds and the
machine settings. ``--set key=value`` on the command line is merged over the file (OmegaConf dotlist),
so a test or a user can shrink a schedule without editing the file. Every problem is reported as one
:class:`BenchmarkConfigError` naming the key and the fix. See ``docs/benchmark.md`` for the format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer.records import TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "benchmark"
TASK_KINDS = ("detection", "linear")
SOURCES = ("pretrain", "random_init", "external")
LAUNCHERS = ("none", "torchrun", "num-gpus")  # how a cell uses several GPUs
MODEL_KEYS = ("base", "masking", "strategy", "mask_branch")
STAGES = ("pretrain", "pictures", "tables")  # --only words that are not task names or task kinds
# Every key the matrix config may hold: a misspelt key (in the file or in --set) is an error, not ignored.
_TASK_KEYS = ("kind", "record_task", "module", "args", "protocol", "needs", "launcher", "resume_args", "requires",
              "estimate_s", "timeout_s")
_METHOD_KEYS = ("source", "config", "checkpoint", "tasks", "overrides", "pictures", *MODEL_KEYS)
KNOWN_KEYS: dict[str, tuple[str, ...] | None] = {  # section -> its keys (None: not a mapping)
    "preset": None, "description": None, "arch": None, "image_size": None, "seeds": None, "pretrain_seed": None,
    "pretrain_per_seed": None,
    "data": ("root", "toy_world"),
    "machine": ("jobs", "gpus", "env", "warm_start", "stop_grace_s"),
    "pretrain": ("module", "config_dir", "data_subdir", "overrides", "resume_args", "launcher", "estimate_s",
                 "timeout_s"),
    "convert": ("estimate_s",),
    "pictures": ("module", "args", "estimate_s"),
    "tasks": None,
    "methods": None,
}


class BenchmarkConfigError(ValueError):
    """The benchmark config (or a command-line choice) is wrong; the message says how to fix it."""


@dataclass
class TaskSpec:
    """One transfer task (a column family of the tables), run by a runner module per model and seed."""

    key: str  # e.g. "voc"
    kind: str  # detection | linear
    record_task: str  # transfer.records.TASKS key, e.g. "voc_detection"
    module: str  # python -m MODULE
    args: list[str]  # extra arguments, appended after the shared flags (preset schedule, config file)
    protocol: str | None  # the protocol the runner records; used for the driver's own failed records
    needs: str  # "pkl": the converted detectron2 weights; "checkpoint": the suite checkpoint
    launcher: str  # none | torchrun | num-gpus
    resume_args: list[str]  # passed on every run so an interrupted run continues
    requires: list[str]  # paths under the data root the task reads (checked before anything runs)
    estimate_s: float
    timeout_s: float | None


@dataclass
class MethodSpec:
    """One model (a row of the tables): where its checkpoint comes from and what it is."""

    name: str  # record model.name; shell-friendly
    source: str  # pretrain | random_init | external
    config: str | None  # pretraining config (relative to pretrain.config_dir), pretrain only
    overrides: list[str]  # extra key=value for this method's pretraining
    checkpoint: str | None  # external only
    model: dict[str, Any]  # base / masking / strategy / mask_branch (labels failed/blocked rows)
    tasks: list[str] | None  # None: every task of the preset
    pictures: bool  # render the masking/saliency picture of this model


@dataclass
class PretrainSpec:
    module: str
    config_dir: str
    data_subdir: str  # ImageFolder root under the data root
    overrides: list[str]  # the preset's schedule, key=value, for every pretraining run
    resume_args: list[str]
    launcher: str
    estimate_s: float
    timeout_s: float | None


@dataclass
class PicturesSpec:
    """The masking picture of a model: copied from its run dir (module None) or rendered by a command."""

    module: str | None
    args: list[str]  # placeholders: {checkpoint} {data_root} {pretrain_data} {out} {run_dir} {name}
    estimate_s: float


@dataclass
class BenchmarkConfig:
    preset: str
    source: str  # the YAML file
    description: str
    data_root: str
    toy_world: dict[str, Any] | None  # generate the toy world at data_root with these settings
    arch: str
    image_size: int
    seeds: list[int]
    pretrain_seed: int
    pretrain_per_seed: bool
    jobs: int
    gpus: int
    env: dict[str, str]  # environment variables for every cell (a variable already set in the shell wins)
    stop_grace_s: float  # after SIGTERM (a timeout, the driver stopped), seconds before a cell is killed
    warm_start: bool  # start cells as forks of the preloaded driver where that is safe (transfer.warm_start)
    pretrain: PretrainSpec
    convert_estimate_s: float
    tasks: dict[str, TaskSpec]
    methods: dict[str, MethodSpec]
    pictures: PicturesSpec | None
    raw: dict[str, Any] = field(default_factory=dict)

    def task_groups(self) -> dict[str, list[str]]:
        """``--only`` words: every task key, every task kind (detection, linear) and the stages."""
        groups: dict[str, list[str]] = {key: [key] for key in self.tasks}
        for kind in TASK_KINDS:
            groups[kind] = [key for key, task in self.tasks.items() if task.kind == kind]
        return groups


def config_path_for(preset_or_path: str) -> Path:
    """``toy`` -> configs/benchmark/toy.yaml; an existing file path is taken as is."""
    candidate = Path(preset_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise BenchmarkConfigError(f"benchmark config {candidate} does not exist")
        return candidate
    path = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise BenchmarkConfigError(
            f"unknown preset '{preset_or_path}': no {path}. Known presets: {', '.join(known) or 'none'}; "
            "or pass --config FILE.yaml"
        )
    return path


def load_benchmark_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> BenchmarkConfig:
    """Read a matrix config and merge ``key=value`` overrides over it; raise one clear error if invalid."""
    path = Path(path)
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError as err:
        raise BenchmarkConfigError(f"benchmark config {path} does not exist") from err
    except Exception as err:  # yaml errors carry the line and column
        raise BenchmarkConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(node, DictConfig):
        raise BenchmarkConfigError(f"{path} must hold a mapping of keys")
    for item in overrides:
        if "=" not in item:
            raise BenchmarkConfigError(f"--set '{item}' is not key=value (e.g. --set seeds=[0,1])")
    try:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise BenchmarkConfigError(f"{path}: bad value or override: {str(err).splitlines()[0]}") from err
    return parse_config(raw, str(path))


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkConfigError(message)


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    _need(isinstance(value, list), f"{where} must be a list of strings, got {value!r}")
    return [str(item) for item in value]


def _number(value: Any, where: str, default: float | None) -> float | None:
    if value is None:
        return default
    _need(isinstance(value, (int, float)) and value >= 0, f"{where} must be a non-negative number, got {value!r}")
    return float(value)


def _unknown_keys(raw: dict[str, Any], where: str) -> None:
    """One error naming the first key the format does not have (a typo would otherwise be ignored)."""

    def check(node: Any, allowed: tuple[str, ...], at: str) -> None:
        if not isinstance(node, dict):
            return
        unknown = [str(key) for key in node if key not in allowed]
        _need(not unknown, f"{where}: unknown key '{at}{unknown[0] if unknown else ''}'; "
                           f"{at.rstrip('.') or 'the top level'} takes: {', '.join(allowed)} (docs/benchmark.md)")

    check(raw, tuple(KNOWN_KEYS), "")
    for section, keys in KNOWN_KEYS.items():
        if keys is not None:
            check(raw.get(section), keys, f"{section}.")
    for group, keys in (("tasks", _TASK_KEYS), ("methods", _METHOD_KEYS)):
        entries = raw.get(group)
        if isinstance(entries, dict):
            for name, spec in entries.items():
                check(spec, keys, f"{group}.{name}.")


def parse_config(raw: dict[str, Any], source: str) -> BenchmarkConfig:
    where = source
    _unknown_keys(raw, where)
    _need(isinstance(raw.get("preset"), str) and raw["preset"].isidentifier(),
          f"{where}: 'preset' must be a short name (letters, digits, _), got {raw.get('preset')!r}")
    data = raw.get("data") or {}
    _need(isinstance(data, dict), f"{where}: 'data' must be a mapping")
    toy_world = data.get("toy_world")
    _need(toy_world is None or isinstance(toy_world, dict), f"{where}: data.toy_world must be a mapping or null")
    seeds = raw.get("seeds", [0])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds),
          f"{where}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}")
    _need(len(set(seeds)) == len(seeds), f"{where}: 'seeds' has duplicates: {seeds}")

    pre = raw.get("pretrain") or {}
    pretrain = PretrainSpec(
        module=str(pre.get("module", "pretrain")),
        config_dir=str(pre.get("config_dir", "configs/pretrain")),
        data_subdir=str(pre.get("data_subdir", "imagenet100")),
        overrides=_strings(pre.get("overrides"), f"{where}: pretrain.overrides"),
        resume_args=_strings(pre.get("resume_args", ["resume=auto"]), f"{where}: pretrain.resume_args"),
        launcher=str(pre.get("launcher", "torchrun")),
        estimate_s=_number(pre.get("estimate_s"), f"{where}: pretrain.estimate_s", 60.0),
        timeout_s=_number(pre.get("timeout_s"), f"{where}: pretrain.timeout_s", None),
    )
    _need(pretrain.launcher in LAUNCHERS, f"{where}: pretrain.launcher must be one of {LAUNCHERS}")
    for item in pretrain.overrides:
        _need("=" in item, f"{where}: pretrain.overrides entry '{item}' is not key=value")

    tasks = {key: _parse_task(key, spec, where) for key, spec in (raw.get("tasks") or {}).items()}
    _need(bool(tasks), f"{where}: 'tasks' is empty; a preset needs at least one transfer task")
    methods = {name: _parse_method(name, spec, tasks, where) for name, spec in (raw.get("methods") or {}).items()}
    _need(bool(methods), f"{where}: 'methods' is empty; a preset needs at least one model")

    pictures = None
    if raw.get("pictures") is not None:
        pic = raw["pictures"]
        _need(isinstance(pic, dict), f"{where}: pictures must be a mapping (module, args, estimate_s)")
        pictures = PicturesSpec(
            module=str(pic["module"]) if pic.get("module") else None,
            args=_strings(pic.get("args"), f"{where}: pictures.args"),
            estimate_s=_number(pic.get("estimate_s"), f"{where}: pictures.estimate_s", 10.0),
        )
    machine = raw.get("machine") or {}
    jobs, gpus = machine.get("jobs", 1), machine.get("gpus", 1)
    _need(isinstance(jobs, int) and jobs >= 1, f"{where}: machine.jobs must be an integer >= 1")
    _need(isinstance(gpus, int) and gpus >= 0, f"{where}: machine.gpus must be an integer >= 0")
    env = machine.get("env") or {}
    warm_start = machine.get("warm_start", True)
    _need(isinstance(warm_start, bool), f"{where}: machine.warm_start must be true or false")
    grace = machine.get("stop_grace_s", 20)
    _need(isinstance(grace, (int, float)) and not isinstance(grace, bool) and grace > 0,
          f"{where}: machine.stop_grace_s must be a number of seconds > 0 (how long a stopped cell may take to save "
          "its step; raise it for paper-scale detection)")
    _need(isinstance(env, dict) and all(isinstance(k, str) and k.isidentifier() and isinstance(v, (str, int, float))
                                        and not isinstance(v, bool) for k, v in env.items()),
          f"{where}: machine.env must map environment variable names to strings or numbers, e.g. {{FOO: '1'}}")
    return BenchmarkConfig(
        preset=raw["preset"],
        source=source,
        description=str(raw.get("description", "")).strip(),
        data_root=str(data.get("root", f"data/{raw['preset']}")),
        toy_world=dict(toy_world) if toy_world else None,
        arch=str(raw.get("arch", "resnet50")),
        image_size=int(raw.get("image_size", 224)),
        seeds=list(seeds),
        pretrain_seed=int(raw.get("pretrain_seed", 0)),
        pretrain_per_seed=bool(raw.get("pretrain_per_seed", False)),
        jobs=jobs,
        gpus=gpus,
        env={str(k): str(v) for k, v in env.items()},
        warm_start=warm_start,
        stop_grace_s=float(grace),
        pretrain=pretrain,
        convert_estimate_s=_number((raw.get("convert") or {}).get("estimate_s"), f"{where}: convert.estimate_s", 6.0),
        tasks=tasks,
        methods=methods,
        pictures=pictures,
        raw=raw,
    )


def _parse_task(key: str, spec: Any, where: str) -> TaskSpec:
    at = f"{where}: tasks.{key}"
    _need(isinstance(spec, dict), f"{at} must be a mapping")
    _need(key.isidentifier() and key not in STAGES + TASK_KINDS,
          f"{at}: task names must be identifiers other than {STAGES + TASK_KINDS}")
    kind = spec.get("kind")
    _need(kind in TASK_KINDS, f"{at}.kind must be one of {TASK_KINDS}, got {kind!r}")
    record_task = spec.get("record_task")
    _need(record_task in TASKS, f"{at}.record_task must be one of {list(TASKS)}, got {record_task!r}")
    default_module = {"detection": "transfer.detection", "linear": "transfer.linear"}[kind]
    task = TaskSpec(
        key=key,
        kind=kind,
        record_task=record_task,
        module=str(spec.get("module", default_module)),
        args=_strings(spec.get("args"), f"{at}.args"),
        protocol=spec.get("protocol"),
        needs=str(spec.get("needs", "pkl" if kind == "detection" else "checkpoint")),
        launcher=str(spec.get("launcher", "num-gpus" if kind == "detection" else "none")),
        resume_args=_strings(spec.get("resume_args", ["--resume"] if kind == "detection" else []), f"{at}.resume_args"),
        requires=_strings(spec.get("requires"), f"{at}.requires"),
        estimate_s=_number(spec.get("estimate_s"), f"{at}.estimate_s", 30.0),
        timeout_s=_number(spec.get("timeout_s"), f"{at}.timeout_s", None),
    )
    _need(task.needs in ("pkl", "checkpoint"), f"{at}.needs must be 'pkl' or 'checkpoint'")
    _need(task.launcher in LAUNCHERS, f"{at}.launcher must be one of {LAUNCHERS}")
    return task


def _parse_method(name: str, spec: Any, tasks: dict[str, TaskSpec], where: str) -> MethodSpec:
    at = f"{where}: methods.{name}"
    _need(isinstance(spec, dict), f"{at} must be a mapping")
    _need(bool(name) and all(ch.isalnum() or ch in "-_.+" for ch in name),
          f"{at}: method names may only hold letters, digits and - _ . +")
    source = spec.get("source", "pretrain")
    _need(source in SOURCES, f"{at}.source must be one of {SOURCES}, got {source!r}")
    config = spec.get("config")
    _need(source != "pretrain" or bool(config), f"{at}: a pretrained method needs 'config' (a pretraining YAML)")
    checkpoint = spec.get("checkpoint")
    _need(source != "external" or bool(checkpoint), f"{at}: an external method needs 'checkpoint' (a file)")
    method_tasks = spec.get("tasks")
    if method_tasks is not None:
        method_tasks = _strings(method_tasks, f"{at}.tasks")
        unknown = [t for t in method_tasks if t not in tasks]
        _need(not unknown, f"{at}.tasks names unknown tasks {unknown}; known: {list(tasks)}")
    default_base = {"random_init": "random", "external": "external"}.get(source, "")
    model = {key: spec.get(key) for key in MODEL_KEYS}
    model["base"] = model["base"] or default_base
    model["masking"] = model["masking"] or "none"
    _need(bool(model["base"]), f"{at}.base is required (mocov2, simclr, supervised, ...): it labels the row")
    return MethodSpec(
        name=name,
        source=source,
        config=str(config) if config else None,
        overrides=_strings(spec.get("overrides"), f"{at}.overrides"),
        checkpoint=str(checkpoint) if checkpoint else None,
        model=model,
        tasks=method_tasks,
        pictures=bool(spec.get("pictures", False)),
    )
