"""The DALI augmentation graphs as plain functions of DALI data nodes, separate from the reader
(the style of DALI's EfficientNet example): ``decode`` once per image, ``train_view`` per view
from the view's row of parameters (loaders/view_params.py), ``eval_view``, and CMC's colour
spaces. The same functions build the GPU pipeline (``device='mixed'`` decoding, all ops on the
GPU) and the CPU-only one; the pipeline around them is loaders/dali_backend.py.

The graph draws no random numbers: every random choice arrives in the parameter row, as
per-sample argument inputs (resize ROI, colour-twist factors, blur sigma, conditionals on the
blur / solarize gates, the mirror flag).
"""
from __future__ import annotations

from .colour import D65, SRGB_TO_XYZ, normalisation
from .dali_randaugment import rand_augment
from .view_params import (BLUR_ON, BRIGHTNESS, CONTRAST, FLIP, GREY_ON, HUE, ROI_END, ROI_START, SATURATION, SIGMA,
                          SOLARIZE_ON)

try:  # DALI is optional at import time so the torch backend works without it
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
except ImportError:  # pragma: no cover - exercised only where DALI is missing
    pass


def decode(jpegs, device: str, hw_decoder_load: float = 0.65):
    """Decode once per image. ``device`` is 'mixed' (GPU, nvJPEG + HW decoder) or 'cpu'."""
    if device == "mixed":
        # Paddings avoid re-allocations as image sizes vary (values from DALI's RN50 example
        # sizes: ~211 MB device, ~140 MB host); the hint sizes fit most ImageNet images.
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                 device_memory_padding=211025920, host_memory_padding=140544512,
                                 preallocate_width_hint=5980, preallocate_height_hint=6430)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def _param(params, k: int, dtype=None):
    """Column ``k`` of a view's parameter row, as a per-sample scalar argument input."""
    x = params[k]
    return fn.cast(x, dtype=dtype) if dtype is not None else x


def color_twist(img, params, aug):
    """ColorJitter applied with p = jitter_p, then grey with p = grey_p, as ONE fused op.

    The callback folds the gates into the factors (a jitter that is off gives factors 1 and
    hue 0; grey gives saturation 0). Unlike torchvision's ColorJitter the four are applied in a
    fixed order, and contrast pivots on mid-grey rather than the image mean: a documented
    approximation.
    """
    if aug.jitter_p == 0 and aug.grey_p == 0:
        return img
    return fn.color_twist(img, brightness=_param(params, BRIGHTNESS), contrast=_param(params, CONTRAST),
                          saturation=_param(params, SATURATION), hue=_param(params, HUE))


def train_view(images, hw, params, crop, aug, *, out_dtype, layout: str, ra_rows=None, ra_dev=None):
    """One training view from its parameter row ``params`` (see loaders/view_params.py):
    resized crop, jitter/grey, blur, solarize, flip, normalise; with RandAugment (``ra_rows``,
    the view's (n, WIDTH) rows, loaders/randaugment.py) its ops after solarize and grey after
    them (PIC's order). ``hw``: DALI's own (height, width) of the decoded images, float."""
    # The RandomResizedCrop window as an absolute (y, x) ROI of the decoded image. The window
    # was computed on the callback's header size, which equals ``hw`` (tests/test_dali_views.py);
    # clamping to ``hw`` is a no-op then, and a safety net otherwise (DALI's CPU resize crashes
    # the process on a ROI outside the image).
    roi_start, roi_end = dmath.min(params[ROI_START], hw), dmath.min(params[ROI_END], hw)
    v = fn.resize(images, size=(crop.size, crop.size), roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                  antialias=False)
    v = color_twist(v, params, aug)
    if aug.blur_p > 0:
        if _param(params, BLUR_ON, types.BOOL):  # DALI conditional: only the chosen samples are blurred
            v = fn.gaussian_blur(v, sigma=_param(params, SIGMA))
    if aug.solarize_p > 0:
        if _param(params, SOLARIZE_ON, types.BOOL):
            # invert pixels >= 128 (BYOL / SimCLR-style solarisation): x + m*(255 - 2x)
            x = fn.cast(v, dtype=types.INT16)
            v = fn.cast(x + (x >= 128) * (255 - 2 * x), dtype=types.UINT8)
    if ra_rows is not None:
        v = rand_augment(v, ra_rows, aug.randaugment, crop.size, ra_dev)
        if aug.grey_p > 0:
            if _param(params, GREY_ON, types.BOOL):
                v = fn.color_twist(v, saturation=0.0)
    return _normalise(v, aug, out_dtype=out_dtype, layout=layout,
                      mirror=_param(params, FLIP, types.INT32) if aug.flip_p > 0 else 0)


def eval_view(images, aug, *, out_dtype, layout: str):
    """The seeds' eval transform: resize the shorter side, centre crop (NPID / PIC val)."""
    v = fn.resize(images, resize_shorter=float(aug.eval_resize), antialias=True)
    return _normalise(v, aug, out_dtype=out_dtype, layout=layout, mirror=0,
                      crop=(aug.eval_crop, aug.eval_crop))


def _lab_f(t):
    return dmath.cbrt(t) * (t > 0.008856) + (7.787 * t + 16.0 / 116.0) * (t <= 0.008856)


def to_lab(v):
    """uint8 HWC sRGB -> float HWC L*a*b* (D65) from DALI arithmetic (DALI has no Lab type):
    linearise, XYZ over the white point, f(t), then L, a, b (the formulas of loaders/colour.py)."""
    c = fn.cast(v, dtype=types.FLOAT) / 255.0
    lin = dmath.pow((c + 0.055) / 1.055, 2.4) * (c > 0.04045) + (c / 12.92) * (c <= 0.04045)
    r, g, b = lin[:, :, 0], lin[:, :, 1], lin[:, :, 2]
    fx, fy, fz = (_lab_f((m[0] * r + m[1] * g + m[2] * b) / w) for m, w in zip(SRGB_TO_XYZ, D65))
    return fn.stack(116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz), axis=2)


