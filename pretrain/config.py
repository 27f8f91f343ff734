"""Pretraining configuration: a typed OmegaConf schema, YAML files with ``_base_`` inheritance, overrides.

A config file may name the files it builds on::

    _base_: [../base/mocov2.yaml, ../base/masking_hp.yaml]   # paths relative to this file, merged in order
    train: {epochs: 30}                                        # then this file's own keys

The merged YAML, then the command-line ``key=value`` overrides, are merged over the schema below (plus
the chosen method's own section, e.g. ``mocov2:``), so a typo or a wrong type is an error that names the
key, never silently ignored. The resolved config is what a run records (``config.yaml``, checkpoint meta).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from pretrain.encoder import SALIENCY_LAYERS
from pretrain.masking import MaskingParams

BASE_KEY = "_base_"
STRATEGIES = ("hp", "blur", "mean")
MASK_BRANCHES = ("query", "key", "both")
SALIENCY_SOURCES = ("momentum", "frozen", "none")
# Masking kinds that run on the saliency-guided machinery (a baseline such as MSCN adds its name here).
# mscn (Masked Siamese ConvNets): random masking = the hp strategy with uniform saliency, no hard negatives.
GUIDED_MASKING = ("saliency", "mscn")


class ConfigError(ValueError):
    """A config file or override is missing, malformed or inconsistent."""


@dataclass
class DataConfig:
    root: str = "???"  # ImageFolder root holding <train_split>/<class>/* and <val_split>/<class>/*
    train_split: str = "train"
    val_split: str = "val"  # held out: the kNN monitor's queries and the pictures' images
    batch_size: int = 256  # global batch, split evenly over the processes
    num_workers: int = 8
    pin_memory: bool = True
    limit_train_images: int | None = None  # use a fixed, class-balanced subset (short schedules)


@dataclass
class AugmentConfig:
    """aug+ of MoCo v2 (SimCLR's configs raise the jitter strength)."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1  # kernel = the odd integer nearest this fraction of image_size
    flip_p: float = 0.5
    eval_resize_ratio: float = 256 / 224  # evaluation: Resize(ratio * size) + CenterCrop(size)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    zero_init_residual: bool = False


@dataclass
class MaskingSection(MaskingParams):
    """Whether, on which branch and with which strategy to mask; the masking parameters are ``MaskingParams``."""

    name: str = "none"  # none | saliency | mscn (guided machinery) | adios (set by the ADIOS methods)
    strategy: str | None = None  # hp | blur | mean (required when masking)
    branch: str = "query"  # query | key | both
    alpha: float = 2.0  # weight of the hard-negative logits
    input_filter: dict[str, Any] = field(
        default_factory=lambda: {"name": "highpass", "kernel_size": 11, "sigma": 5.0}
    )  # what "hp" applies to every view (recorded in the checkpoint); ignored by other strategies


@dataclass
class SaliencyConfig:
    source: str = "momentum"  # momentum | frozen | none
    # layer4: the last conv map (SCDA, the paper); layer3: the stage before it, twice as fine, for small
    # images (at 64 px layer4 is 2x2 and its map mostly encodes position, docs/pretraining.md)
    feature_layer: str = "layer4"
    checkpoint: str | None = None  # frozen: a local suite checkpoint or torchvision ResNet state_dict
    query_map: str = "mapped"  # mapped: key map resampled by crop geometry | forward: extra no-grad pass
    std_ratio: float = 0.6
    cache_dir: str | None = None  # frozen only: cache whole-image maps here, map them onto crops (issue 9)
    cache_image_size: int | None = None  # whole-image size for the cache (default 2 x augment.image_size)


@dataclass
class CompatConfig:
    released_code: bool = False  # reproduce SPEC 1.1 (row-sorted threshold) and 1.2 (sample-0 negative)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.03  # absolute, for data.batch_size
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    lars_eta: float = 0.02
    lars_exclude_bias_and_norm: bool = True  # lars: no adaptation or decay for them; adamw: no decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None  # max global grad norm


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0  # linear warm-up from 0
    final_lr_fraction: float = 0.0  # cosine ends at lr * this


@dataclass
class TrainConfig:
    epochs: int = 200
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16 + scaler; off on CPU) | bf16 | fp16 | off
    channels_last: bool = True  # CUDA only
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_minutes: float | None = None  # also write checkpoint_last.pth this often (besides every epoch)
    every_steps: int | None = None


@dataclass
class LogConfig:
    every_steps: int = 10  # TensorBoard scalars
    progress: bool = True  # tqdm


