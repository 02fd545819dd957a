"""The image mixture (loaders/mixture.py): each kind against the seed's rules written out here in
float64 numpy, on fixed pixels and scripted draws; the draws' distributions against the
configured ones; the DALI graph (loaders/dali_graph.py) against the torch mixing on the same
draws; and both loaders end to end (identity where nothing fires, Cutout boxes, bad partners).
Mixed DALI views bit-identical across world sizes and a resume: tests/test_dali_views.py."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import ConfigError, load_config
from loaders import build_loader
from loaders.mixture import Blend, Fill, MixPlans, MixRows, Paste, apply_plan, draw_plan, partners
from loaders.sources import DataError
from tests.datagen import make_photo_zip

SIDE = 12


def mix_of(kind, *over):
    return load_config(None, [f"aug.crops=[{{count: 1, size: {SIDE}}}]", f"aug.mix.kind={kind}", *over]).aug.mix


class Script:
    """A generator whose draws are given: scalars in order; a partner view's uniforms are zeros."""

    def __init__(self, *values):
        self.values = list(values)

    def _next(self):
        return self.values.pop(0)

    def random(self, size=None):
        return np.zeros(size) if size is not None else self._next()

    def integers(self, lo, hi=None):
        lo, hi = (0, lo) if hi is None else (lo, hi)
        v = self._next()
        assert lo <= v < hi, (v, lo, hi)
        return v

    def beta(self, a, b):
        return self._next()

    def uniform(self, lo, hi):
        v = self._next()
        assert lo <= v <= hi
        return v


