"""RandAugment (loaders/randaugment.py, loaders/dali_randaugment.py): the draws a pure function of
(seed, epoch, index, view) with the configured distributions; each op's argument PIC's
LEVEL_TO_ARG written out here; the DALI graph's ops against the PIL / torchvision ones PIC calls,
op by op on photographs; both loaders end to end (DALI's views bit-identical across world sizes
and a resume with RandAugment on: tests/test_dali_views.py)."""
import glob
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import ConfigError, load_config
from loaders import build_loader
from loaders.randaugment import GEOMETRIC, IDENTITY, OPS, WIDTH, RandAugmentParams, affine, apply_pil, op_arg
from tests.datagen import make_photo_zip

S = 32


def aug_of(*over):
    return load_config(None, [f"aug.crops=[{{count: 2, size: {S}}}]", "aug.randaugment.n=2", *over]).aug


def test_op_arguments_are_pics_level_to_arg():
    """bl0/PIC rand_augment.py: level / 10 scaled to each op's range (PosterizeTpu, Solarize,
    SolarizeAdd truncated to integers), rotate / shear / translate signed."""
    for level in (0.0, 2.5, 7.0, 10.0):
        t = level / 10
        want = {"Rotate": -30 * t, "PosterizeTpu": int(t * 4), "Solarize": int(t * 256), "SolarizeAdd": int(t * 110),
                "Color": t * 1.8 + 0.1, "Contrast": t * 1.8 + 0.1, "Brightness": t * 1.8 + 0.1,
                "Sharpness": t * 1.8 + 0.1, "ShearX": -0.3 * t, "ShearY": -0.3 * t, "TranslateXRel": -0.45 * t,
                "TranslateYRel": -0.45 * t, "AutoContrast": 0, "Equalize": 0, "Invert": 0}
        for op, name in enumerate(OPS):
            assert op_arg(op, level, -1.0) == pytest.approx(want[name]), (name, level)


def test_rotate_matrix_is_pils_rotate():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    rot = OPS.index("Rotate")
    for deg in (-27.0, -3.0, 12.5, 30.0):
        row = np.array([[rot, 1, deg, *affine(rot, deg, S, S)]], dtype=np.float32)
        mine = apply_pil(img, row, (124, 116, 104))
        pil = img.rotate(deg, resample=Image.BILINEAR, fillcolor=(124, 116, 104))
        assert np.abs(np.asarray(mine, np.int32) - np.asarray(pil, np.int32)).max() <= 1, deg


def test_draws_are_pure_and_follow_the_configured_distributions():
    aug = aug_of("aug.randaugment.m=5", "aug.randaugment.m_std=1", "aug.randaugment.p=0.3")
    params = RandAugmentParams(aug, 4)
    assert np.array_equal(params.rows(2, 7, 1), params.rows(2, 7, 1))
    assert not np.array_equal(params.rows(2, 7, 1), params.rows(3, 7, 1))
    assert not np.array_equal(params.rows(2, 7, 1), params.rows(2, 7, 0))
    rows = np.concatenate([params.rows(0, i, 0) for i in range(3000)])  # [6000, WIDTH]
    assert rows.shape == (6000, WIDTH)
    ops = rows[:, 0].astype(int)
    assert stats.chisquare(np.bincount(ops, minlength=len(OPS))).pvalue > 1e-3
    assert abs(rows[:, 1].mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 6000)
    enhance = np.isin(ops, [OPS.index(n) for n in ("Color", "Contrast", "Brightness", "Sharpness")])
    levels = (rows[enhance, 2] - 0.1) / 1.8 * 10  # back to the magnitude
    assert stats.kstest(levels, stats.norm(5, 1).cdf).pvalue > 1e-3
    geo = np.isin(ops, sorted(GEOMETRIC))
    assert abs((rows[geo, 2] < 0).mean() - 0.5) < 5 * math.sqrt(0.25 / geo.sum())
    assert all(tuple(r[3:9]) == IDENTITY for r in rows[~geo])


def test_config_checks():
    for bad in ("aug.randaugment.m=11", "aug.randaugment.n=-1", "aug.randaugment.p=2", "aug.randaugment.fill=[0, 0, 300]"):
        with pytest.raises(ConfigError, match=r"'aug\.randaugment\."):
            load_config(None, [bad])


