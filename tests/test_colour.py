"""aug.colorspace (CMC's Lab and YCbCr views) in both backends, against float64 references
written here from the published formulas: sRGB (IEC 61966-2-1) -> XYZ (D65) -> CIE L*a*b*,
and ITU-R BT.601 studio-range YCbCr. Each backend's RGB eval views give the 8-bit pixels
the reference converts; the converted views of the same images must match it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen import make_photo_zip
import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import ConfigError, load_config


def ref_lab(rgb8: np.ndarray) -> np.ndarray:
    c = rgb8.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = np.einsum("ij,...j->...i", m, lin) / np.array([0.95047, 1.0, 1.08883])
    eps = (6.0 / 29.0) ** 3  # 0.008856
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)  # 7.787 t + 16/116
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ref_ycbcr(rgb8: np.ndarray) -> np.ndarray:
    c = rgb8.astype(np.float64) / 255.0  # BT.601: Y = 16 + 219 (0.299 R + 0.587 G + 0.114 B), ...
    kr, kb = 0.299, 0.114
    y = kr * c[..., 0] + (1 - kr - kb) * c[..., 1] + kb * c[..., 2]
    cb, cr = (c[..., 2] - y) / (2 * (1 - kb)), (c[..., 0] - y) / (2 * (1 - kr))
    return np.stack([16 + 219 * y, 128 + 224 * cb, 128 + 224 * cr], -1)


NORM = {"lab": ((50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675)),
        "ycbcr": ((116.151, 121.080, 132.342), (109.5, 111.855, 111.964))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=8, val=4)


def eval_views(photos, backend, colorspace):
    from loaders import build_loader

    cfg = load_config(None, [f"data.path={photos}", f"loader.backend={backend}", "loader.device=cpu",
                             "loader.batch_size=4", "loader.num_workers=1", "aug.eval_resize=48", "aug.eval_crop=40",
                             f"aug.colorspace={colorspace}"])
    loader = build_loader(cfg, "train", mode="eval")
    try:
        return torch.cat([b["views"][0].float() for b in loader]).numpy().astype(np.float64), cfg  # [8, 3, 40, 40]
    finally:
        loader.close()


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("colorspace, tol", [("lab", 1e-3), ("ycbcr", 0.5 / 109.5 + 1e-4)])
def test_colourspace_views_match_the_float64_formulas(photos, backend, colorspace, tol):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    rgb, cfg = eval_views(photos, backend, "rgb")
    mean, std = np.array(cfg.aug.mean) * 255, np.array(cfg.aug.std) * 255
    rgb8 = np.rint(rgb.transpose(0, 2, 3, 1) * std + mean)  # [8, 40, 40, 3] the 8-bit pixels
    assert np.abs(rgb.transpose(0, 2, 3, 1) * std + mean - rgb8).max() < 1e-3  # they were 8-bit
    got, _ = eval_views(photos, backend, colorspace)
    m, s = (np.array(x) for x in NORM[colorspace])
    ref = ((ref_lab if colorspace == "lab" else ref_ycbcr)(rgb8.astype(np.uint8)) - m) / s
    err = np.abs(got.transpose(0, 2, 3, 1) - ref)
    assert err.max() <= tol, (backend, colorspace, err.max())
    assert got[:, 1:].std() > 0.05  # real colour photographs: the chroma channels vary


def test_colorspace_is_checked():
    with pytest.raises(ConfigError, match=r"'aug\.colorspace': must be one of \['rgb', 'lab', 'ycbcr'\]"):
        load_config(None, ["aug.colorspace=hsv"])