@dataclass
class KnnConfig:
    enabled: bool = True
    k: int = 200
    temperature: float = 0.1
    every_epochs: int = 1
    at_start: bool = True  # also evaluate the initial (random) network: the run's own baseline
    bank_per_class: int | None = None  # cap of train images per class in the memory bank
    max_queries: int | None = None
    batch_size: int = 256


@dataclass
class VisualizeConfig:
    enabled: bool = True
    num_images: int = 6
    every_epochs: int = 1


@dataclass
class PretrainConfig:
    name: str = "pretrain"  # defaults to the config file's stem
    method: str = "mocov2"
    seed: int = 0
    out_dir: str = "runs/pretrain/${name}"
    resume: str = "auto"  # auto: continue checkpoint_last.pth if present | never | PATH of a checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingSection = field(default_factory=MaskingSection)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)


# Keys that change how a run is executed but not what it computes: a resumed run may differ in them.
RUNTIME_KEYS = (
    "name", "out_dir", "resume", "data.num_workers", "data.pin_memory", "log", "checkpoint", "visualize",
    "knn.batch_size", "train.device",
)


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over the files its ``_base_`` names (recursively, relative paths)."""
    path = Path(path).resolve()
    if not path.is_file():
        where = f" (named in {_seen[-1]})" if _seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path in _seen:
        raise ConfigError(f"config files include each other in a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends, all with the location in the text
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys, not a {type(node).__name__}")
    bases = node.pop(BASE_KEY, None)
    if bases is None:
        return node
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, ListConfig | list):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name or a list of file names")
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, read_yaml_tree(path.parent / str(base), _seen + (path,)))
    return OmegaConf.merge(merged, node)


def schema(method: str) -> DictConfig:
    """The typed defaults: the engine's sections plus the method's own section (named after it)."""
    from pretrain.methods import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(sorted(METHODS))}")
    base = OmegaConf.structured(PretrainConfig)
    method_cls = METHODS[method]
    sections: dict[str, type] = {}
    if method_cls.Config is not None:
        sections[method_cls.config_section or method] = method_cls.Config
    sections.update(method_cls.extra_sections)
    if sections:
        OmegaConf.set_struct(base, False)
        for section, section_config in sections.items():
            base[section] = OmegaConf.structured(section_config)
        OmegaConf.set_struct(base, True)
    return base


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Read, merge, type-check and validate a config; ``path`` None means the schema defaults only."""
    file_node = read_yaml_tree(path) if path is not None else OmegaConf.create({})
    try:
        override_node = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, YAMLError) as err:
        bad = _unparsable_override(overrides)
        raise ConfigError(f"cannot parse the override {bad!r}: {_first_line(err)}. Use key=value with a YAML "
                          "value, e.g. train.epochs=10 or masking.query_ratio=[0.1,0.3]") from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.epochs=10)")
    method = override_node.get("method", file_node.get("method", PretrainConfig.method))
    cfg = schema(str(method))
    if path is not None and "name" not in file_node and "name" not in override_node:
        cfg.name = Path(path).stem
    for source, node in (("config file", file_node), ("overrides", override_node)):
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise ConfigError(f"invalid key or value in the {source}: {_describe(err)}{_suggestion(cfg, err)}") from err
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve an interpolation: {_describe(err)}") from err
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError("data.root is not set: pass data.root=DIR (an ImageFolder root with train/ and val/)")
    validate(cfg)
    return cfg


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unparsable_override(overrides: list[str] | tuple[str, ...]) -> str:
    """The first override whose value OmegaConf cannot parse on its own (all of them if none is)."""
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, YAMLError):
            return item
    return " ".join(overrides)


def _suggestion(cfg: DictConfig, err: OmegaConfBaseException) -> str:
    """'; did you mean train.epochs?' for a misspelt key, else ''."""
    key = getattr(err, "full_key", None)
    if not key or "not in" not in str(err):
        return ""
    parent, _, leaf = str(key).rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


def _describe(err: OmegaConfBaseException) -> str:
    text = str(err).strip().splitlines()
    key = getattr(err, "full_key", None)
    first = text[0] if text else type(err).__name__
    return f"{first} (key: {key})" if key and key not in first else first


