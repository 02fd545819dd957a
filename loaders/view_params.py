"""Per-view augmentation parameters as a pure function of (seed, epoch, index, view).

The DALI loader draws no randomness in its graph: its ``external_source`` callback computes,
for every sample and view, one row of parameters (crop window, flip, colour-twist factors with
their gates folded in, blur gate and sigma, solarize gate) and the graph applies them through
per-sample argument inputs. The draws come from a counter-based generator (numpy's Philox):
key = ``derive_seed(seed, "view-params")``, counter = (block, 0, index, epoch); view v reads
the ``N_UNIFORM`` uniforms of blocks 8v .. 8v+7 (one uniform per 64-bit output, 4 outputs a
block), so the streams of distinct (epoch, index, view) never overlap, and a sample's views
come from one generator. Nothing depends on the batch, its position, the rank, the world size
or the worker: a resumed run, or one at another world size, cuts the same views.

The crop is torchvision's RandomResizedCrop rule, exactly (not an approximation): 10 tries of
(area fraction ~ U(scale), log aspect ~ U(log ratio)), the first window that fits is placed
uniformly, else the centre-crop fallback clamped to the ratio range. Only the random numbers
differ from torchvision's (ours are Philox uniforms in a fixed layout). The image size is read
from the encoded header without decoding (JPEG frame header and PNG IHDR parsed here, ~4 us;
other formats through PIL's lazy open), EXIF orientations 5-8 swapping height and width as
DALI's decoder (adjust_orientation=True) does; tests/test_dali_views.py checks it against
DALI's decoded shapes. The graph also clamps the window to DALI's own header shape, a no-op
when the two agree.

No DALI import here, so the module is usable (and testable) without DALI.
"""
from __future__ import annotations

import io
import math
import struct
from typing import Tuple

import numpy as np

from fastinst.core.runtime import derive_seed

from .sources import DataError

N_TRIES = 10  # torchvision's RandomResizedCrop retry count
# layout of the uniforms of one view
U_TRIES = slice(0, 2 * N_TRIES)  # (area, log-aspect) per try
U_POS, U_FLIP, U_JITTER, U_FACTORS, U_GREY, U_BLUR, U_SIGMA, U_SOLAR = 20, 22, 23, 24, 28, 29, 30, 31
N_UNIFORM = 32
BLOCKS = N_UNIFORM // 4  # Philox blocks per view
# layout of a view's parameter row (float32)
ROI_START, ROI_END = slice(0, 2), slice(2, 4)  # (y, x) in decoded-image pixels, DALI's shape order
FLIP, BRIGHTNESS, CONTRAST, SATURATION, HUE, BLUR_ON, SIGMA, SOLARIZE_ON, GREY_ON = range(4, 13)
N_PARAMS = 13
EXIF_ORIENTATION = 0x0112


def view_uniforms(key: int, epoch: int, index: int, view: int, count: int = 1) -> np.ndarray:
    """(count, N_UNIFORM) float64: the uniforms of views view .. view+count-1 of one sample;
    ``key`` = ``derive_seed(seed, "view-params")``."""
    if min(epoch, index, view) < 0:
        raise ValueError(f"view parameters need epoch, index, view >= 0, got {(epoch, index, view)}")
    gen = np.random.Generator(np.random.Philox(key=key, counter=[BLOCKS * view, 0, index, epoch]))
    return gen.random(N_UNIFORM * count).reshape(count, N_UNIFORM)


