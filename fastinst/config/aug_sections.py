"""Config section ``aug``: the training views (crop groups, colour, blur, solarize, CMC's
colour spaces), the image mixture (``aug.mix``) and RandAugment (``aug.randaugment``), and the
eval transform. Part of the tree in fastinst/config/tree.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Tuple

from .errors import check


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
        check(0.0 < lo <= hi <= 1.0, "aug.mix.area_ratio_range",
              f"needs 0 < lo <= hi <= 1, got {self.area_ratio_range}")
        check(0.0 < self.min_aspect_ratio <= 1.0, "aug.mix.min_aspect_ratio", "must lie in (0, 1] (the seed: 0.3)")
        check(self.max_attempt >= 1, "aug.mix.max_attempt", "must be >= 1 (the seed: 20)")

    @property
    def uses_partners(self) -> bool:
        """Whether views are mixed with other samples' views (global, region, im)."""
        return self.kind in ("global", "region", "im")


@dataclass(frozen=True, kw_only=True)
class RandAugmentConfig:
    """RandAugment on each training view (Cubuk et al. 2020), as PIC's ``--aug RandAug`` runs it
    (bl0/PIC contrast/data/rand_augment.py, timm's ``rand-n2-m10-mstd0.5``; loaders/randaugment.py):
    ``n`` ops drawn uniformly with replacement from its 15, each applied with p ``p`` at a magnitude
    ~ N(m, m_std) clipped to [0, 10]; areas a geometric op uncovers get ``fill`` (PIC: the ImageNet
    mean colour). In the view pipeline after jitter and blur, before grey (PIC's order). n 0: off."""

    n: int = 0
    m: float = 10.0
    m_std: float = 0.5
    p: float = 0.5
    fill: Tuple[int, int, int] = (124, 116, 104)

    def __post_init__(self):
        check(self.n >= 0, "aug.randaugment.n", "must be >= 0 (0 = off; PIC: 2)")
        check(0.0 <= self.m <= 10.0, "aug.randaugment.m", "must lie in [0, 10] (PIC: 10)")
        check(self.m_std >= 0, "aug.randaugment.m_std", "must be >= 0 (PIC: 0.5)")
        check(0.0 <= self.p <= 1.0, "aug.randaugment.p", f"is a probability, got {self.p}")
        check(all(0 <= c <= 255 for c in self.fill), "aug.randaugment.fill", "is an RGB colour in 0..255")


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
    # RandAugment on each training view (PIC's --aug RandAug); n 0 = off.
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)

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

    @property
    def view_crops(self) -> Tuple[CropConfig, ...]:
        """The crop group of each view, in view order (a group of count k gives k views)."""
        return tuple(c for c in self.crops for _ in range(c.count))
