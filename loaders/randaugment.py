"""RandAugment as PIC runs it (``--aug RandAug``: bl0/PIC contrast/data/rand_augment.py, timm's
``rand-n2-m10-mstd0.5``), with its draws a pure function of (seed, epoch, index, view).

Per view: ``n`` ops drawn uniformly with replacement from PIC's 15 (``OPS``); each fires with
p ``p``; its magnitude is N(m, m_std) clipped to [0, 10]; rotate, shear and translate take a
random sign. A magnitude becomes the op's argument as PIC's ``LEVEL_TO_ARG`` says (`op_arg`).
Geometric ops are affine maps, written here as PIL's inverse-mapping 6-tuples (output pixel ->
input position; rotate about the view's centre as PIL's ``Image.rotate`` does), so both backends
warp with the same matrix; uncovered areas get ``fill`` (PIC: the ImageNet mean colour).

Where fastinst departs from PIC: interpolation is always bilinear (PIC picks bilinear or bicubic
at random per op, and the DALI warp is bilinear); the draws come from numpy Philox (key
``derive_seed(seed, "randaug")``, counter (0, view, index, epoch): the n op choices, then per op
its gate, magnitude and sign) instead of the unseeded global generators.

Here: the draws (`RandAugmentParams`) and the torch backend's ops on PIL images (`apply_pil`,
PIL's and torchvision's own functions, as PIC calls them). loaders/dali_graph.py applies the same
rows in the DALI graph; tests/test_randaugment.py compares the two op by op.
"""
from __future__ import annotations

import math
import numpy as np

from fastinst.core.runtime import derive_seed

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeTpu", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC = frozenset(OPS.index(o) for o in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))
SIGNED = GEOMETRIC
MAX_LEVEL = 10.0
# one op's row: [op index, fires (0/1), argument, the affine 6-tuple (geometric ops; else identity)]
OP, ON, ARG, AFFINE = 0, 1, 2, slice(3, 9)
WIDTH = 9
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def op_arg(op: int, level: float, sign: float) -> float:
    """PIC's LEVEL_TO_ARG: the op's argument at magnitude ``level`` in [0, 10]."""
    name, t = OPS[op], level / MAX_LEVEL
    if name == "Rotate":
        return sign * t * 30.0  # degrees, counter-clockwise
    if name == "PosterizeTpu":
        return float(int(t * 4))  # bits kept
    if name == "Solarize":
        return float(int(t * 256))  # threshold
    if name == "SolarizeAdd":
        return float(int(t * 110))  # added below 128
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return t * 1.8 + 0.1  # enhance factor in [0.1, 1.9]
    if name in ("ShearX", "ShearY"):
        return sign * t * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * t * 0.45  # of the view's side
    return 0.0


def affine(op: int, arg: float, h: int, w: int) -> tuple:
    """PIL's AFFINE data (a, b, c, d, e, f) of a geometric op on an h x w view: the input
    position (a x + b y + c, d x + e y + f) of output pixel (x, y)."""
    name = OPS[op]
    if name == "ShearX":
        return (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, arg * w, 0.0, 1.0, 0.0)
    if name == "TranslateYRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg * h)
    if name == "Rotate":  # PIL's Image.rotate(angle): about the centre, counter-clockwise
        a = -math.radians(arg)
        cx, cy = w / 2.0, h / 2.0
        m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
        m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
        m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
        return tuple(m)
    return IDENTITY


class RandAugmentParams:
    """Picklable (it runs in the loaders' workers): the (n, WIDTH) float32 rows of every view."""

    def __init__(self, aug, seed: int):
        self.ra = aug.randaugment
        self.sizes = [c.size for c in aug.view_crops]
        self.key = derive_seed(seed, "randaug")

    def rows(self, epoch: int, index: int, view: int) -> np.ndarray:
        ra, side = self.ra, self.sizes[view]
        gen = np.random.Generator(np.random.Philox(key=self.key, counter=[0, view, index, epoch]))
        ops = gen.integers(len(OPS), size=ra.n)
        out = np.zeros((ra.n, WIDTH), dtype=np.float32)
        for k, op in enumerate(ops.tolist()):
            fires = gen.random() < ra.p
            level = min(MAX_LEVEL, max(0.0, gen.normal(ra.m, ra.m_std) if ra.m_std > 0 else ra.m))
            sign = -1.0 if gen.random() < 0.5 else 1.0
            arg = op_arg(op, level, sign)
            out[k, OP], out[k, ON], out[k, ARG] = op, float(fires), arg
            out[k, AFFINE] = affine(op, arg, side, side) if op in GEOMETRIC else IDENTITY
        return out

    def all_views(self, epoch: int, index: int) -> np.ndarray:  # (V, n, WIDTH)
        return np.stack([self.rows(epoch, index, v) for v in range(len(self.sizes))])


def apply_pil(img, rows: np.ndarray, fill) -> "object":
    """The ops of ``rows`` that fire, in order, on a PIL RGB image (PIL's and torchvision's own
    functions, as PIC calls them; bilinear warps)."""
    import torchvision.transforms.functional as F
    from PIL import Image

    for op, on, arg, *mat in rows.tolist():
        if not on:
            continue
        name = OPS[int(op)]
        if int(op) in GEOMETRIC:
            img = img.transform(img.size, Image.AFFINE, tuple(mat), resample=Image.BILINEAR, fillcolor=tuple(fill))
        elif name == "AutoContrast":
            img = F.autocontrast(img)
        elif name == "Equalize":
            img = F.equalize(img)
        elif name == "Invert":
            img = F.invert(img)
        elif name == "PosterizeTpu":
            img = F.posterize(img, int(arg))
        elif name == "Solarize":
            img = F.solarize(img, int(arg))
        elif name == "SolarizeAdd":
            lut = [min(255, i + int(arg)) if i < 128 else i for i in range(256)]
            img = img.point(lut * 3)
        elif name == "Color":
            img = F.adjust_saturation(img, arg)
        elif name == "Contrast":
            img = F.adjust_contrast(img, arg)
        elif name == "Brightness":
            img = F.adjust_brightness(img, arg)
        elif name == "Sharpness":
            img = F.adjust_sharpness(img, arg)
    return img

