"""Two toy methods that exercise the method protocol the shipped methods do not all use:

- ``TwoEncoders``: two trained encoders (like CMC's L and ab trunks), each embedding its own
  view; NT-Xent between the two embeddings over the global batch. Records, for the
  non-finite guard's test, both encoders' BatchNorm statistics before each step and at
  ``after_step(out, ok)``.
- ``TwoStages``: stage 1 trains the encoder with ``train.*``'s SGD; stage 2 freezes it and
  trains a head with Adam on its own cosine schedule (like ISL's GAN stage).

A new method is one such module: its config dataclass, its class, one `register` call.
These register only when a test asks (`register_toys`), so the shipped registry is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastinst.methods import _REGISTRY, available, register
from fastinst.methods.base import Method, Stage, unwrap
from fastinst.train.schedule import LRSchedule
from fastinst.methods.simclr.ntxent import nt_xent


@dataclass(frozen=True, kw_only=True)
class TwoEncodersConfig:
    T: float = 0.5


class TwoEncoders(Method):
    Config = TwoEncodersConfig
    needs_views, views_are = 2, "one view per encoder"

    def __init__(self, encoder: nn.Module, other: nn.Module, T: float):
        super().__init__(encoder=encoder, other=other)
        self.T = T
        self.bn_before, self.bn_events = None, []  # (hook, both encoders' BN equal to before)

    @classmethod
    def from_config(cls, c, encoder, ctx):
        return cls(encoder, ctx.build_encoder(name="other"), c.T)

    def _bn(self):
        return [b.clone() for n in ("encoder", "other") for b in unwrap(self.nets[n]).buffers()
                if b.is_floating_point()]

    def before_step(self, step: int) -> None:
        self.bn_before = self._bn()

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["views"]
        za, zb = self.nets["encoder"](x1), self.nets["other"](x2)  # [B, D] each
        return {"loss": nt_xent([za, zb], self.T)}

    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        """Records (ok, BN statistics equal to the ones before the step); host reads: a test."""
        now = self._bn()
        self.bn_events.append((bool(ok), all(torch.equal(a, b) for a, b in zip(now, self.bn_before))))


@dataclass(frozen=True, kw_only=True)
class TwoStagesConfig:
    head_lr: float = 0.01
    head_passes: float = 1.0


class TwoStages(Method):
    """Stage 'backbone': the encoder (SGD, train.* schedule) on NT-Xent between two views.
    Stage 'head': the encoder frozen; a head trained with Adam on its own cosine schedule to
    pull the head's outputs of the two views together."""

    Config = TwoStagesConfig
    needs_views, views_are = 2, "a positive pair"

    def __init__(self, encoder: nn.Module, head: nn.Module, head_lr: float, head_passes: float):
        super().__init__(encoder=encoder, head=head)
        self.head_lr, self.head_passes = head_lr, head_passes

    @classmethod
    def from_config(cls, c, encoder, ctx):
        torch.manual_seed(ctx.seed + 1)
        head = nn.Sequential(nn.Linear(ctx.embed_dim, 32), nn.ReLU(), nn.Linear(32, 8))
        return cls(encoder, head, c.head_lr, c.head_passes)

    def head_schedule(self, steps_per_epoch: int) -> LRSchedule:
        return LRSchedule(base=self.head_lr, steps_per_epoch=steps_per_epoch, epochs=self.head_passes, kind="cosine")

    def optimizers(self, make):
        return {"model": make.default(self.nets["encoder"].parameters()),
                "head": make.adam(self.nets["head"].parameters(), self.head_lr,
                                  schedule=self.head_schedule(make.schedule.steps_per_epoch))}

    def stages(self, passes, optimizer_names):
        return [Stage("backbone", passes, ("encoder",), ("model",)),
                Stage("head", self.head_passes, ("head",), ("head",), step=self.head_step)]

    def forward(self, batch: dict) -> dict:
        z1, z2 = (self.nets["encoder"](v) for v in batch["views"])
        return {"loss": nt_xent([z1, z2], 0.5)}

    @staticmethod
    def head_step(method: "TwoStages", batch: dict, backward) -> dict:
        with torch.no_grad():  # the frozen encoder
            z1, z2 = (method.nets["encoder"](v) for v in batch["views"])
        h1, h2 = method.nets["head"](z1), method.nets["head"](z2)
        loss = (1 - F.cosine_similarity(h1, h2, dim=1)).mean()
        backward(loss, ["head"])
        return {"loss": loss}


TOYS = {"toy2enc": TwoEncoders, "toy2stage": TwoStages}


def register_toys(monkeypatch=None) -> None:
    """Register the toys: through ``monkeypatch`` (undone after the test) or for good (a worker),
    after the shipped methods (which keep their registration order and the default)."""
    available()
    for name, cls in TOYS.items():
        if monkeypatch is not None:
            monkeypatch.setitem(_REGISTRY, name, cls)
        else:
            register(name)(cls)
