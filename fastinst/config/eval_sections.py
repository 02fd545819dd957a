"""Config sections of evaluation and the process group: the kNN during training (``eval``),
the linear probe (``linear``), the SVMs (``svm``), torch.distributed (``dist``), and the key
checks the training and probe sections share. Part of the tree in fastinst/config/tree.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from .errors import check


def check_sgd_keys(c, prefix: str) -> None:
    """The SGD schedule keys a training run and a probe share: lr_batch, momentum, milestones, gamma."""
    check(c.lr_batch >= 1, f"{prefix}.lr_batch", f"must be >= 1 (the batch {prefix}.lr is quoted for)")
    check(0.0 <= c.momentum < 1.0, f"{prefix}.momentum", "must lie in [0, 1)")
    check(list(c.milestones) == sorted(c.milestones) and all(m > 0 for m in c.milestones), f"{prefix}.milestones",
          f"must be positive epochs in increasing order, got {list(c.milestones)}")
    check(0.0 < c.gamma <= 1.0, f"{prefix}.gamma", "must lie in (0, 1]")


def check_run_keys(c, prefix: str, resumable: str) -> None:
    """The bookkeeping keys a training run and a probe share: log_every, ckpt_every, keep,
    max_steps, resume."""
    check(c.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
    check(c.ckpt_every >= 0, f"{prefix}.ckpt_every", "must be >= 0 (0 = only at the end)")
    check(c.keep >= 1, f"{prefix}.keep", "must be >= 1")
    check(c.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0 (0 = no limit)")
    check(bool(c.resume), f"{prefix}.resume", f"use auto, none or {resumable}")


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
        check(self.knn_k >= 1, "eval.knn_k", "must be >= 1 (NPID uses 200)")
        check(self.knn_sigma > 0, "eval.knn_sigma", "must be > 0 (NPID uses 0.07)")


@dataclass(frozen=True, kw_only=True)
class LinearConfig:
    """Linear probe on frozen pooled backbone features (``launch.py linear``, fastinst/eval/linear.py).

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
    # () = one head on the globally pooled features; (1, 2, 3, 4, 5) = MMSelfSup's multi-head
    # benchmark: one head per ResNet stage (1 = the stem before max-pooling, 2-5 = layer1-4),
    # each on its map average-pooled to 12 / 6 / 4 / 3 / 2 px, a BN without affine, then linear.
    stages: Tuple[int, ...] = ()

    def __post_init__(self):
        check(self.epochs >= 1, "linear.epochs", "must be >= 1 (PIC uses 100)")
        check(all(s in (1, 2, 3, 4, 5) for s in self.stages) and len(set(self.stages)) == len(self.stages),
              "linear.stages", f"lists distinct ResNet stages among 1..5, got {list(self.stages)}")
        check(self.lr > 0, "linear.lr", "must be > 0 (PIC uses 30 for a batch of 256)")
        check(self.weight_decay >= 0, "linear.weight_decay", "must be >= 0 (PIC uses 0)")
        check_sgd_keys(self, "linear")
        check(0.0 <= self.warmup_epochs < self.epochs, "linear.warmup_epochs",
              "must lie in [0, linear.epochs); set linear.warmup_epochs=0 for short runs")
        check(0.0 < self.warmup_start <= 1.0, "linear.warmup_start", "must lie in (0, 1] (PIC: 0.01)")
        lo, hi = self.crop_scale
        check(0.0 < lo <= hi <= 1.0, "linear.crop_scale", f"needs 0 < lo <= hi <= 1, got {self.crop_scale}")
        check(self.crop_size == 0 or self.crop_size >= 8, "linear.crop_size",
              "must be 0 (= aug.eval_crop) or >= 8 pixels")
        check(0.0 <= self.flip_p <= 1.0, "linear.flip_p", f"is a probability, got {self.flip_p}")
        check(self.eval_every >= 1, "linear.eval_every", "must be >= 1 (the probe's output is its accuracy)")
        check_run_keys(self, "linear", "a linear checkpoint directory")


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """torch.distributed settings (torchrun sets the rest: ranks, rendezvous, restarts)."""

    # How long a collective waits for every rank before the job fails (and torchrun, with
    # --max-restarts, restarts it): long enough for a kNN over 1.28M rows or a large checkpoint.
    timeout_minutes: float = 60.0

    def __post_init__(self):
        check(self.timeout_minutes > 0, "dist.timeout_minutes", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class SVMConfig:
    """Linear SVMs on frozen features (``launch.py svm``, fastinst/eval/svm.py): MMSelfSup's VOC07
    SVM protocol with scikit-learn's LinearSVC."""

    # feat5: the last stage pooled to 2x2 and flattened (MMSelfSup's default); feat1-feat4 the
    # other stages (pooled as linear.stages); avgpool: the globally pooled features.
    feature: Literal["feat1", "feat2", "feat3", "feat4", "feat5", "avgpool"] = "feat5"
    # MMSelfSup's grid: 1, 10, 100 and 0.5^4 ... 0.5^19.
    costs: Tuple[float, ...] = (1.0, 10.0, 100.0) + tuple(0.5 ** n for n in range(4, 20))
    low_shot: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)  # samples per class; () skips it
    draws: int = 5  # fixed low-shot draws per k

    def __post_init__(self):
        check(len(self.costs) >= 1 and all(c > 0 for c in self.costs), "svm.costs", "needs positive costs")
        check(all(k >= 1 for k in self.low_shot), "svm.low_shot", "samples per class must be >= 1")
        check(self.draws >= 1, "svm.draws", "must be >= 1 (MMSelfSup: 5)")