# ---- the DALI ops against PIL's, op by op ----------------------------------------------------------
def photos(n=4):
    files = sorted(glob.glob("/usr/share/backgrounds/mate/nature/*"))[:n]
    return [np.asarray(Image.open(f).convert("RGB").resize((S, S), Image.BILINEAR), dtype=np.uint8) for f in files]


def opencv_equalize(x):
    """OpenCV's equalizeHist per channel (what DALI's equalize implements): lut = round((cdf -
    cdf_min) * 255 / (N - cdf_min)), the identity for a flat channel."""
    out = np.empty_like(x)
    for c in range(3):
        ch = x[..., c]
        cdf = np.cumsum(np.bincount(ch.ravel(), minlength=256))
        lo = cdf[cdf > 0][0]
        if cdf[-1] == lo:
            out[..., c] = ch
            continue
        lut = np.clip(np.round((cdf - lo) * 255.0 / (cdf[-1] - lo)), 0, 255).astype(np.uint8)
        out[..., c] = lut[ch]
    return out


@pytest.mark.parametrize("name", OPS)
def test_dali_op_matches_pil(name):
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from loaders.dali_randaugment import rand_augment

    ra = aug_of("aug.randaugment.n=1").randaugment
    imgs, op = photos(), OPS.index(name)
    rows = []
    for k, (level, sign) in enumerate([(3.0, 1), (7.0, -1), (10.0, 1), (5.0, -1)]):
        arg = op_arg(op, level, sign)
        rows.append(np.array([[op, 1, arg, *(affine(op, arg, S, S) if op in GEOMETRIC else IDENTITY)]], np.float32))

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x, r = fn.external_source(source=lambda: (imgs, rows), num_outputs=2, batch=True, layout=["HWC", None])
        return rand_augment(x, r, ra, S)

    p = pipe()
    p.build()
    out = p.run()[0]
    changed = 0
    for k, img in enumerate(imgs):
        got = np.array(out[k]).astype(np.int32)
        changed += not np.array_equal(got, img)
        pil = np.asarray(apply_pil(Image.fromarray(img), rows[k], ra.fill), dtype=np.int32)
        d = np.abs(got - pil)
        if name == "Equalize":  # DALI's is OpenCV's histogram equalisation, not PIL's (documented)
            assert np.array_equal(got, opencv_equalize(img).astype(np.int32))
        elif op in GEOMETRIC:  # bilinear in both; PIL cuts the fill edge hard, DALI blends it over a pixel
            a, b, c, dd, e, f = rows[k][0, 3:9]
            yy, xx = np.mgrid[0:S, 0:S] + 0.5
            sx, sy = a * xx + b * yy + c, dd * xx + e * yy + f
            inside = (sx >= 1.5) & (sx <= S - 1.5) & (sy >= 1.5) & (sy <= S - 1.5)
            outside = (sx < -1) | (sx > S + 1) | (sy < -1) | (sy > S + 1)
            assert d[inside].max() <= 1 and (not outside.any() or d[outside].max() == 0), (k, d.max())
            assert inside.mean() > 0.3
        else:
            assert d.max() <= (1 if name == "AutoContrast" else 0), (k, d.max())
    assert changed >= (1 if name == "AutoContrast" else 2), changed  # the op did something (level 5 of an
    # enhance op is the identity, AutoContrast leaves a photo that already spans 0..255)


# ---- the loaders end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=16)


def loader_cfg(root, backend, *extra):
    return load_config(None, [f"data.path={root}", f"loader.backend={backend}", "loader.device=cpu",
                              "loader.num_threads=2", "loader.num_workers=1", "loader.batch_size=4",
                              f"aug.crops=[{{count: 2, size: {S}}}]", "aug.randaugment.n=2", "aug.randaugment.p=0.8",
                              *extra])


def views(loader):
    out = {}
    for b in loader:
        for row, i in enumerate(b["index"].tolist()):
            out[i] = [v[row].clone() for v in b["views"]]
    loader.close()
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_apply_randaugment(data, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    off = views(build_loader(loader_cfg(data, backend, "aug.randaugment.n=0"), "train"))
    on = views(build_loader(loader_cfg(data, backend), "train"))
    again = views(build_loader(loader_cfg(data, backend), "train"))
    assert on.keys() == off.keys() == set(range(16))
    changed = sum(not torch.equal(a, b) for i in on for a, b in zip(on[i], off[i]))
    assert changed >= 20  # 32 views, 1 - 0.2^2 = 96% fire at least one op
    assert all(torch.equal(a, b) for i in on for a, b in zip(on[i], again[i]))
