"""Configuration: YAML -> a tree of typed, frozen, keyword-only dataclasses.

Every component owns one dataclass whose ``__post_init__`` checks its own values and says
how to fix a bad one. ``load_config(path, overrides)`` reads YAML, applies ``key.sub=value``
overrides (values parsed as YAML scalars/lists), and builds the tree. Unknown keys, wrong
types and impossible combinations fail here, at start-up, with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``cond`` (every component's __post_init__)."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


_check = check


# --------------------------------------------------------------------------- components


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # Directory holding either the ImageNet folder layout (train/<synset>/*.JPEG) or PIC's zip
    # layout (train.zip + train_map.txt with 'relpath<TAB>label'); the layout is detected.
    path: str = "data/fmnist"
    train_split: str = "train"
    val_split: str = "val"
    # none: read every sample from disk; part: this rank's shard in RAM (PIC --cache-mode part);
    # full: the whole split in RAM, one copy per node in shared memory.
    cache: Literal["none", "part", "full"] = "none"
    # Directory for the shared-memory cache files (one per node / rank).
    cache_dir: str = "/dev/shm"
    # raise: stop with an error naming the file; skip: count, log and leave the sample out.
    on_error: Literal["raise", "skip"] = "raise"
    # 0 = infer from the labels of the train split; otherwise labels must lie in [0, n).
    num_classes: int = 0

    def __post_init__(self):
        _check(bool(self.path), "data.path", "must name a dataset directory")
        _check(self.num_classes >= 0, "data.num_classes", "must be >= 0 (0 infers it)")


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """``count`` views of ``size``x``size`` px cut with a random-resized crop."""

    count: int = 2
    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        _check(self.count >= 1, "aug.crops[].count", "must be >= 1")
        _check(self.size >= 8, "aug.crops[].size", "must be >= 8 pixels")
        lo, hi = self.scale
        _check(0.0 < lo <= hi <= 1.0, "aug.crops[].scale", f"needs 0 < lo <= hi <= 1, got {self.scale}")
        lo, hi = self.ratio
        _check(0.0 < lo <= hi, "aug.crops[].ratio", f"needs 0 < lo <= hi, got {self.ratio}")


@dataclass(frozen=True, kw_only=True)
class AugConfig:
    """Training views. Defaults are SimCLR's recipe (Chen et al. 2020, also PIC's ``--aug SimCLR``).

    NPID (lemniscate): crop scale (0.2, 1), jitter 0.4/0.4/0.4/0.4 with p 1, grey 0.2, no blur.
    MoCo v2: crop scale (0.2, 1), jitter 0.4/0.4/0.4/0.1 with p 0.8, grey 0.2, blur p 0.5.
    """

    crops: Tuple[CropConfig, ...] = (CropConfig(),)
    flip_p: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness contrast saturation hue
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Eval transform (kNN feature recompute, linear-probe val): resize shorter side, centre crop.
    eval_resize: int = 256
    eval_crop: int = 224

    def __post_init__(self):
        _check(len(self.crops) >= 1, "aug.crops", "needs at least one crop group")
        for name in ("flip_p", "jitter_p", "grey_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            _check(0.0 <= p <= 1.0, f"aug.{name}", f"is a probability, got {p}")
        b, c, s, h = self.jitter
        _check(min(b, c, s) >= 0 and 0 <= h <= 0.5, "aug.jitter",
               "needs brightness/contrast/saturation >= 0 and 0 <= hue <= 0.5")
        lo, hi = self.blur_sigma
        _check(0.0 < lo <= hi, "aug.blur_sigma", f"needs 0 < lo <= hi, got {self.blur_sigma}")
        _check(all(x > 0 for x in self.std), "aug.std", "must be positive")
        _check(self.eval_resize >= self.eval_crop, "aug.eval_resize", "must be >= aug.eval_crop")

    @property
    def num_views(self) -> int:
        return sum(c.count for c in self.crops)


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    # epoch: disjoint rank shards covering the set once per epoch.
    # sliding_window: PIC's scheduler (each "epoch" is one window of `window` images).
    kind: Literal["epoch", "sliding_window"] = "epoch"
    seed: int = 0
    window: int = 131072
    stride: int = 16384
    # sliding_window only: draw a fresh order when a window crosses the end (PIC --shuffle-per-epoch).
    reshuffle: bool = False

    def __post_init__(self):
        if self.kind == "sliding_window":
            _check(self.window > 0, "sampler.window", "must be > 0")
            _check(0 < self.stride <= self.window, "sampler.stride", "needs 0 < stride <= window")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    backend: Literal["dali", "torch"] = "dali"
    batch_size: int = 256  # per rank
    # auto: GPU decoding ('mixed') when CUDA is available, else the same graph on the CPU.
    device: Literal["auto", "gpu", "cpu"] = "auto"
    # 0 = number of cores available to this process divided by local ranks.
    num_threads: int = 0
    # Python worker processes reading samples (DALI parallel external source / torch DataLoader).
    num_workers: int = 0
    prefetch: int = 2
    # Share of JPEG decoding sent to the A100/H100 hardware decoder (DALI hw_decoder_load).
    hw_decoder_load: float = 0.65
    # Deliver views as NCHW tensors stored channels-last (zero-copy from DALI's HWC output).
    channels_last: bool = True
    # Views in float16 instead of float32 (halves the host->GPU and GPU memory traffic).
    fp16: bool = False
    drop_last: bool = True

    def __post_init__(self):
        _check(self.batch_size >= 1, "loader.batch_size", "must be >= 1")
        _check(self.num_threads >= 0, "loader.num_threads", "must be >= 0 (0 = auto)")
        _check(self.num_workers >= 0, "loader.num_workers", "must be >= 0 (0 = auto)")
        _check(self.prefetch >= 1, "loader.prefetch", "must be >= 1")
        _check(0.0 <= self.hw_decoder_load <= 1.0, "loader.hw_decoder_load", "must lie in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    backends: Tuple[str, ...] = ("dali", "torch")
    warmup_batches: int = 5
    batches: int = 30
    # Also time the stages in isolation (read only, read+decode).
    stages: bool = True

    def __post_init__(self):
        for b in self.backends:
            _check(b in ("dali", "torch"), "profile.backends", f"unknown backend {b!r}; use dali or torch")
        _check(self.batches >= 1, "profile.batches", "must be >= 1")
        _check(self.warmup_batches >= 0, "profile.warmup_batches", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """torchvision ResNet trunk + projection head (fastinst/model.py)."""

    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    # imagenet: 7x7/2 conv + max-pool; small: 3x3/1 conv, no pool (lemniscate resnet_cifar, 28-96 px).
    stem: Literal["imagenet", "small"] = "imagenet"
    # Stage widths int(64 * width) * {1, 2, 4, 8}, the stem keeping 64 channels (CMC's
    # resnet50v1/v2/v3 are 0.5/1/2). 1 is the stock torchvision trunk, the only one that
    # loads into torchvision.models.<arch>() unchanged.
    width: float = 1.0
    embed_dim: int = 128  # NPID's low_dim
    head: Literal["linear", "mlp", "mlp_nobn"] = "linear"
    hidden_dim: int = 2048  # mlp and mlp_nobn heads only
    # Last BN of every residual block starts at gamma = 0 (bl0/PIC's resnet.py does this for
    # all its methods; lemniscate does not), so each block starts as the identity.
    zero_init_residual: bool = False
    channels_last: bool = True
    # auto: bf16 on CUDA, off on the CPU (CPU autocast is slow and not what the seeds ran).
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # BatchNorm statistics over all ranks (needs CUDA with more than one rank).
    sync_bn: bool = False
    compile: bool = False

    def __post_init__(self):
        _check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1 (NPID uses 128)")
        _check(self.width > 0 and int(64 * self.width) >= 1, "model.width",
               f"must be > 0 with int(64 * width) >= 1 (1 = torchvision's widths), got {self.width}")
        _check(self.hidden_dim >= 1, "model.hidden_dim", "must be >= 1")


def method_config_type():
    """The dataclass of config section ``method``: ``name`` plus one section per registered
    method, that method's own ``Config`` (declared next to it in fastinst/methods). Built from
    the registry once per set of registered methods (the methods import this module)."""
    from .methods import registered

    methods = registered()
    sections = tuple((n, cls.Config) for n, cls in methods.items() if cls.Config is not None)
    if sections not in _METHOD_TYPES:
        fields = [("name", str, field(default=next(iter(methods))))]  # the first registered
        fields += [(n, c, field(default_factory=c)) for n, c in sections]
        section = property(lambda self: getattr(self, self.name), doc="the chosen method's own section")
        cls = dataclasses.make_dataclass("MethodConfig", fields, frozen=True, kw_only=True,
                                         namespace={"section": section})
        cls.__module__ = __name__
        _METHOD_TYPES[sections] = cls
    return _METHOD_TYPES[sections]


_METHOD_TYPES: dict = {}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 200
    # Learning rate for a global batch of lr_batch images; scaled linearly by the global batch.
    lr: float = 0.03
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # sgd: torch SGD (weight decay on every parameter, as lemniscate / PIC); lars: LARS
    # (fastinst/simclr.py; biases and BN excluded from decay and adaptation, as SimCLR).
    optimizer: Literal["sgd", "lars"] = "sgd"
    lars_eta: float = 1e-3  # LARS trust coefficient
    schedule: Literal["step", "cosine"] = "step"
    milestones: Tuple[int, ...] = (120, 160)  # epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0, per step
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs; 0 = no kNN evaluation during training
    ckpt_every: int = 1  # epochs; 0 = only at the end
    keep: int = 3  # complete checkpoints kept on disk
    # Consecutive steps with a non-finite loss (skipped: no optimiser step, no bank update)
    # before the run stops; the last good checkpoint is left untouched.
    max_nonfinite: int = 20
    max_steps: int = 0  # > 0 stops early (smoke runs); a checkpoint is written at the stop
    # auto: the newest complete checkpoint in <out>/checkpoints if any; none; or a path.
    resume: str = "auto"

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.lr_batch >= 1, "train.lr_batch", "must be >= 1 (the batch train.lr is quoted for)")
        _check(0.0 <= self.momentum < 1.0, "train.momentum", "must lie in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.lars_eta > 0, "train.lars_eta", "must be > 0 (SimCLR uses 0.001)")
        _check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               "train.milestones", f"must be positive epochs in increasing order, got {list(self.milestones)}")
        _check(0.0 < self.gamma <= 1.0, "train.gamma", "must lie in (0, 1]")
        _check(0.0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", "must lie in [0, train.epochs)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = off)")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0 (0 = only at the end)")
        _check(self.keep >= 1, "train.keep", "must be >= 1")
        _check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
        _check(bool(self.resume), "train.resume", "use auto, none or a checkpoint directory")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Weighted kNN (NPID protocol, lemniscate test.py::kNN) on data.val_split."""

    knn_k: int = 200
    knn_sigma: float = 0.07
    # bank: train features are the memory bank rows; recompute: one pass of the eval transform.
    features: Literal["bank", "recompute"] = "bank"
    # Also evaluate the untrained network (recomputed features) before the first step: the
    # random-init baseline a trained model must beat.
    at_start: bool = False

    def __post_init__(self):
        _check(self.knn_k >= 1, "eval.knn_k", "must be >= 1 (NPID uses 200)")
        _check(self.knn_sigma > 0, "eval.knn_sigma", "must be > 0 (NPID uses 0.07)")