def validate(cfg: DictConfig) -> None:
    """Semantic checks the types alone cannot express, each with the fix in the message."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    from pretrain.methods import METHODS

    masking = cfg.masking
    own_masking = METHODS[cfg.method].own_masking
    if own_masking:
        need(masking.name == own_masking, f"method {cfg.method} does its own masking: masking.name must be "
             f"'{own_masking}', got '{masking.name}'")
    else:
        need(masking.name == "none" or masking.name in GUIDED_MASKING,
             f"masking.name must be 'none' or one of {GUIDED_MASKING}, got '{masking.name}'")
    if masking.name == "mscn":  # random masking (Jing et al. 2022) on the hp machinery
        need(masking.strategy == "hp", f"masking.name=mscn is high-pass + noise masking: masking.strategy must "
             f"be 'hp', got {masking.strategy!r}")
        need(cfg.saliency.source == "none", "masking.name=mscn masks at random: saliency.source must be 'none' "
             f"(uniform), got '{cfg.saliency.source}'; use masking.name=saliency for saliency-guided masking")
        need(masking.num_hard_negatives == 0, "masking.name=mscn has no hard negatives: masking.num_hard_negatives "
             f"must be 0, got {masking.num_hard_negatives}")
        need(masking.branch in ("query", "key"), "masking.name=mscn masks one branch: masking.branch must be "
             f"'query' or 'key', got '{masking.branch}'")
    if masking.name in GUIDED_MASKING:
        need(masking.strategy in STRATEGIES,
             f"masking.strategy must be one of {STRATEGIES} when masking, got {masking.strategy!r}")
        need(masking.branch in MASK_BRANCHES, f"masking.branch must be one of {MASK_BRANCHES}, got '{masking.branch}'")
        need(masking.num_hard_negatives >= 0, "masking.num_hard_negatives must be >= 0")
        need(cfg.saliency.source in SALIENCY_SOURCES,
             f"saliency.source must be one of {SALIENCY_SOURCES}, got '{cfg.saliency.source}'")
        need(cfg.saliency.feature_layer in SALIENCY_LAYERS,
             f"saliency.feature_layer must be one of {SALIENCY_LAYERS}, got '{cfg.saliency.feature_layer}'")
        need(cfg.saliency.query_map in ("mapped", "forward"),
             f"saliency.query_map must be 'mapped' or 'forward', got '{cfg.saliency.query_map}'")
        need(cfg.saliency.source != "frozen" or bool(cfg.saliency.checkpoint),
             "saliency.source=frozen needs saliency.checkpoint=PATH (a local ResNet checkpoint)")
        need(not cfg.saliency.cache_dir or cfg.saliency.source == "frozen",
             "saliency.cache_dir only applies to saliency.source=frozen (a trained network's maps change)")
        for name in ("query_ratio", "negative_ratio"):
            low, high = masking[name]
            need(0.0 <= low <= high <= 1.0, f"masking.{name} must be [low, high] within [0, 1], got {[low, high]}")
    need(cfg.data.batch_size >= 2, "data.batch_size must be at least 2")
    need(cfg.train.epochs >= 1, "train.epochs must be at least 1")
    need(cfg.knn.k >= 1, f"knn.k must be at least 1 (neighbours that vote), got {cfg.knn.k}")
    need(cfg.data.limit_train_images is None or cfg.data.limit_train_images >= 1,
         f"data.limit_train_images must be a positive number of images or null (all), got {cfg.data.limit_train_images}")
    need(cfg.optim.name in ("sgd", "lars", "adamw"),
         f"optim.name must be 'sgd', 'lars' or 'adamw', got '{cfg.optim.name}'")
    need(cfg.schedule.name in ("cosine", "constant"),
         f"schedule.name must be 'cosine' or 'constant', got '{cfg.schedule.name}'")
    need(cfg.train.amp in ("auto", "bf16", "fp16", "off"),
         f"train.amp must be auto, bf16, fp16 or off, got '{cfg.train.amp}'")
    need(cfg.train.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got '{cfg.train.device}'")
    lo, hi = cfg.augment.crop_scale
    need(0 < lo <= hi <= 1, f"augment.crop_scale must be [low, high] within (0, 1], got {[lo, hi]}")
    need(cfg.augment.image_size >= 32, "augment.image_size must be at least 32 (ResNets downsample 32x)")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (for checkpoint meta and hashing)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def without_runtime_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config without the keys that do not change what a run computes."""
    result = _deep_copy(config)
    for dotted in RUNTIME_KEYS:
        *parents, leaf = dotted.split(".")
        node = result
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return result


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs (for a clear resume error)."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for key in keys:
        dotted = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_differences(va, vb, dotted + "."))
        elif va != vb:
            out.append(f"{dotted}: {va!r} -> {vb!r}")
    return out


def dataclass_kwargs(cls: type, section: DictConfig | dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The entries of a config section that ``cls`` (a dataclass) accepts, as plain values (tuples kept)."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name in names:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    kwargs.update(extra)
    return kwargs
