"""The method protocol: the hooks the engine calls, identically, for every method.

The engine's step (fastinst/engine.py ``_train_loop``) is, for any method::

    method.before_step(step, lr)            # per-step schedules / seeds (after the lr is set)
    out = method(batch)                      # dict(loss=global-batch loss, ...)
    if finite(out["loss"]):
        out["loss"].backward(); step the model optimiser and every ``extra_optimizers``
    method.after_step(out)                   # @no_grad state updates, only for a finite loss

plus, outside the step: ``extra_optimizers(lr)`` once at build time (their state is
checkpointed by the engine, their lr follows the same schedule), ``flush()`` before a
checkpoint or an evaluation reads lazily-updated state, ``train_features()`` for kNN, and
``state_dict()`` / ``load_state_dict()`` for everything resumable the method owns (never the
model's weights: the engine saves those). The defaults here are the no-op versions, so a
method overrides only what it uses.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import ConfigError


class Method(nn.Module):
    """Base class of every registered method (see the module docstring for the protocol)."""

    # Views per image the method needs from the loader (None: any number), and what they are.
    needs_views: Optional[int] = None
    views_are: str = ""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Start-up checks of the rest of the config that this method depends on (called while
        the config is built, so a bad combination fails before anything runs)."""
        if cls.needs_views is not None and cfg.aug.num_views != cls.needs_views:
            raise ConfigError(
                f"config key 'aug.crops': method.name={cfg.method.name} needs exactly {cls.needs_views} views per "
                f"image ({cls.views_are}), got {cfg.aug.num_views}; use "
                f"aug.crops=[{{count: {cls.needs_views}, size: 224, scale: [0.2, 1.0]}}]")

    @classmethod
    def from_config(cls, cfg, model, num_samples: int, ranks, *, labels=None, device=None) -> "Method":
        raise NotImplementedError

    def extra_optimizers(self, lr: float) -> List[torch.optim.Optimizer]:
        """Optimisers for parameters the method owns outside the (DDP) model, e.g. PIC's
        sharded classifier with its LazySGD. The engine sets their lr every step, zeroes,
        steps (through the grad scaler) and checkpoints them with the model's optimiser."""
        return []

    def before_step(self, step: int, lr: float) -> None:
        """Called before ``forward`` with the global step and its learning rate."""

    def after_step(self, out: dict) -> bool:
        """``@torch.no_grad`` updates after the optimiser step; skip them when the loss is
        non-finite. Returns whether they were applied."""
        return bool(torch.isfinite(out["loss"]))  # host sync (the engine already synced on it)

    def flush(self) -> None:
        """Bring lazily-updated state up to date (before a checkpoint or an evaluation)."""

    def train_features(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(features [rows_local, D], labels [rows_local]) of this rank's training rows for
        kNN without a recompute pass, or None (the engine then recomputes)."""
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_row_layout(cfg, model, num_samples: int, ranks, *, key: str, k: int, rows: str, fix: str,
                     sharded: str) -> None:
    """Start-up invariants of a method with one row per training image, sharded by rank (NPID's
    bank, PIC's classifier), checked when the rows are built, not mid-run: the ``k`` rows that
    config key ``key`` samples per step fit in N, every rank owns a row, and the rows have the
    model's embedding size."""
    if k >= num_samples:
        raise ConfigError(f"config key '{key}': K={k} {rows} needs a training set larger than K, but "
                          f"{cfg.data.path}:{cfg.data.train_split} has N={num_samples}; {fix}")
    if num_samples < ranks.world:
        raise ConfigError(f"N={num_samples} training images is less than the {ranks.world} ranks that shard "
                          f"{sharded}; use fewer processes")
    if cfg.model.embed_dim != getattr(unwrap(model), "embed_dim", cfg.model.embed_dim):
        raise ConfigError("config key 'model.embed_dim': differs from the model's embedding size")


def embed_views(model: nn.Module, views: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Embeddings of each view, in the views' order: views of equal shape go through the model
    in one call (one BN batch over them, as SimCLR's 2N batch; one forward per crop size)."""
    groups: Dict[tuple, List[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[1:]), []).append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(views)
    for idx in groups.values():
        x = views[idx[0]] if len(idx) == 1 else torch.cat([views[i] for i in idx])  # [n*B, 3, H, W]
        z = model(x)  # [n*B, D]
        for i, zi in zip(idx, z.chunk(len(idx))):
            out[i] = zi  # [B, D]
    return out  # type: ignore[return-value]
