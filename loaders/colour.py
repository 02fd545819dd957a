"""Colour spaces of the training views (``aug.colorspace``): rgb, lab, ycbcr.

CMC (Tian et al. 2019, HobbitLong/CMC) trains one encoder on L (or Y) and one on ab (or
CbCr) of the same crop, converted from sRGB after cropping and flipping, with these
normalisation constants (the seed code's, in the colour space's own units):

- Lab: CIE L*a*b* over the D65 white point from sRGB (skimage.color.rgb2lab);
- YCbCr: ITU-R BT.601 studio range, Y in [16, 235] (skimage.color.rgb2ycbcr).

`normalisation(aug)` gives the (mean, std) a backend subtracts and divides by; for rgb they
are ``aug.mean`` / ``aug.std`` times 255. The numpy conversions here serve the torchvision
backend; the DALI graph builds the same formulas from its arithmetic operators
(loaders/dali_graph.py), so both backends give the same views.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

LAB_MEAN, LAB_STD = (50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675)
YCBCR_MEAN, YCBCR_STD = (116.151, 121.080, 132.342), (109.5, 111.855, 111.964)

# sRGB (linear) -> XYZ, rows X, Y, Z, each divided by the D65 white point's coordinate
SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65 = (0.95047, 1.0, 1.08883)
# BT.601 studio-range YCbCr from 8-bit RGB: offset + matrix / 255 (the matrix is for RGB in [0, 1])
YCBCR_OFFSET = (16.0, 128.0, 128.0)
YCBCR_MATRIX = ((65.481, 128.553, 24.966), (-37.797, -74.203, 112.0), (112.0, -93.786, -18.214))


def normalisation(aug) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) per channel in the units of the views before normalisation."""
    if aug.colorspace == "lab":
        return LAB_MEAN, LAB_STD
    if aug.colorspace == "ycbcr":
        return YCBCR_MEAN, YCBCR_STD
    return tuple(m * 255.0 for m in aug.mean), tuple(s * 255.0 for s in aug.std)


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] sRGB -> float32 [..., 3] L*a*b* (L in [0, 100])."""
    c = rgb.astype(np.float32) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = lin @ np.asarray(SRGB_TO_XYZ, dtype=np.float32).T / np.asarray(D65, dtype=np.float32)  # [..., 3]
    f = _lab_f(xyz)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], -1).astype(np.float32)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> float32 [..., 3] BT.601 studio-range YCbCr."""
    m = np.asarray(YCBCR_MATRIX, dtype=np.float32) / 255.0
    return (rgb.astype(np.float32) @ m.T + np.asarray(YCBCR_OFFSET, dtype=np.float32)).astype(np.float32)


def convert(rgb: np.ndarray, colorspace: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> the colour space's values (float32; rgb stays as it is)."""
    if colorspace == "lab":
        return rgb_to_lab(rgb)
    if colorspace == "ycbcr":
        return rgb_to_ycbcr(rgb)
    return rgb