def to_colourspace(v, colorspace: str):
    if colorspace == "ycbcr":  # DALI's YCbCr is BT.601 studio range, like skimage's rgb2ycbcr
        return fn.color_space_conversion(v, image_type=types.RGB, output_type=types.YCbCr)
    if colorspace == "lab":
        return to_lab(v)
    return v


def _normalise(v, aug, *, out_dtype, layout, mirror, crop=None):
    kw = {"crop": crop} if crop else {}
    mean, std = normalisation(aug)
    return fn.crop_mirror_normalize(to_colourspace(v, aug.colorspace), mirror=mirror, dtype=out_dtype,
                                    output_layout=layout, mean=list(mean), std=list(std), **kw)


def train_views(images, hw, inputs, crops, aug, mix_rows, *, layout: str, out_dtype, on_gpu: bool):
    """Every training view of the batch: ``inputs`` are the feed's per-sample rows, the views'
    parameters, then the mixing rows (aug.mix) and RandAugment's rows (aug.randaugment) where
    they are on. Factors that multiply views are moved to the views' device (``on_gpu``);
    positions, boxes, matrices and flags stay argument inputs on the CPU."""
    params, rest = inputs[0], list(inputs[1:])
    mix = rest.pop(0) if aug.mix.kind != "none" else None
    ra = rest.pop(0) if aug.randaugment.n > 0 else None
    mix_dev, ra_dev = (None if x is None or not on_gpu else x.gpu() for x in (mix, ra))
    views = []
    for v, crop in enumerate(crops):
        kw = dict(ra_rows=None if ra is None else ra[v], ra_dev=None if ra_dev is None else ra_dev[v])
        if mix is None:
            views.append(train_view(images, hw, params[v], crop, aug, out_dtype=out_dtype, layout=layout, **kw))
        else:  # mixed in float32 over the extended batch (the partners follow the anchors), then stored
            x = mixed_train_view(images, hw, params[v], mix[v], crop, aug, mix_rows, layout=layout,
                                 m_dev=None if mix_dev is None else mix_dev[v], **kw)
            views.append(x if out_dtype == types.FLOAT else fn.cast(x, dtype=out_dtype))
    return views


def mixed_train_view(images, hw, params, m, crop, aug, rows, *, layout: str, m_dev=None, ra_rows=None, ra_dev=None):
    """A training view over a mixture's extended batch: cut only where the sample needs it (an
    anchor, or a partner mixed into this view; the others get a 1 x 1 stand-in, never read),
    mixed (`mix_view`), then each position keeps its row's ``keep`` sample: the anchors their
    own views, the partners (dropped by the loader) the first anchor's, so the batch is uniform."""
    if fn.cast(m[rows.needs], dtype=types.BOOL):
        x = train_view(images, hw, params, crop, aug, out_dtype=types.FLOAT, layout=layout, ra_rows=ra_rows,
                       ra_dev=ra_dev)
    else:
        x = fn.crop_mirror_normalize(images, crop=(1, 1), dtype=types.FLOAT, output_layout=layout)
    x = mix_view(x, m, aug.mix, rows, layout, m_dev)
    return fn.permute_batch(x, indices=fn.cast(m[rows.keep], dtype=types.INT32))


def _erase(x, anchor, shape, axes):
    return fn.erase(x, anchor=anchor, shape=shape, axes=axes, fill_value=0.0)


def mix_view(v, m, mix, rows, layout: str, m_dev=None):
    """The image mixture (loaders/mixture.py) of one view over an extended batch: ``v`` the
    normalised float view of every sample (anchors, then the partners they read), ``m`` each
    sample's mixing row (`MixRows`). Global passes blend in ``permute_batch``-gathered partner
    views; region passes paste a partner's box, where the partner is its globally mixed view
    (im: the seed's RM over GM); Cutout / RandomErasing fill a box. Each pass runs inside a DALI
    conditional on its flag, so only the samples it fires for do its arithmetic; the others
    keep every bit. Positions, boxes and flags are argument inputs, read from ``m`` on the CPU;
    the factors multiply the view on its device (``m_dev``: ``m`` on the GPU for a GPU view)."""
    axes = (0, 1) if layout == "HWC" else (1, 2)
    f = m if m_dev is None else m_dev
    g = v
    if mix.kind in ("global", "im"):
        for k in range(rows.g):
            j = rows.g_slot(k)
            partner = fn.permute_batch(v, indices=fn.cast(m[j], dtype=types.INT32))  # gathered before the split
            lam = f[j + 1]
            if fn.cast(m[j + 2], dtype=types.BOOL):
                g = g * lam + partner * (1.0 - lam)
    out = g
    if mix.kind in ("region", "im"):
        for k in range(rows.r):
            j = rows.r_slot(k)
            other = fn.permute_batch(g, indices=fn.cast(m[j], dtype=types.INT32))
            anchor, shape, scale = m[j + 2:j + 4], m[j + 4:j + 6], f[j + 1]
            if fn.cast(m[j + 6], dtype=types.BOOL):
                out = _erase(out * scale, anchor, shape, axes) + (other - _erase(other, anchor, shape, axes))
    if mix.kind in ("cutout", "erasing"):
        j = rows.fill
        anchor, shape, value = m[j + 1:j + 3], m[j + 3:j + 5], f[j]
        if fn.cast(m[j + 5], dtype=types.BOOL):
            ones = out * 0.0 + 1.0
            out = _erase(out, anchor, shape, axes) + value * (ones - _erase(ones, anchor, shape, axes))
    return out
