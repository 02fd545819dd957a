"""DALI views as a pure function of (seed, epoch, index, view): the parameter draws
(loaders/view_params.py) against references, and the DALI CPU pipeline's views bit-identical
across world sizes, batch compositions and a mid-epoch resume."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import load_config
from fastinst.core.runtime import DistEnv
from loaders import build_loader
from loaders import view_params as vp
from loaders.prepare import write_zip_layout
from loaders.sources import DataError
from tests.datagen import make_photo_zip

dali = pytest.importorskip("nvidia.dali")

MULTI_CROP = "aug.crops=[{count: 2, size: 24}, {count: 2, size: 16, scale: [0.08, 0.14]}]"


def cfg_for(root, *extra):
    return load_config(None, [f"data.path={root}", "loader.backend=dali", "loader.device=cpu",
                              "loader.num_threads=2", "loader.num_workers=1", *extra])


def views_by_index(loader, limit=None):
    out = {}
    for k, b in enumerate(loader):
        for row, i in enumerate(b["index"].tolist()):
            out[i] = [v[row].clone() for v in b["views"]]
        if limit is not None and k + 1 >= limit:
            break
    return out


def assert_same_views(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for i in a:
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i])), f"index {i}: views differ"


# ------------------------------------------------------------------ parameter draws (no pipeline)


def reference_window(pairs, pos, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written out from its documentation, on
    given uniforms: pairs[t] = (area u, log-ratio u) of try t, pos = (top u, left u)."""
    for ua, ur in pairs:
        frac = scale[0] + ua * (scale[1] - scale[0])
        ar = math.exp(math.log(ratio[0]) + ur * (math.log(ratio[1]) - math.log(ratio[0])))
        w, h = round(math.sqrt(frac * height * width * ar)), round(math.sqrt(frac * height * width / ar))
        if 1 <= w <= width and 1 <= h <= height:
            return math.floor(pos[0] * (height - h + 1)), math.floor(pos[1] * (width - w + 1)), h, w
    if width / height < ratio[0]:
        h, w = round(width / ratio[0]), width
    elif width / height > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size", [(80, 103), (375, 500), (7, 3), (1, 1), (1000, 10), (12, 900)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.08, 0.14)])
def test_crop_window_is_torchvision_rule(size, scale):
    ratio = (3 / 4, 4 / 3)
    key = vp.ViewParams(load_config(None, []).aug, 3).key
    for i in range(300):
        u = vp.view_uniforms(key, 0, i, 0)[0]
        pairs = [(u[2 * t], u[2 * t + 1]) for t in range(10)]
        got = vp.crop_window(u, *size, scale, ratio)
        assert got == reference_window(pairs, u[20:22], *size, scale, ratio), (i, size)
        top, left, h, w = got
        assert 0 <= top and top + h <= size[0] and 0 <= left and left + w <= size[1]


def test_params_are_a_pure_function_of_seed_epoch_index_view():
    aug = load_config(None, ["aug.solarize_p=0.5", MULTI_CROP]).aug
    a, again = vp.ViewParams(aug, 7), vp.ViewParams(aug, 7)
    assert a.num_views == 4
    r = a.rows(2, 11, 80, 103)
    assert r.shape == (4, vp.N_PARAMS) and r.dtype == np.float32
    assert np.array_equal(r, again.rows(2, 11, 80, 103))
    assert len({row.tobytes() for row in r}) == 4  # views of one sample differ
    for other in (a.rows(3, 11, 80, 103), a.rows(2, 12, 80, 103), vp.ViewParams(aug, 8).rows(2, 11, 80, 103)):
        assert all(not np.array_equal(x, y) for x, y in zip(r, other))  # epoch, index, seed
    u = [vp.view_uniforms(a.key, e, 11, v)[0] for e in range(3) for v in range(4)]
    assert len({x.tobytes() for x in u}) == 12  # every (epoch, view) its own stream
    # a sample's views drawn together = each view drawn alone (independent of the view count)
    assert np.array_equal(np.stack(u[:4]), vp.view_uniforms(a.key, 0, 11, 0, 4))
    assert np.array_equal(vp.view_uniforms(a.key, 0, 11, 1, 2), vp.view_uniforms(a.key, 0, 11, 0, 4)[1:3])
    with pytest.raises(ValueError, match="epoch, index, view >= 0"):
        vp.view_uniforms(a.key, -1, 0, 0)


