"""CMC's image mixture (Shen et al., "Rethinking Image Mixture for Unsupervised Visual
Representation Learning"; szq0214/CMC_with_Image_Mixture, IM/mixture.py and IM/utils.py), Cutout
and RandomErasing: the draws, as a pure function of (seed, epoch, index, view), and the mixing of
normalised view tensors.

A sample's view v gets a *plan*: the passes of ``aug.mix.kind`` whose gates fired, in order. A
pass that mixes in another sample names a `Partner`: a data-set index drawn uniformly from all N
(as the seed's ``random.choice(range(len(self)))``, never a neighbour in the batch), the uniforms
of its own view (cut by the same view function, crop group v) and, for ``im``'s region passes,
the partner's own global passes: the seed builds IM as ``RM(GM(dataset))``, so RM's partner is
read through GM and comes out globally mixed itself.

What the seed's code does, and fastinst with it:

- global: ``g_num`` passes; each mixes when its uniform is below ``g_prob`` (the seed skips when
  ``p > prob``): x <- lam x + (1 - lam) x2, lam ~ Beta(g_alpha, g_alpha), x2 the partner's view;
- region: ``r_num`` passes, each with p ``r_prob``, none when ``r_beta <= 0``; lam ~ Beta(r_beta,
  r_beta); ``rand_bbox``: side ratio sqrt(1 - lam) truncated to pixels (``int``), the centre a
  uniform pixel, the box [c - cut // 2, c + cut // 2) clipped (so an odd cut loses a pixel); the
  pixel decay multiplies x only when pass 0 itself mixes; the partner's box is pasted;
- cutout: with p ``cutout_p``, a ``mask_size`` square around a uniform centre (``cutout_inside``
  keeps it inside), clipped, set to ``mask_color`` (in normalised units);
- erasing: with p ``random_erasing_prob``, up to ``max_attempt`` tries of area U(area_ratio_range)
  times the view's and aspect U(r, 1 / r); the first that fits (both sides smaller than the view)
  is placed uniformly and set to one U(0, 1) value.

The seed's boxes name their first coordinate x but index the tensor's first spatial axis (rows)
with it, and clip it with the width (Cutout, RandomErasing), or call the rows' extent W
(``rand_bbox``). fastinst's views are square, where the two readings agree; it indexes as the
seed does: the first draw places rows. The seed draws from the unseeded global generators; here
the draws come from numpy Philox, key ``derive_seed(seed, "mix")``, counter (0, view, index,
epoch), one stream per (sample, view), so a resumed run, another world size or another batch
composition mixes the same pixels. Each pass draws all of its values whether its gate fires or
not, in this order: global (gate, partner, lam, the partner view's uniforms), region (gate, lam,
partner, its uniforms, for im the partner's own global passes, then the box centre: row,
column); Cutout (gate, then the centre: row, column) and RandomErasing (gate, then per attempt
area, aspect, and where it fits row, column, value) stop drawing when they are done.

No DALI import here; loaders/dali_graph.py applies the same plan in the DALI graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import numpy as np
import torch

from fastinst.core.runtime import derive_seed

from .view_params import N_UNIFORM

Box = Tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1) of a view


@dataclass
class Partner:
    index: int  # data-set index
    uniforms: np.ndarray  # (N_UNIFORM,) of its view (loaders/view_params.py)
    ops: list = field(default_factory=list)  # its own passes (im's region partners: their global passes)


@dataclass
class Blend:  # x <- lam x + (1 - lam) partner
    partner: Partner
    lam: float


@dataclass
class Paste:  # x <- scale x, then x[box] <- partner[box]
    partner: Partner
    scale: float
    box: Box
    lam: float = 1.0  # the Beta draw the box was cut for (a record: the box is what mixes)


@dataclass
class Fill:  # x[box] <- value
    value: float
    box: Box


def _global_passes(gen: np.random.Generator, mix, n: int) -> List[Blend]:
    ops = []
    for _ in range(mix.g_num):
        gate = gen.random() < mix.g_prob
        index, lam, u = int(gen.integers(n)), float(gen.beta(mix.g_alpha, mix.g_alpha)), gen.random(N_UNIFORM)
        if gate:
            ops.append(Blend(Partner(index, u), lam))
    return ops


def rand_bbox(gen: np.random.Generator, h: int, w: int, lam: float) -> Box:
    """The seed's rand_bbox on a (C, h, w) view: cut = int(side * sqrt(1 - lam)) per axis, the
    centre a uniform pixel (rows first), the box [c - cut // 2, c + cut // 2) clipped."""
    rat = math.sqrt(1.0 - lam)
    cut_r, cut_c = int(h * rat), int(w * rat)
    cr, cc = int(gen.integers(h)), int(gen.integers(w))
    return (min(max(cr - cut_r // 2, 0), h), min(max(cr + cut_r // 2, 0), h),
            min(max(cc - cut_c // 2, 0), w), min(max(cc + cut_c // 2, 0), w))


def _region_passes(gen: np.random.Generator, mix, n: int, h: int, w: int, nested: bool) -> List[Paste]:
    ops = []
    for k in range(mix.r_num):
        gate = gen.random() < mix.r_prob and mix.r_beta > 0
        lam = float(gen.beta(mix.r_beta, mix.r_beta)) if mix.r_beta > 0 else 1.0
        partner = Partner(int(gen.integers(n)), gen.random(N_UNIFORM))
        if nested:  # RM(GM(dataset)): the partner is read through GM
            partner.ops = _global_passes(gen, mix, n)
        box = rand_bbox(gen, h, w, lam)
        if gate:
            ops.append(Paste(partner, mix.r_pixel_decay if k == 0 else 1.0, box, lam))
    return ops


def _cutout(gen: np.random.Generator, mix, h: int, w: int) -> List[Fill]:
    if not gen.random() < mix.cutout_p:
        return []
    m = mix.mask_size
    half, offset = m // 2, 1 if m % 2 == 0 else 0
    lo_x, hi_x = (half, w + offset - half) if mix.cutout_inside else (0, w + offset)
    lo_y, hi_y = (half, h + offset - half) if mix.cutout_inside else (0, h + offset)
    cx, cy = int(gen.integers(lo_x, hi_x)), int(gen.integers(lo_y, hi_y))
    x0, y0 = cx - half, cy - half
    # the seed's x (drawn over the width, clipped with it) indexes rows: square views agree
    return [Fill(float(mix.mask_color), (max(0, x0), min(w, x0 + m), max(0, y0), min(h, y0 + m)))]


def _erasing(gen: np.random.Generator, mix, h: int, w: int) -> List[Fill]:
    if not gen.random() < mix.random_erasing_prob:
        return []
    lo, hi = mix.area_ratio_range
    for _ in range(mix.max_attempt):
        area = gen.uniform(lo, hi) * h * w
        aspect = gen.uniform(mix.min_aspect_ratio, 1.0 / mix.min_aspect_ratio)
        mh, mw = int(math.sqrt(area * aspect)), int(math.sqrt(area / aspect))
        if mw < w and mh < h:
            x0, y0 = int(gen.integers(0, w - mw)), int(gen.integers(0, h - mh))
            return [Fill(float(gen.uniform(0.0, 1.0)), (x0, x0 + mw, y0, y0 + mh))]
    return []


class MixPlans:
    """Picklable (it runs in the loaders' workers): the plan of every view of a sample."""

    def __init__(self, aug, seed: int, num_samples: int):
        self.mix, self.n = aug.mix, num_samples
        self.sizes = [c.size for c in aug.view_crops]  # view v -> its side
        self.key = derive_seed(seed, "mix")

    def plan(self, epoch: int, index: int, view: int) -> list:
        """The passes of view ``view`` of sample ``index`` at ``epoch`` that fire, in order."""
        gen = np.random.Generator(np.random.Philox(key=self.key, counter=[0, view, index, epoch]))
        return draw_plan(gen, self.mix, self.n, self.sizes[view])


def max_partners(mix) -> int:
    """The most partners one view's plan can read (0 for Cutout / RandomErasing / none): every
    global pass, every region pass, and for im each region partner's own global passes."""
    return {"global": mix.g_num, "region": mix.r_num,
            "im": mix.g_num + mix.r_num * (1 + mix.g_num)}.get(mix.kind, 0)


def draw_plan(gen, mix, n: int, side: int) -> list:
    """The passes of ``mix.kind`` that fire on a side x side view, drawn from ``gen`` (anything
    with numpy Generator's random / integers / beta / uniform) over a data set of ``n``."""
    if mix.kind == "cutout":
        return _cutout(gen, mix, side, side)
    if mix.kind == "erasing":
        return _erasing(gen, mix, side, side)
    ops: list = _global_passes(gen, mix, n) if mix.kind in ("global", "im") else []
    if mix.kind in ("region", "im"):
        ops += _region_passes(gen, mix, n, side, side, nested=mix.kind == "im")
    return ops


def apply_plan(x: torch.Tensor, ops: list, view_of: Callable[[Partner], torch.Tensor]) -> torch.Tensor:
    """The mixed view: ``x`` [C, H, W] (normalised) through ``ops``; ``view_of(partner)`` gives a
    partner's own (unmixed) view, which its own passes then mix (im's region partners)."""
    for op in ops:
        if isinstance(op, Blend):
            x = x * op.lam + view_of(op.partner) * (1.0 - op.lam)
        elif isinstance(op, Paste):
            other = apply_plan(view_of(op.partner), op.partner.ops, view_of)
            x = x * op.scale if op.scale != 1.0 else x.clone()
            r0, r1, c0, c1 = op.box
            x[:, r0:r1, c0:c1] = other[:, r0:r1, c0:c1]
        else:
            r0, r1, c0, c1 = op.box
            x = x.clone()
            x[:, r0:r1, c0:c1] = op.value
    return x


def partners(ops: list) -> List[Partner]:
    """Every partner a plan reads (its own partners' partners included), depth first."""
    out = []
    for op in ops:
        if not isinstance(op, Fill):
            out.append(op.partner)
            out += partners(op.partner.ops)
    return out


def prune(ops: list, bad: Callable[[Partner], bool]) -> list:
    """``ops`` without the passes whose partner is ``bad`` (an unreadable image, with
    data.on_error=skip: that pass does not mix), the partners' own passes pruned alike."""
    out = []
    for op in ops:
        if isinstance(op, Fill):
            out.append(op)
        elif not bad(op.partner):
            op.partner.ops = prune(op.partner.ops, bad)
            out.append(op)
    return out


# ---- the plan as rows of an extended batch (the DALI graph's form) ------------------------------
class MixRows:
    """Layout of one view's mixing row (float32), for an extended batch: the sampled anchors
    first, then every partner they read, each a sample of its own (decoded and cut once). Slot
    k of a phase names a position in the extended batch and ends with its flag (1: the pass
    fires); an unused slot is the identity (flag 0: the graph leaves the view as it was)."""

    G, R, F = 3, 7, 6  # floats per global slot [position, lam, on], region slot [position, scale, r0, c0, h, w,
    #                    on], fill slot [value, r0, c0, h, w, on]

    def __init__(self, mix):
        self.g, self.r = mix.g_num, mix.r_num
        self.region, self.fill = self.G * self.g, self.G * self.g + self.R * self.r
        # then: whether the sample needs this view cut (an anchor: every view; a partner: the view
        # it is mixed into), and the position whose view the output keeps here (a partner: 0)
        self.needs, self.keep = self.fill + self.F, self.fill + self.F + 1
        self.width = self.keep + 1

    def g_slot(self, k: int) -> int:
        return self.G * k

    def r_slot(self, k: int) -> int:
        return self.region + self.R * k

    def identity(self, position: int) -> np.ndarray:
        row = np.zeros(self.width, dtype=np.float32)
        for k in range(self.g):
            row[self.g_slot(k):self.g_slot(k) + 2] = (position, 1.0)
        for k in range(self.r):
            row[self.r_slot(k):self.r_slot(k) + 2] = (position, 1.0)
        return row  # every flag 0: no pass, no view needed, keeps position 0

    def batch(self, plans: List[List[list]]):
        """(partners, rows): ``plans[b][v]`` the ops of anchor b's view v; ``partners`` the
        [(Partner, view)] at positions B, B+1, ...; ``rows`` [B + P, V, width] float32."""
        num_views = len(plans[0]) if plans else 0
        found: List[Tuple[Partner, int]] = []
        rows: List[np.ndarray] = [np.stack([self.identity(b)] * num_views) for b in range(len(plans))]
        for b, r in enumerate(rows):
            r[:, self.needs], r[:, self.keep] = 1.0, b

        def add(partner: Partner, v: int) -> int:
            pos = len(plans) + len(found)
            found.append((partner, v))
            rows.append(np.stack([self.identity(pos)] * num_views))
            rows[pos][v, self.needs] = 1.0
            place(partner.ops, pos, v)
            return pos

        def place(ops: list, pos: int, v: int) -> None:
            row, g, r = rows[pos][v], 0, 0
            for op in ops:
                if isinstance(op, Blend):
                    row[self.g_slot(g):self.g_slot(g) + self.G] = (add(op.partner, v), op.lam, 1.0)
                    g += 1
                elif isinstance(op, Paste):
                    r0, r1, c0, c1 = op.box
                    row[self.r_slot(r):self.r_slot(r) + self.R] = (add(op.partner, v), op.scale, r0, c0, r1 - r0,
                                                                   c1 - c0, 1.0)
                    r += 1
                else:
                    r0, r1, c0, c1 = op.box
                    row[self.fill:self.fill + self.F] = (op.value, r0, c0, r1 - r0, c1 - c0, 1.0)

        for b, views in enumerate(plans):
            for v, ops in enumerate(views):
                place(ops, b, v)
        return found, np.stack(rows) if rows else np.zeros((0, num_views, self.width), np.float32)