@dataclass(frozen=True, kw_only=True)
class LinearConfig:
    """Linear probe on frozen pooled backbone features (``launch.py linear``, fastinst/linear.py).

    Defaults are PIC's linear stage (main_linear.py, contrast/option.py with stage='linear'):
    SGD lr 30 for a batch of 256, momentum 0.9, no weight decay, cosine over 100 epochs with a
    5-epoch warm-up starting at lr/100 (--warmup-epoch 5, --warmup-multiplier 100); train views
    are its 'NULL' augmentation (random-resized crop of scale (0.08, 1) + flip, no colour
    jitter); val uses the eval transform (aug.eval_resize / aug.eval_crop). The batch size per
    rank is loader.batch_size.
    """

    epochs: int = 100
    # Learning rate for a global batch of lr_batch images; scaled linearly by the global batch.
    lr: float = 30.0
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: Tuple[int, ...] = (60, 80)  # epochs, step schedule (MoCo lincls' 100-epoch recipe)
    gamma: float = 0.1
    warmup_epochs: float = 5.0
    warmup_start: float = 0.01  # first warm-up step runs at lr * warmup_start (PIC: 1 / multiplier 100)
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_size: int = 0  # 0 = aug.eval_crop (224 for ImageNet)
    flip_p: float = 0.5
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    ckpt_every: int = 1  # epochs; 0 = only at the end
    keep: int = 2  # complete linear-head checkpoints kept on disk
    max_steps: int = 0  # > 0 stops early (smoke runs); evaluated and checkpointed at the stop
    # auto: the newest complete checkpoint in <out>/checkpoints if any; none; or a path.
    resume: str = "auto"

    def __post_init__(self):
        _check(self.epochs >= 1, "linear.epochs", "must be >= 1 (PIC uses 100)")
        _check(self.lr > 0, "linear.lr", "must be > 0 (PIC uses 30 for a batch of 256)")
        _check(self.lr_batch >= 1, "linear.lr_batch", "must be >= 1 (the batch linear.lr is quoted for)")
        _check(0.0 <= self.momentum < 1.0, "linear.momentum", "must lie in [0, 1)")
        _check(self.weight_decay >= 0, "linear.weight_decay", "must be >= 0 (PIC uses 0)")
        _check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               "linear.milestones", f"must be positive epochs in increasing order, got {list(self.milestones)}")
        _check(0.0 < self.gamma <= 1.0, "linear.gamma", "must lie in (0, 1]")
        _check(0.0 <= self.warmup_epochs < self.epochs, "linear.warmup_epochs",
               "must lie in [0, linear.epochs); set linear.warmup_epochs=0 for short runs")
        _check(0.0 < self.warmup_start <= 1.0, "linear.warmup_start", "must lie in (0, 1] (PIC: 0.01)")
        lo, hi = self.crop_scale
        _check(0.0 < lo <= hi <= 1.0, "linear.crop_scale", f"needs 0 < lo <= hi <= 1, got {self.crop_scale}")
        _check(self.crop_size == 0 or self.crop_size >= 8, "linear.crop_size",
               "must be 0 (= aug.eval_crop) or >= 8 pixels")
        _check(0.0 <= self.flip_p <= 1.0, "linear.flip_p", f"is a probability, got {self.flip_p}")
        _check(self.log_every >= 1, "linear.log_every", "must be >= 1")
        _check(self.eval_every >= 1, "linear.eval_every", "must be >= 1 (the probe's output is its accuracy)")
        _check(self.ckpt_every >= 0, "linear.ckpt_every", "must be >= 0 (0 = only at the end)")
        _check(self.keep >= 1, "linear.keep", "must be >= 1")
        _check(self.max_steps >= 0, "linear.max_steps", "must be >= 0 (0 = no limit)")
        _check(bool(self.resume), "linear.resume", "use auto, none or a linear checkpoint directory")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "fastinst"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = field(default_factory=lambda: method_config_type()())  # see method_config_type
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)

    def __post_init__(self):
        if self.sampler.kind == "sliding_window":
            _check(self.sampler.window >= self.loader.batch_size, "sampler.window",
                   "must be >= loader.batch_size (one window holds many batches)")
        # The method checks what it needs of the rest of the config (its views, say) at
        # start-up; the registry names the valid methods. Imported here: the methods import
        # this module.
        from .methods import method_class

        method_class(self.method.name).check_config(self)


# --------------------------------------------------------------------------- building


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(value, a, key)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin in (tuple, Tuple):
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    if cls is Config:
        hints["method"] = method_config_type()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown config key '{(prefix + '.' if prefix else '') + unknown[0]}' in {where}; "
            f"valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - every field has a default
        raise ConfigError(f"config section '{prefix or 'top level'}': {e}") from e


def parse_override(text: str) -> Tuple[list, Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, val = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(val) if val.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides) -> dict:
    raw = dict(raw)
    for text in overrides or ():
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return raw


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def load_config(path: Optional[str] = None, overrides=()) -> Config:
    raw = load_yaml(path) if path else {}
    try:
        return _build(Config, apply_overrides(raw, overrides))
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def config_from_dict(raw: dict, overrides=()) -> Config:
    return _build(Config, apply_overrides(raw, overrides))


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON dumps and checkpoints."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def save_config(cfg, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
