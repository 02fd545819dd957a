"""Config sections of the data path, the model and the training run: ``data``, ``aug``
(with its ``crops``), ``sampler``, ``loader``, ``profile``, ``model`` and ``train``. Each is a
frozen keyword-only dataclass whose ``__post_init__`` checks its own values and names the
fix. Part of the tree in fastinst/config/tree.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Tuple

from .errors import check
from .eval_sections import check_run_keys, check_sgd_keys


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
    # A file listing class names (synsets), one per line: keep only those classes, relabelled
    # 0..C-1 in sorted order (ImageNet-100); a sample's class is the first directory of its path.
    classes: str = ""

    def __post_init__(self):
        check(bool(self.path), "data.path", "must name a dataset directory")
        check(self.num_classes >= 0, "data.num_classes", "must be >= 0 (0 infers it)")


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """``count`` views of ``size``x``size`` px cut with a random-resized crop."""

    count: int = 2
    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self):
        check(self.count >= 1, "aug.crops[].count", "must be >= 1")
        check(self.size >= 8, "aug.crops[].size", "must be >= 8 pixels")
        lo, hi = self.scale
        check(0.0 < lo <= hi <= 1.0, "aug.crops[].scale", f"needs 0 < lo <= hi <= 1, got {self.scale}")
        lo, hi = self.ratio
        check(0.0 < lo <= hi, "aug.crops[].ratio", f"needs 0 < lo <= hi, got {self.ratio}")


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """Image mixture on each training view after its colour conversion and normalisation
    (Shen et al., "Rethinking Image Mixture for Unsupervised Visual Representation Learning";
    szq0214/CMC_with_Image_Mixture, IM/mixture.py; loaders/mixture.py). Defaults are the seed's
    train_CMC.py flags. The sample keeps its own index (its bank row): only its pixels change.

    kind: none; global (GM: ``g_num`` passes, each with p ``g_prob``, x <- lam x + (1 - lam) x2,
    lam ~ Beta(g_alpha, g_alpha), x2 a partner drawn from the whole data set, its own view);
    region (RM: ``r_num`` passes, each with p ``r_prob`` and never when r_beta <= 0, a CutMix box
    of the partner pasted, the first pass scaling x by ``r_pixel_decay``); im (global, then
    region, whose partners are themselves globally mixed, as the seed's RM(GM(dataset)));
    cutout (p ``cutout_p``: a ``mask_size`` square set to ``mask_color``); erasing (p
    ``random_erasing_prob``: up to ``max_attempt`` boxes of area in ``area_ratio_range`` and
    aspect in [min_aspect_ratio, 1 / min_aspect_ratio]; the first that fits is set to one U(0, 1)).
    """

    kind: Literal["none", "global", "region", "im", "cutout", "erasing"] = "none"
    g_alpha: float = 1.0
    g_num: int = 2
    g_prob: float = 0.1
    r_beta: float = 1.0
    r_prob: float = 0.1
    r_num: int = 2
    r_pixel_decay: float = 1.0
    mask_size: int = 50
    cutout_p: float = 0.1
    cutout_inside: bool = False
    mask_color: float = 0.0  # in normalised units, as the seed sets it after Normalize
    area_ratio_range: Tuple[float, float] = (0.02, 0.4)
    random_erasing_prob: float = 0.1
    min_aspect_ratio: float = 0.3
    max_attempt: int = 20

    def __post_init__(self):
        for name in ("g_prob", "r_prob", "cutout_p", "random_erasing_prob"):
            p = getattr(self, name)
            check(0.0 <= p <= 1.0, f"aug.mix.{name}", f"is a probability, got {p}")
        check(self.g_alpha > 0, "aug.mix.g_alpha", "must be > 0 (lam ~ Beta(g_alpha, g_alpha); the seed uses 1)")
        check(self.g_num >= 0 and self.r_num >= 0, "aug.mix.g_num", "g_num and r_num must be >= 0 (the seed: 2)")
        check(self.mask_size >= 1, "aug.mix.mask_size", "must be >= 1 pixel (the seed: 50)")
        lo, hi = self.area_ratio_range
        check(0.0 < lo <= hi <= 1.0, "aug.mix.area_ratio_range", f"needs 0 < lo <= hi <= 1, got {self.area_ratio_range}")
        check(0.0 < self.min_aspect_ratio <= 1.0, "aug.mix.min_aspect_ratio", "must lie in (0, 1] (the seed: 0.3)")
        check(self.max_attempt >= 1, "aug.mix.max_attempt", "must be >= 1 (the seed: 20)")

    @property
    def uses_partners(self) -> bool:
        """Whether views are mixed with other samples' views (global, region, im)."""
        return self.kind in ("global", "region", "im")


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
    # rgb, or CMC's lab / ycbcr (loaders/colour.py): converted after crop and flip, normalised
    # with CMC's constants (aug.mean / aug.std apply to rgb only).
    colorspace: Literal["rgb", "lab", "ycbcr"] = "rgb"
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Eval transform (kNN feature recompute, linear-probe val): resize shorter side, centre crop.
    eval_resize: int = 256
    eval_crop: int = 224
    # The image mixture on each training view (CMC's IM space; Cutout, RandomErasing).
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self):
        check(len(self.crops) >= 1, "aug.crops", "needs at least one crop group")
        for name in ("flip_p", "jitter_p", "grey_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            check(0.0 <= p <= 1.0, f"aug.{name}", f"is a probability, got {p}")
        b, c, s, h = self.jitter
        check(min(b, c, s) >= 0 and 0 <= h <= 0.5, "aug.jitter",
              "needs brightness/contrast/saturation >= 0 and 0 <= hue <= 0.5")
        lo, hi = self.blur_sigma
        check(0.0 < lo <= hi, "aug.blur_sigma", f"needs 0 < lo <= hi, got {self.blur_sigma}")
        check(all(x > 0 for x in self.std), "aug.std", "must be positive")
        check(self.eval_resize >= self.eval_crop, "aug.eval_resize", "must be >= aug.eval_crop")
        if self.mix.kind == "cutout" and self.mix.cutout_inside:
            smallest = min(c.size for c in self.crops)
            check(self.mix.mask_size <= smallest, "aug.mix.mask_size",
                  f"{self.mix.mask_size} does not fit inside the {smallest} px crops with aug.mix.cutout_inside=true")

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
            check(self.window > 0, "sampler.window", "must be > 0")
            check(0 < self.stride <= self.window, "sampler.stride", "needs 0 < stride <= window")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    backend: Literal["dali", "torch"] = "dali"
    batch_size: int = 256  # per rank
    # > 0: the global batch; each rank takes global_batch / world (which must divide it), so a
    # run relaunched at another world size (torchrun --nnodes=MIN:MAX after losing a node)
    # keeps its global batch and resumes from a resharded checkpoint. Overrides batch_size.
    global_batch: int = 0
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
        check(self.batch_size >= 1, "loader.batch_size", "must be >= 1")
        check(self.global_batch >= 0, "loader.global_batch", "must be >= 0 (0 = use loader.batch_size per rank)")
        check(self.num_threads >= 0, "loader.num_threads", "must be >= 0 (0 = auto)")
        check(self.num_workers >= 0, "loader.num_workers", "must be >= 0 (0 = auto)")
        check(self.prefetch >= 1, "loader.prefetch", "must be >= 1")
        check(0.0 <= self.hw_decoder_load <= 1.0, "loader.hw_decoder_load", "must lie in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    backends: Tuple[str, ...] = ("dali", "torch")
    warmup_batches: int = 5
    batches: int = 30
    # Also time the stages in isolation (read only, read+decode).
    stages: bool = True

    def __post_init__(self):
        for b in self.backends:
            check(b in ("dali", "torch"), "profile.backends", f"unknown backend {b!r}; use dali or torch")
        check(self.batches >= 1, "profile.batches", "must be >= 1")
        check(self.warmup_batches >= 0, "profile.warmup_batches", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """torchvision ResNet trunk + projection head (fastinst/core/model.py)."""

    # resnet*: torchvision's; alexnet: ISL's (small stem: its 32 px CIFAR AlexNet); alexnet_half:
    # CMC's half-width AlexNet (one per view: L / ab), fastinst/core/alexnet.py.
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet", "alexnet_half"] = "resnet50"
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
    # nn.Module.compile() (inductor); benchmarks/gpu measures the step with it on and off.
    compile: bool = False
    # cuDNN autotuning: each new input shape is timed once against the candidate kernels.
    cudnn_benchmark: bool = True

    def __post_init__(self):
        check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1 (NPID uses 128)")
        check(self.width > 0 and int(64 * self.width) >= 1, "model.width",
              f"must be > 0 with int(64 * width) >= 1 (1 = torchvision's widths), got {self.width}")
        check(self.hidden_dim >= 1, "model.hidden_dim", "must be >= 1")
        if self.arch.startswith("alexnet"):
            check(self.width == 1.0 and not self.zero_init_residual, "model.arch",
                  f"{self.arch} has the seed's fixed widths and no residual blocks: use model.width=1 and "
                  "model.zero_init_residual=false")
            check(self.arch == "alexnet" or self.stem == "imagenet", "model.stem",
                  "alexnet_half is CMC's 224 px AlexNet: use model.stem=imagenet (model.arch=alexnet with "
                  "model.stem=small is ISL's 32 px one)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 200
    # Learning rate for a global batch of lr_batch images; scaled linearly by the global batch.
    lr: float = 0.03
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # sgd: torch SGD (weight decay on every parameter, as lemniscate / PIC); lars: LARS
    # (fastinst/methods/simclr/ntxent.py; biases and BN excluded from decay and adaptation, as SimCLR).
    optimizer: Literal["sgd", "lars"] = "sgd"
    lars_eta: float = 1e-3  # LARS trust coefficient
    schedule: Literal["step", "cosine"] = "step"
    milestones: Tuple[int, ...] = (120, 160)  # epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0, per step
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs; 0 = no kNN evaluation during training
    ckpt_every: int = 1  # epochs; 0 = only at the end
    # > 0: also a checkpoint when this many minutes passed since the last one (decided on rank 0
    # at a log step and broadcast, so every rank saves the same step).
    ckpt_minutes: float = 0.0
    keep: int = 3  # complete checkpoints kept on disk
    # Consecutive steps with a non-finite loss (skipped: no optimiser step, no bank update)
    # before the run stops; the last good checkpoint is left untouched.
    max_nonfinite: int = 20
    max_steps: int = 0  # > 0 stops early (smoke runs); a checkpoint is written at the stop
    # auto: the newest complete checkpoint in <out>/checkpoints if any; none; or a path.
    resume: str = "auto"

    def __post_init__(self):
        check(self.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.lars_eta > 0, "train.lars_eta", "must be > 0 (SimCLR uses 0.001)")
        check_sgd_keys(self, "train")
        check(0.0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", "must lie in [0, train.epochs)")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = off)")
        check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
        check(self.ckpt_minutes >= 0, "train.ckpt_minutes", "must be >= 0 (0 = off)")
        check_run_keys(self, "train", "a checkpoint directory")