def crop_window(u, height: int, width: int, scale, ratio) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop for an image of height x width."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    tries = u[U_TRIES]
    for t in range(N_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * tries[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * tries[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[U_POS] * (height - h + 1))  # uniform integer in [0, height - h]
            left = int(u[U_POS + 1] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _factor(u: float, strength: float) -> float:
    """ColorJitter's factor: uniform in [max(0, 1 - strength), 1 + strength]."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def view_params(u: np.ndarray, height: int, width: int, crop, aug) -> np.ndarray:  # (N_PARAMS,) float32
    """One view's parameter row from its uniforms. Gates are folded in: a colour jitter that is
    off leaves factors 1 (hue 0), grey sets saturation 0, blur / solarize are 0/1 flags. With
    RandAugment (aug.randaugment.n > 0) grey comes after it (PIC's order): a 0/1 flag of its own."""
    u = u.tolist()  # Python floats: faster than numpy scalars here
    top, left, h, w = crop_window(u, height, width, crop.scale, crop.ratio)
    p = [0.0] * N_PARAMS
    p[ROI_START], p[ROI_END] = (top, left), (top + h, left + w)
    p[FLIP] = float(u[U_FLIP] < aug.flip_p)
    b, c, s, hue = aug.jitter
    on = u[U_JITTER] < aug.jitter_p
    f = u[U_FACTORS:U_FACTORS + 4]
    p[BRIGHTNESS] = _factor(f[0], b) if on and b > 0 else 1.0
    p[CONTRAST] = _factor(f[1], c) if on and c > 0 else 1.0
    p[SATURATION] = _factor(f[2], s) if on and s > 0 else 1.0
    p[HUE] = (2.0 * f[3] - 1.0) * hue * 360.0 if on and hue > 0 else 0.0  # DALI's hue is in degrees
    if u[U_GREY] < aug.grey_p:
        if aug.randaugment.n > 0:
            p[GREY_ON] = 1.0
        else:
            p[SATURATION] = 0.0
    p[BLUR_ON] = float(u[U_BLUR] < aug.blur_p)
    lo, hi = aug.blur_sigma
    p[SIGMA] = lo + (hi - lo) * u[U_SIGMA]
    p[SOLARIZE_ON] = float(u[U_SOLAR] < aug.solarize_p)
    return np.array(p, dtype=np.float32)


def _exif_orientation(mv, start: int, end: int) -> int:
    """Tag 0x0112 of IFD0 of the TIFF block mv[start:end] (an APP1 Exif segment); 1 if absent."""
    order = bytes(mv[start:start + 2])
    if order not in (b"II", b"MM") or end - start < 8:
        return 1
    e = "<" if order == b"II" else ">"
    ifd = start + struct.unpack_from(e + "I", mv, start + 4)[0]
    if ifd + 2 > end:
        return 1
    for k in range(struct.unpack_from(e + "H", mv, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if entry + 12 > end:
            break
        if struct.unpack_from(e + "H", mv, entry)[0] == EXIF_ORIENTATION:
            return struct.unpack_from(e + "H", mv, entry + 8)[0]  # a SHORT, left-justified
    return 1


def _jpeg_size(mv) -> Tuple[int, int, int]:
    """(height, width, EXIF orientation) from the markers before the frame header."""
    n, pos, orientation = len(mv), 2, 1
    while pos + 4 <= n:
        if mv[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = mv[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = struct.unpack_from(">H", mv, pos + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: P, Y, X
            if pos + 9 > n:
                break
            height, width = struct.unpack_from(">HH", mv, pos + 5)
            return height, width, orientation
        if marker == 0xDA:
            raise ValueError("scan data before the frame header")
        if marker == 0xE1 and bytes(mv[pos + 4:pos + 10]) == b"Exif\0\0":
            orientation = _exif_orientation(mv, pos + 10, min(n, pos + 2 + length))
        pos += 2 + length
    raise ValueError("no frame header (SOF marker)")


def image_size(buf, where: str) -> Tuple[int, int]:
    """(height, width) that DALI's decoder will produce, from the header only (no decode).
    JPEG and PNG are parsed here (fast); other formats through PIL's lazy open."""
    mv = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    orientation = 1
    try:
        if bytes(mv[:2]) == b"\xff\xd8":
            height, width, orientation = _jpeg_size(mv)
        elif bytes(mv[:8]) == b"\x89PNG\r\n\x1a\n" and bytes(mv[12:16]) == b"IHDR":
            width, height = struct.unpack_from(">II", mv, 16)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(mv)) as im:
                width, height = im.size
    except Exception as e:
        raise DataError(f"{where}: cannot read the image size from its header ({type(e).__name__}: {e})") from e
    if height < 1 or width < 1:
        raise DataError(f"{where}: image header gives a {width}x{height} image")
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class ViewParams:
    """Picklable: the parameter rows of every view of one sample (runs in DALI's workers)."""

    def __init__(self, aug, seed: int):
        self.aug = aug
        self.crops = list(aug.view_crops)  # view v -> its crop group
        self.key = derive_seed(seed, "view-params")

    @property
    def num_views(self) -> int:
        return len(self.crops)

    def rows(self, epoch: int, index: int, height: int, width: int) -> np.ndarray:  # (V, N_PARAMS) float32
        u = view_uniforms(self.key, epoch, index, 0, len(self.crops))
        return np.stack([view_params(u[v], height, width, crop, self.aug) for v, crop in enumerate(self.crops)])

    def for_sample(self, epoch: int, index: int, buf, where: str) -> np.ndarray:
        return self.rows(epoch, index, *image_size(buf, where))

