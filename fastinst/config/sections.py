"""Config sections of the data path, the model and the training run: ``data``, ``sampler``,
``loader``, ``profile``, ``model`` and ``train`` (the views, ``aug``, are aug_sections.py). Each
is a frozen keyword-only dataclass whose ``__post_init__`` checks its own values and names the
fix. Part of the tree in fastinst/config/tree.py.
"""
from __future__ import annotations

from dataclasses import dataclass
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