# ---- the seed's rules, written out (IM/mixture.py, IM/utils.py), on [C, H, W] float64 arrays ----
def seed_box(h, w, lam, cr, cc):
    """rand_bbox: cut = int(side * sqrt(1 - lam)), [c - cut // 2, c + cut // 2) clipped."""
    cut_r, cut_c = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    return (int(np.clip(cr - cut_r // 2, 0, h)), int(np.clip(cr + cut_r // 2, 0, h)),
            int(np.clip(cc - cut_c // 2, 0, w)), int(np.clip(cc + cut_c // 2, 0, w)))


def seed_global(x, take, base, mix):
    for _ in range(mix.g_num):
        gate, idx, lam = take(), take(), take()
        if gate <= mix.g_prob:
            x = x * lam + base[idx] * (1 - lam)
    return x


def seed_region(x, take, base, mix, nested):
    for k in range(mix.r_num):
        gate, lam, idx = take(), take(), take()
        other = seed_global(base[idx].copy(), take, base, mix) if nested else base[idx]
        r0, r1, c0, c1 = seed_box(x.shape[1], x.shape[2], lam, take(), take())
        if mix.r_beta > 0 and gate <= mix.r_prob:
            if k == 0:
                x = mix.r_pixel_decay * x
            x = x.copy()
            x[:, r0:r1, c0:c1] = other[:, r0:r1, c0:c1]
    return x


def seed_cutout(x, take, mix):
    if take() > mix.cutout_p:
        return x
    h, w = x.shape[1:]
    half, off = mix.mask_size // 2, 1 if mix.mask_size % 2 == 0 else 0
    lo_x, hi_x, lo_y, hi_y = (half, w + off - half, half, h + off - half) if mix.cutout_inside else (0, w + off, 0, h + off)
    cx, cy = take(), take()
    assert lo_x <= cx < hi_x and lo_y <= cy < hi_y
    x0, y0 = max(0, cx - half), max(0, cy - half)
    x = x.copy()
    x[:, x0:min(w, cx - half + mix.mask_size), y0:min(h, cy - half + mix.mask_size)] = mix.mask_color
    return x


def seed_erasing(x, take, mix):
    if take() > mix.random_erasing_prob:
        return x
    h, w = x.shape[1:]
    for _ in range(mix.max_attempt):
        area, aspect = take() * h * w, take()
        mh, mw = int(math.sqrt(area * aspect)), int(math.sqrt(area / aspect))
        if mw < w and mh < h:
            x0, y0 = take(), take()
            x = x.copy()
            x[:, x0:x0 + mw, y0:y0 + mh] = take()
            return x
    return x


@pytest.fixture
def pixels():
    rng = np.random.default_rng(7)
    return {i: rng.normal(size=(3, SIDE, SIDE)) for i in range(5)}


def check_against_seed(ops, reference, pixels):
    got = apply_plan(torch.tensor(pixels[0], dtype=torch.float32), ops,
                     lambda p: torch.tensor(pixels[p.index], dtype=torch.float32))
    np.testing.assert_allclose(got.double().numpy(), reference, rtol=0, atol=1e-5)
    return got


@pytest.mark.parametrize("kind", ["global", "region", "im"])
def test_partner_kinds_follow_the_seed_rules(kind, pixels):
    mix = mix_of(kind, "aug.mix.g_prob=0.5", "aug.mix.r_prob=0.5", "aug.mix.r_pixel_decay=0.25", "aug.mix.g_num=2",
                 "aug.mix.r_num=2")
    # global passes: (gate, partner, lam); region: (gate, lam, partner, [im: the partner's 2 global
    # passes], centre row, centre column). Region pass 0 does not fire (so no pixel decay), pass 1 does.
    g = [0.2, 3, 0.7, 0.9, 1, 0.4]
    sub = [0.1, 4, 0.35, 0.3, 2, 0.8]
    r = [0.8, 0.3, 2] + (sub if kind == "im" else []) + [5, 6, 0.05, 0.6, 1] + (sub if kind == "im" else []) + [2, 9]
    draws = (g if kind in ("global", "im") else []) + (r if kind != "global" else [])
    ops = draw_plan(Script(*draws), mix, 5, SIDE)
    queue = list(draws)
    take = lambda: queue.pop(0)  # noqa: E731
    ref = pixels[0]
    if kind in ("global", "im"):
        ref = seed_global(ref, take, pixels, mix)
    if kind != "global":
        ref = seed_region(ref, take, pixels, mix, nested=kind == "im")
    assert queue == []
    got = check_against_seed(ops, ref, pixels)
    assert not np.allclose(got.numpy(), pixels[0])
    pastes = [op for op in ops if isinstance(op, Paste)]
    if kind != "global":  # one region pass fired, the second: no decay, the box of lam 0.6 at (2, 9)
        assert len(pastes) == 1 and pastes[0].scale == 1.0 and pastes[0].box == seed_box(SIDE, SIDE, 0.6, 2, 9)


def test_pixel_decay_scales_only_when_the_first_region_pass_fires(pixels):
    mix = mix_of("region", "aug.mix.r_prob=0.5", "aug.mix.r_pixel_decay=0.25")
    draws = [0.1, 0.5, 1, 3, 4, 0.2, 0.9, 2, 8, 8]  # both fire
    ops = draw_plan(Script(*draws), mix, 5, SIDE)
    assert [op.scale for op in ops] == [0.25, 1.0]
    q = list(draws)
    check_against_seed(ops, seed_region(pixels[0], lambda: q.pop(0), pixels, mix, False), pixels)


@pytest.mark.parametrize("inside, draws", [(False, [0.05, 0, 12]), (False, [0.05, 7, 3]), (True, [0.01, 2, 9]),
                                           (False, [0.5])])
def test_cutout_follows_the_seed_rules(inside, draws, pixels):
    mix = mix_of("cutout", "aug.mix.mask_size=4", "aug.mix.mask_color=-1.5", f"aug.mix.cutout_inside={inside}")
    ops = draw_plan(Script(*draws), mix, 5, SIDE)
    q = list(draws)
    got = check_against_seed(ops, seed_cutout(pixels[0], lambda: q.pop(0), mix), pixels)
    assert (ops == []) == (draws == [0.5]) and q == []
    if inside:  # the whole square inside the view
        assert int((got == -1.5).sum()) == 3 * 4 * 4


def test_erasing_tries_until_a_box_fits(pixels):
    mix = mix_of("erasing", "aug.mix.random_erasing_prob=0.5", "aug.mix.area_ratio_range=[0.02, 0.9]",
                 "aug.mix.min_aspect_ratio=0.1")
    # attempt 1: area 0.9 at aspect 10 is 36 rows tall: no; attempt 2: 0.3 at 0.5 fits, at (1, 4), value 0.625
    draws = [0.2, 0.9, 10.0, 0.3, 0.5, 1, 4, 0.625]
    ops = draw_plan(Script(*draws), mix, 5, SIDE)
    q = list(draws)
    check_against_seed(ops, seed_erasing(pixels[0], lambda: q.pop(0), mix), pixels)
    assert q == [] and isinstance(ops[0], Fill) and ops[0].value == 0.625
    assert draw_plan(Script(0.7), mix, 5, SIDE) == []
    never = draw_plan(Script(0.2, *[0.9, 10.0] * mix.max_attempt), mix, 5, SIDE)
    assert never == []  # every attempt too large: nothing erased


# ---- the draws' distributions ----------------------------------------------------------------------
def test_draws_follow_the_configured_distributions():
    n, samples = 20, 3000
    mix = mix_of("im", "aug.mix.g_prob=0.3", "aug.mix.r_prob=0.2", "aug.mix.g_alpha=0.5", "aug.mix.r_beta=2.0")
    aug = load_config(None, [f"aug.crops=[{{count: 1, size: {SIDE}}}]", "aug.mix.kind=im", "aug.mix.g_prob=0.3",
                             "aug.mix.r_prob=0.2", "aug.mix.g_alpha=0.5", "aug.mix.r_beta=2.0"]).aug
    plans = MixPlans(aug, 11, n)
    blends, pastes = [], []
    for i in range(samples):
        ops = plans.plan(3, i, 0)
        blends += [op for op in ops if isinstance(op, Blend)]
        pastes += [op for op in ops if isinstance(op, Paste)]
    for got, p, total in ((len(blends), mix.g_prob, samples * mix.g_num), (len(pastes), mix.r_prob, samples * mix.r_num)):
        assert abs(got - p * total) < 5 * math.sqrt(total * p * (1 - p)), (got, p, total)
    assert stats.kstest([b.lam for b in blends], stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest([op.lam for op in pastes], stats.beta(2.0, 2.0).cdf).pvalue > 1e-3
    idx = [p.index for ops in (plans.plan(0, i, 0) for i in range(samples)) for p in partners(ops)]
    assert stats.chisquare(np.bincount(idx, minlength=n)).pvalue > 1e-3
    for op in pastes:  # rand_bbox: an unclipped box is 2 * (cut // 2) on each side
        r0, r1, c0, c1 = op.box
        cut = 2 * (int(SIDE * math.sqrt(1 - op.lam)) // 2)
        assert 0 <= r0 <= r1 <= SIDE and 0 <= c0 <= c1 <= SIDE and r1 - r0 <= cut and c1 - c0 <= cut
    # one stream per (seed, epoch, index, view): the same plan again, another epoch another one
    assert repr(plans.plan(3, 5, 0)) == repr(plans.plan(3, 5, 0)) != repr(plans.plan(4, 5, 0))


def test_cutout_and_erasing_distributions():
    aug = load_config(None, [f"aug.crops=[{{count: 1, size: {SIDE}}}]", "aug.mix.kind=erasing",
                             "aug.mix.random_erasing_prob=0.4"]).aug
    fills = [op for i in range(4000) for op in MixPlans(aug, 2, 10).plan(0, i, 0)]
    assert abs(len(fills) - 1600) < 5 * math.sqrt(4000 * 0.24)
    assert stats.kstest([op.value for op in fills], "uniform").pvalue > 1e-3
    for op in fills:
        r0, r1, c0, c1 = op.box
        area = (r1 - r0) * (c1 - c0) / SIDE ** 2
        assert 0 <= r0 <= r1 < SIDE and 0 <= c0 <= c1 < SIDE and area <= 0.4 + 1e-9  # a side may truncate to 0, as in the seed
    aug = load_config(None, [f"aug.crops=[{{count: 1, size: {SIDE}}}]", "aug.mix.kind=cutout", "aug.mix.cutout_p=1",
                             "aug.mix.mask_size=3"]).aug
    boxes = [MixPlans(aug, 2, 10).plan(0, i, 0)[0].box for i in range(4000)]
    # the centre row c is uniform over [0, SIDE) (mask 3: half 1, odd): rows [max(0, c - 1), min(SIDE, c + 2))
    centre = [r0 + 1 if r0 > 0 else r1 - 2 for r0, r1, _, _ in boxes]
    assert all(r1 - r0 == min(SIDE, c + 2) - max(0, c - 1) for c, (r0, r1, _, _) in zip(centre, boxes))
    assert stats.chisquare(np.bincount(centre, minlength=SIDE)).pvalue > 1e-3


def test_config_checks():
    with pytest.raises(ConfigError, match=r"'aug\.mix\.kind'.*data\.cache=part"):
        load_config(None, ["aug.mix.kind=im", "data.cache=part"])
    load_config(None, ["aug.mix.kind=cutout", "data.cache=part"])  # no partners: fine
    with pytest.raises(ConfigError, match=r"'aug\.mix\.mask_size'"):
        load_config(None, ["aug.crops=[{count: 1, size: 32}]", "aug.mix.kind=cutout", "aug.mix.cutout_inside=true"])
    with pytest.raises(ConfigError, match=r"'aug\.mix\.g_prob'"):
        load_config(None, ["aug.mix.g_prob=1.5"])
    from fastinst.eval.linear import probe_data_config

    assert probe_data_config(load_config(None, ["aug.mix.kind=im"])).aug.mix.kind == "none"


# ---- the DALI graph against the torch mixing, on the same draws -----------------------------------
@pytest.mark.parametrize("kind", ["global", "region", "im", "cutout", "erasing"])
def test_dali_graph_mixes_as_the_torch_function(kind):
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from loaders.dali_graph import mix_view

    aug = load_config(None, [f"aug.crops=[{{count: 1, size: {SIDE}}}]", f"aug.mix.kind={kind}", "aug.mix.g_prob=0.6",
                             "aug.mix.r_prob=0.6", "aug.mix.cutout_p=0.6", "aug.mix.random_erasing_prob=0.6",
                             "aug.mix.mask_size=5", "aug.mix.r_pixel_decay=0.5", "aug.mix.mask_color=2"]).aug
    b, n = 8, 10
    plans = MixPlans(aug, 0, n)
    ops = [[plans.plan(0, i, 0)] for i in range(b)]
    found, rows = MixRows(aug.mix).batch(ops)
    rng = np.random.default_rng(1)
    base = {i: rng.normal(size=(SIDE, SIDE, 3)).astype(np.float32) for i in range(n)}
    views = [base[i] for i in range(b)] + [base[p.index] for p, _ in found]

    @pipeline_def(batch_size=len(views), num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x, m = fn.external_source(source=lambda: (views, list(rows[:, 0])), num_outputs=2, batch=True,
                                  layout=["HWC", None])
        return mix_view(x, m, aug.mix, MixRows(aug.mix), "HWC")

    p = pipe()
    p.build()
    out = p.run()[0]
    for i in range(b):
        ref = apply_plan(torch.from_numpy(base[i]).permute(2, 0, 1), ops[i][0],
                         lambda q: torch.from_numpy(base[q.index]).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        got = np.array(out[i])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        if not ops[i][0]:
            assert np.array_equal(got, base[i])  # an identity row changes no bit
    assert sum(bool(o[0]) for o in ops) >= 3


# ---- the loaders end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=24)


def loader_cfg(root, backend, *extra):
    return load_config(None, [f"data.path={root}", f"loader.backend={backend}", "loader.device=cpu",
                              "loader.num_threads=2", "loader.num_workers=1", "loader.batch_size=4",
                              "aug.crops=[{count: 2, size: 20}]", *extra])


def views_by_index(loader):
    out = {}
    for batch in loader:
        for row, i in enumerate(batch["index"].tolist()):
            out[i] = [v[row].clone() for v in batch["views"]]
    loader.close()
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_cutout_boxes_in_the_loaders(photos, backend):
    """Cutout with p 1: inside each view's drawn box the mask colour, outside the unmixed view bit for bit."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    plain = views_by_index(build_loader(loader_cfg(photos, backend), "train"))
    cfg = loader_cfg(photos, backend, "aug.mix.kind=cutout", "aug.mix.cutout_p=1", "aug.mix.mask_size=9",
                     "aug.mix.mask_color=3.5")
    cut = views_by_index(build_loader(cfg, "train"))
    plans = MixPlans(cfg.aug, cfg.seed, 24)
    assert sorted(cut) == sorted(plain) == list(range(24))
    for i in cut:
        for v in range(2):
            (op,) = plans.plan(0, i, v)
            r0, r1, c0, c1 = op.box
            inside = torch.zeros(20, 20, dtype=torch.bool)
            inside[r0:r1, c0:c1] = True
            assert bool((cut[i][v][:, inside] == 3.5).all())
            assert torch.equal(cut[i][v][:, ~inside], plain[i][v][:, ~inside])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_partner_mixing_in_the_loaders(photos, backend):
    """im: a view whose plan fires nothing is the unmixed view bit for bit; the others change."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    plain = views_by_index(build_loader(loader_cfg(photos, backend), "train"))
    cfg = loader_cfg(photos, backend, "aug.mix.kind=im", "aug.mix.g_prob=0.3", "aug.mix.r_prob=0.3")
    mixed = views_by_index(build_loader(cfg, "train"))
    plans = MixPlans(cfg.aug, cfg.seed, 24)
    fired = changed = 0
    for i in mixed:
        for v in range(2):
            ops = plans.plan(0, i, v)
            same = torch.equal(mixed[i][v], plain[i][v])
            assert ops or same, (i, v)
            fired += bool(ops)
            changed += not same
    assert fired >= 12 and changed >= fired - 2


def test_a_bad_partner_is_named_or_left_unmixed(tmp_path):
    """A truncated image read as another sample's partner: a DataError naming it as a mixture
    partner (data.on_error=raise), or that pass unmixed (skip); in both backends' sample reads."""
    from types import SimpleNamespace

    from loaders.prepare import write_zip_layout
    from tests.datagen import colour_items

    items = list(colour_items(12))
    items[5] = (items[5][0], items[5][1][: len(items[5][1]) // 2], items[5][2])  # truncated JPEG
    write_zip_layout(str(tmp_path), "train", items)
    over = ["aug.mix.kind=global", "aug.mix.g_prob=0.5", "aug.mix.g_num=3"]
    cfg = loader_cfg(str(tmp_path), "torch", *over, "data.on_error=raise")
    plans = MixPlans(cfg.aug, cfg.seed, 12)
    i = next(i for i in range(12) if i != 5 and 5 in [p.index for p in partners(plans.plan(0, i, 0))])
    with pytest.raises(DataError, match=r"img_0005.*a mixture partner of"):
        build_loader(cfg, "train").dataset[(0, i)]
    views, index, _ = build_loader(loader_cfg(str(tmp_path), "torch", *over, "data.on_error=skip"), "train").dataset[(0, i)]
    assert index == i and len(views) == 2
    pytest.importorskip("nvidia.dali")
    from loaders.dali_backend import BatchFeed
    from loaders.view_params import ViewParams

    ld = build_loader(cfg, "train")
    feed = BatchFeed(ld.source, ld.sampler, 4, True, "raise", 0, 0, view_params=ViewParams(cfg.aug, cfg.seed),
                     mix_plans=plans)
    feed.plan = lambda epoch: [np.array([i])]  # a batch of sample i alone (the bad image is its partner)
    with pytest.raises(DataError, match=r"img_0005.*a mixture partner"):
        feed(SimpleNamespace(epoch_idx=0, iteration=0))
    feed.on_error = "skip"
    bufs, index, _, _, rows = feed(SimpleNamespace(epoch_idx=0, iteration=0))
    kept = sum(len(partners(prune_bad(plans.plan(0, i, v)))) for v in range(2))  # both views' partners but 5
    assert int(index[0]) == i and len(bufs) == len(rows) == 1 + kept and kept < sum(
        len(partners(plans.plan(0, i, v))) for v in range(2))


def prune_bad(ops):
    from loaders.mixture import prune

    return prune(ops, lambda p: p.index == 5)


def test_im_config_is_cmc_recipe_plus_the_seed_defaults():
    """configs/cmc_imagenet100_r50v1_ycbcr_im.yaml: the seed's IM flags (train_CMC.py defaults),
    everything else as the ImageNet-100 CMC config; MixConfig's defaults are the seed's too."""
    import dataclasses
    import os

    from fastinst.config import MixConfig, to_dict

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    im = load_config(os.path.join(root, "configs", "cmc_imagenet100_r50v1_ycbcr_im.yaml"))
    base = load_config(os.path.join(root, "configs", "cmc_imagenet100_r50v1_ycbcr.yaml"))
    seed = dict(g_alpha=1.0, g_num=2, g_prob=0.1, r_beta=1.0, r_prob=0.1, r_num=2, r_pixel_decay=1.0, mask_size=50,
                cutout_p=0.1, cutout_inside=False, mask_color=0.0, area_ratio_range=(0.02, 0.4),
                random_erasing_prob=0.1, min_aspect_ratio=0.3, max_attempt=20)
    assert im.aug.mix == MixConfig(kind="im", **seed) and MixConfig() == MixConfig(kind="none", **seed)
    same = dataclasses.replace(im, name=base.name, aug=dataclasses.replace(im.aug, mix=MixConfig()))
    assert to_dict(same) == to_dict(base)
