"""ISL's feature-space GAN (Wang et al. 2021; ZiweiWangTHU/ISL): the generator G(a, p, n) → p′
of a positive for an anchor, the discriminator of real (anchor, positive, negative) triplets,
their BCE losses, the mining radius that D's score sets, and the GAN's stopping rule. The
method that trains them in its GAN stages is fastinst/methods/isl/method.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """G(a, p, n) → p′: 3d → 2d → d → d with LeakyReLU (slope 0.01), output L2-normalised."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.LeakyReLU(0.01), nn.Linear(2 * dim, dim),
                                 nn.LeakyReLU(0.01), nn.Linear(dim, dim))

    def forward(self, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(torch.cat([a, p, n], 1)), dim=1)  # [B, d]


class Discriminator(nn.Module):
    """D(x, y, z) → logit that (x, y, z) is a real (anchor, positive, negative) triplet:
    3d → d → d/2 → 1 with LeakyReLU; the score is its sigmoid."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * dim, dim), nn.LeakyReLU(0.01), nn.Linear(dim, dim // 2),
                                 nn.LeakyReLU(0.01), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, y, z], 1)).squeeze(1)  # [B] logits


def _bce(logit: torch.Tensor, target: float) -> torch.Tensor:
    # BCE on sigmoid(logit), in its stable form (autocast refuses BCE on probabilities)
    return F.binary_cross_entropy_with_logits(logit.float(), torch.full_like(logit.float(), target))


def triplet_logits(disc: nn.Module, a, p, n, fake) -> torch.Tensor:
    """D's logits of (a,p,n), (a,p,p′), (a,p′,n) in ONE call (one DDP forward): [3, B]."""
    x = torch.cat([a, a, a]), torch.cat([p, p, fake]), torch.cat([n, fake, n])
    return disc(*x).view(3, -1)


def d_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_D = ½[BCE(D(a,p,n), 1) + ½BCE(D(a,p,p′), 0) + ½BCE(D(a,p′,n), 0)] (p′ detached)."""
    real, fake_p, fake_pn = logits
    return 0.5 * (_bce(real, 1.0) + 0.5 * _bce(fake_p, 0.0) + 0.5 * _bce(fake_pn, 0.0))


def g_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_G = ½BCE(D(a,p,p′), 1) + ½BCE(D(a,p′,n), 1) (logits of the fakes: rows 1 and 2)."""
    return 0.5 * _bce(logits[1], 1.0) + 0.5 * _bce(logits[2], 1.0)


def mining_radius(score: torch.Tensor, R: float) -> torch.Tensor:
    """r = R + (1 − s)(1 − R): a confident D (s → 1) accepts neighbours down to cosine R."""
    return R + (1.0 - score) * (1.0 - R)


# ---- the GAN's stopping rule -----------------------------------------------------------------
class StoppingRule:
    """A GAN epoch budget plus an optional patience on an EMA of the per-epoch mean G loss.

    ``update(mean_g_loss)`` after each GAN epoch: ema ← β·ema + (1 − β)·loss (the first epoch
    sets it); an improvement of more than ``min_delta`` below the best EMA so far makes this
    epoch the best (the caller keeps that G) and resets the count; otherwise the count grows,
    and ``patience`` epochs without improvement stop the stage (``patience`` 0: budget only).
    Returns (is_best, stop). State is plain numbers (checkpointed by the method)."""

    def __init__(self, patience: int = 0, beta: float = 0.5, min_delta: float = 0.0):
        self.patience, self.beta, self.min_delta = patience, beta, min_delta
        self.reset()

    def reset(self) -> None:
        self.ema: Optional[float] = None
        self.best = math.inf
        self.bad = 0
        self.stopped = False

    def update(self, loss: float):
        self.ema = loss if self.ema is None else self.beta * self.ema + (1.0 - self.beta) * loss
        is_best = self.ema < self.best - self.min_delta
        if is_best:
            self.best, self.bad = self.ema, 0
        else:
            self.bad += 1
        self.stopped = self.patience > 0 and self.bad >= self.patience
        return is_best, self.stopped

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best, "bad": self.bad, "stopped": self.stopped}

    def load(self, s: dict) -> None:
        self.ema, self.best, self.bad, self.stopped = s["ema"], float(s["best"]), int(s["bad"]), bool(s["stopped"])