def test_params_follow_the_configured_distributions():
    import torchvision.transforms as T

    aug = load_config(None, ["aug.flip_p=0.3", "aug.jitter=[0.4, 0.3, 0.2, 0.1]", "aug.jitter_p=0.8",
                             "aug.grey_p=0.2", "aug.blur_p=0.6", "aug.blur_sigma=[0.1, 2.0]", "aug.solarize_p=0.1",
                             "aug.crops=[{count: 1, size: 32, scale: [0.2, 1.0]}]"]).aug
    H, W, n = 375, 500, 4000
    p = np.stack([vp.ViewParams(aug, 5).rows(1, i, H, W)[0] for i in range(n)]).astype(np.float64)

    def rate_is(mask, prob):  # binomial, 5 standard errors
        assert abs(mask.mean() - prob) <= 5 * math.sqrt(prob * (1 - prob) / n) + 1e-9, (mask.mean(), prob)

    rate_is(p[:, vp.FLIP] == 1, 0.3)
    jittered = p[:, vp.BRIGHTNESS] != 1
    rate_is(jittered, 0.8)
    rate_is(p[:, vp.SATURATION] == 0, 0.2)
    rate_is(p[:, vp.BLUR_ON] == 1, 0.6)
    rate_is(p[:, vp.SOLARIZE_ON] == 1, 0.1)
    for col, lo, hi in ((vp.BRIGHTNESS, 0.6, 1.4), (vp.CONTRAST, 0.7, 1.3), (vp.HUE, -36.0, 36.0)):
        x = p[jittered, col]
        assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5
        assert abs(x.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)  # uniform: centred
    assert (p[~jittered, vp.CONTRAST] == 1).all() and (p[~jittered, vp.HUE] == 0).all()
    sat = p[jittered & (p[:, vp.SATURATION] != 0), vp.SATURATION]
    assert 0.8 - 1e-5 <= sat.min() and sat.max() <= 1.2 + 1e-5
    sigma = p[:, vp.SIGMA]
    assert 0.1 - 1e-6 <= sigma.min() and sigma.max() <= 2.0 + 1e-6 and abs(sigma.mean() - 1.05) < 0.04
    # crop: inside the image, area within scale and aspect within ratio (up to integer rounding)
    top, left = p[:, 0], p[:, 1]
    h, w = p[:, 2] - top, p[:, 3] - left
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    frac = h * w / (H * W)
    assert frac.min() >= 0.2 * 0.99 and frac.max() <= 1.0
    assert (w / h).min() >= 0.75 * 0.99 and (w / h).max() <= 4 / 3 * 1.01
    # ... and distributed as torchvision's own RandomResizedCrop draws
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, H, W), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)], dtype=np.float64)  # (i, j, h, w)
    rfrac, rar = ref[:, 2] * ref[:, 3] / (H * W), ref[:, 3] / ref[:, 2]
    assert abs(frac.mean() - rfrac.mean()) < 0.025 and abs(np.quantile(frac, 0.25) - np.quantile(rfrac, 0.25)) < 0.04
    assert abs(np.log(w / h).mean() - np.log(rar).mean()) < 0.02
    assert abs((top / np.maximum(H - h, 1)).mean() - 0.5) < 0.03  # placed uniformly


def _encode(arr, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def test_header_size_is_the_dali_decoded_size():
    from nvidia.dali import fn, pipeline_def, types

    arr = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)

    def exif(orientation):  # 5-8 are transposed: DALI's decoder swaps height and width
        e = Image.Exif()
        e[vp.EXIF_ORIENTATION] = orientation
        return e.tobytes()

    bufs = [_encode(arr, "JPEG"), _encode(arr, "JPEG", exif=exif(6)), _encode(arr, "JPEG", exif=exif(3)),
            _encode(arr, "JPEG", exif=exif(8), progressive=True), _encode(arr, "PNG"), _encode(arr, "BMP")]
    want = [(30, 50), (50, 30), (30, 50), (50, 30), (30, 50), (30, 50)]
    assert [vp.image_size(b, f"img{k}") for k, b in enumerate(bufs)] == want

    @pipeline_def(batch_size=len(bufs), num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: bufs, batch=True), device="cpu",
                                 output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert [tuple(out.at(k).shape[:2]) for k in range(len(bufs))] == want
    with pytest.raises(DataError, match="broken.jpg: cannot read the image size"):
        vp.image_size(np.frombuffer(b"\xff\xd8\xff\xe0garbage", dtype=np.uint8), "broken.jpg")


