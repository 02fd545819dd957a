"""RandAugment's 15 ops (loaders/randaugment.py) as DALI graph functions on uint8 HWC views,
each applied where its row says it fires, inside DALI conditionals: the graph draws nothing.

Each op follows the PIL function PIC calls (its rounding included) where DALI's operators allow:
AutoContrast (per-channel min / max stretch, truncated), Invert, PosterizeTpu (keep the top bits),
Solarize (invert at or above the threshold), SolarizeAdd (add below 128), Color / Contrast /
Brightness (blends with the view's luma, the luma's rounded mean, black: PIL's ImageEnhance,
truncated), Sharpness (a blend with PIL's SMOOTH filter, the 1-pixel border left as it was, as
PIL does), and the five affine warps (bilinear, the same inverse-mapping matrix as the torch
backend, uncovered areas filled with ``fill`` through a warped mask). Equalize is DALI's
``fn.equalize``, OpenCV's histogram equalisation: its lookup table differs from
PIL's slightly (tests/test_randaugment.py bounds the difference).
"""
from __future__ import annotations

import numpy as np

from .randaugment import AFFINE, ARG, ON, OP, OPS

try:  # DALI is optional at import time so the torch backend works without it
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
except ImportError:  # pragma: no cover - exercised only where DALI is missing
    pass

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> L
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # PIL's ImageFilter.SMOOTH


def _op(name: str):
    """DALI's operator ``name``, or its earlier experimental spelling (DALI before 1.40)."""
    return getattr(fn, name, None) or getattr(fn.experimental, name)


def _u8(x):
    """float -> uint8 as PIL's blends store it: truncated, clipped to 0..255."""
    return fn.cast(dmath.clamp(dmath.floor(x), 0.0, 255.0), dtype=types.UINT8)


def _luma(x):  # [H, W, 1] float: PIL's L (fixed point, rounded)
    r, g, b = (fn.cast(x[:, :, c], dtype=types.FLOAT) for c in range(3))
    return fn.expand_dims(dmath.floor(_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b + 0.5), axes=[2], new_axis_names="C")


def _blend(degenerate, x, factor):  # PIL's Image.blend(degenerate, image, factor)
    return _u8(degenerate + factor * (fn.cast(x, dtype=types.FLOAT) - degenerate))


def _autocontrast(x):
    lo = fn.cast(fn.reductions.min(x, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(x, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    spread = hi > lo
    scale = 255.0 / (hi - lo + (1.0 - spread) * 255.0)  # 1 where a channel is flat (PIL leaves it)
    return _u8((fn.cast(x, dtype=types.FLOAT) - lo * spread) * (spread * scale + (1.0 - spread)))


def _posterize(x, bits):
    mask = fn.cast(256.0 - dmath.pow(2.0, 8.0 - bits), dtype=types.UINT8)
    return x & mask


def _solarize(x, threshold):
    xf = fn.cast(x, dtype=types.FLOAT)
    keep = xf < threshold
    return _u8(keep * xf + (1.0 - keep) * (255.0 - xf))


def _solarize_add(x, add):
    xf = fn.cast(x, dtype=types.FLOAT)
    return _u8(xf + (xf < 128.0) * add)


def _sharpness(x, factor, side: int):
    xf = fn.cast(x, dtype=types.FLOAT)
    smooth = dmath.floor(_op("filter")(xf, types.Constant(_SMOOTH)) + 0.5)
    ones = xf * 0.0 + 1.0
    border = fn.erase(ones, anchor=[1, 1], shape=[side - 2, side - 2], axes=(0, 1), fill_value=0.0)
    degenerate = smooth + border * (xf - smooth)  # PIL filters the interior only
    return _blend(degenerate, x, factor)


def _warp(x, matrix, fill):
    xf = fn.cast(x, dtype=types.FLOAT)
    kw = dict(matrix=fn.reshape(matrix, shape=[2, 3]), fill_value=0.0, interp_type=types.INTERP_LINEAR,
              inverse_map=True)
    covered = fn.warp_affine(xf * 0.0 + 1.0, **kw)
    return _u8(fn.warp_affine(xf, **kw) + types.Constant(np.array(fill, dtype=np.float32)) * (1.0 - covered) + 0.5)


def _apply(name: str, x, arg, matrix, fill, side: int):
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _op("equalize")(x)
    if name == "Invert":
        return types.Constant(255, dtype=types.UINT8) - x
    if name == "PosterizeTpu":
        return _posterize(x, arg)
    if name == "Solarize":
        return _solarize(x, arg)
    if name == "SolarizeAdd":
        return _solarize_add(x, arg)
    if name == "Color":
        return _blend(_luma(x), x, arg)
    if name == "Contrast":
        mean = dmath.floor(fn.reductions.mean(_luma(x), axis_names="HWC", keep_dims=True) + 0.5)
        return _blend(mean, x, arg)
    if name == "Brightness":
        return _blend(fn.cast(x, dtype=types.FLOAT) * 0.0, x, arg)
    if name == "Sharpness":
        return _sharpness(x, arg, side)
    return _warp(x, matrix, fill)  # Rotate, ShearX, ShearY, TranslateXRel, TranslateYRel


def rand_augment(v, rows, ra, side: int, rows_dev=None):
    """``ra.n`` ops on the uint8 HWC views ``v`` of side ``side``: op k reads row k of each
    sample's (n, WIDTH) ``rows`` (its op, whether it fires, its argument, its affine matrix);
    matrices and flags are read on the CPU, arguments on the views' device (``rows_dev``)."""
    dev = rows if rows_dev is None else rows_dev
    for k in range(ra.n):
        row, arg = rows[k], dev[k][ARG]
        if fn.cast(row[ON], dtype=types.BOOL):
            op = fn.cast(row[OP], dtype=types.INT32)
            v = _select(v, op, arg, row[AFFINE], ra.fill, side, 0)
    return v


def _select(v, op, arg, matrix, fill, side: int, i: int):
    """An if / else chain over the op index, one branch per op (DALI conditionals split the
    batch, so each sample runs its own op only)."""
    if i == len(OPS) - 1:
        return _apply(OPS[i], v, arg, matrix, fill, side)
    if op == i:
        v = _apply(OPS[i], v, arg, matrix, fill, side)
    else:
        v = _select(v, op, arg, matrix, fill, side, i + 1)
    return v