# ------------------------------------------------------------------ the DALI pipeline's views


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=32)


@pytest.mark.parametrize("extra", [(), ("aug.mix.kind=im", "aug.mix.g_prob=0.4", "aug.mix.r_prob=0.4"),
                                   ("aug.randaugment.n=2",), ("aug.mix.kind=erasing", "aug.mix.random_erasing_prob=0.5")],
                         ids=["plain", "image-mixture", "randaugment", "erasing"])
def test_views_bit_identical_across_world_sizes_and_resume(photos, extra):
    """Index i's views at world 1 (batch 4), at world 2 (ranks 0 and 1, batch 2: the same global
    batch, other batch positions) and after a mid-epoch resume are equal bit for bit; another
    epoch gives other views. Also with the image mixture (its partners extend the batch) and
    with RandAugment."""
    cfg = cfg_for(photos, MULTI_CROP, "aug.solarize_p=0.5", "loader.batch_size=4", *extra)
    full = build_loader(cfg, "train")
    epoch0, epoch1 = views_by_index(full), views_by_index(full)
    full.close()
    assert sorted(epoch0) == list(range(32))
    same = [torch.equal(a, b) for i in epoch0 for a, b in zip(epoch0[i], epoch1[i])]
    assert sum(same) <= len(same) // 20, f"{sum(same)} of {len(same)} views equal in epochs 0 and 1"  # (flat areas)
    assert sum(torch.equal(epoch0[i][0], epoch0[i][1]) for i in epoch0) <= 2  # views differ (but a black photo)
    w2 = {}
    cfg2 = cfg_for(photos, MULTI_CROP, "aug.solarize_p=0.5", "loader.batch_size=2", *extra)
    for r in range(2):
        ld = build_loader(cfg2, "train", env=DistEnv(r, 2, r, 2))
        w2.update(views_by_index(ld))
        ld.close()
    assert_same_views(w2, epoch0)
    first = build_loader(cfg, "train")
    views_by_index(first, limit=3)
    state = first.state_dict()
    first.close()
    assert (state["epoch"], state["next_batch"]) == (0, 3)
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(state)
    rest0, rest1 = views_by_index(resumed), views_by_index(resumed, limit=2)
    resumed.close()
    assert_same_views(rest0, {i: epoch0[i] for i in rest0})
    assert len(rest0) == 32 - 3 * 4 and len(rest1) == 8
    assert_same_views(rest1, {i: epoch1[i] for i in rest1})


def test_dali_crop_cuts_the_drawn_window(tmp_path):
    """A gradient image (R = 2x, G = 4y): the mean of each view is the centre of the window the
    parameters name, in (y, x) order."""
    H, W = 60, 120
    arr = np.zeros((H, W, 3), dtype=np.uint8)
    arr[..., 0] = 2 * np.arange(W)[None, :]
    arr[..., 1] = 4 * np.arange(H)[:, None]
    items = [(f"c0/img_{i}.png", _encode(arr, "PNG").tobytes(), 0) for i in range(8)]
    write_zip_layout(str(tmp_path), "train", items)
    cfg = cfg_for(str(tmp_path), "aug.crops=[{count: 2, size: 16}]", "aug.jitter_p=0", "aug.grey_p=0",
                  "aug.blur_p=0", "aug.mean=[0, 0, 0]", "aug.std=[0.00392156862745098, 0.00392156862745098, "
                  "0.00392156862745098]", "loader.batch_size=4", "seed=9")
    got = views_by_index(build_loader(cfg, "train"))
    params = vp.ViewParams(cfg.aug, 9)
    for i, views in got.items():
        for v, (view, row) in enumerate(zip(views, params.rows(0, i, H, W))):
            y0, x0, y1, x1 = row[:4].tolist()
            mean = view.float().mean(dim=(1, 2))
            assert abs(mean[0] - 2 * ((x0 + x1) / 2 - 0.5)) < 2.5, (i, v, row[:4], mean)
            assert abs(mean[1] - 4 * ((y0 + y1) / 2 - 0.5)) < 5.0, (i, v, row[:4], mean)
