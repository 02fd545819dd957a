"""The method protocol: a method is the trainable unit, and declares what the engine trains.

- ``trained_modules()``: the named modules (encoders, heads, generators) the engine moves to
  the device, wraps in DDP, checkpoints, and whose BatchNorm statistics it restores after a
  skipped step. They are held in ``self.nets``, a plain dict, so this nn.Module's own
  ``state_dict`` is the method's state (banks, queues, key encoders, noise RNG) and nothing
  the engine saves twice. (The name is not ``modules()``: nn.Module has that one.)
- ``optimizers(make)``: named (optimiser, lr schedule) pairs; each optimiser's lr follows its
  own schedule. The default is ``train.optimizer`` (SGD or LARS) over every trained module.
- ``stages(passes, optimizer_names)``: the ordered stages of a run, each with a length in
  passes over the data, the modules it trains (the others are frozen: eval mode, no
  gradients), the optimisers it steps and its own step. The default is one stage that trains
  everything with ``forward`` + one backward (`default_step`).
- per step: ``before_step(step)``, then the stage's step, then ``after_step(out, ok)`` (bank,
  queue and key-encoder updates). ``ok`` is a 0-dim bool tensor on the device: the step's
  losses were finite. Every update must be gated on it on the device (``torch.where``,
  `fastinst.core.guard.where_`, row index −1), never read on the host: the engine does not sync
  per step (fastinst/core/guard.py);
- between loader epochs: ``stage_start(stage)``, ``stage_done(stage)`` (a stage that ends early:
  ISL's GAN patience, its mining target) and ``end_epoch(stage, last)`` (per-epoch bookkeeping,
  values to log);
- outside the step: ``flush()`` before a checkpoint or an evaluation reads lazily-updated
  state, ``train_features()`` / ``knn_embed()`` for kNN, ``check_config(cfg)`` at config load.

A method's config dataclass is its ``Config`` (the ``method.<name>`` section); it is built with
``from_config(config, encoder, ctx)``: its own section, the encoder the engine built from
``model.*``, and a `BuildContext` with the few run facts a method may need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import ConfigError
from ..core.runtime import DistEnv


@dataclass(frozen=True)
class BuildContext:
    """Facts of the run a method is built for (besides its own config section)."""

    env: DistEnv
    num_samples: int  # N, training images (rows of banks / classifiers)
    labels: Optional[torch.Tensor]  # [N] train labels, for kNN on method rows (never trained on)
    seed: int
    global_batch: int  # loader.batch_size x world
    view_groups: Tuple[int, ...]  # views per crop group of aug.crops (PIC: group 0 = large crops)
    embed_dim: int  # model.embed_dim
    dataset: str  # "<data.path>:<train split>", for messages
    build_encoder: Callable[..., nn.Module]  # another encoder from model.* (kwargs override it)


@dataclass(frozen=True)
class Stage:
    """One stage of a run. ``step(batch, backward) -> out`` runs a training step and calls
    ``backward(loss, optimizer_names=None)`` for each loss to apply (the engine scales and
    applies it, and steps those optimisers, by default all of the stage's, where the loss and
    every earlier one of the step are finite; it returns that flag as a 0-dim bool tensor,
    to gate on, not to read on the host); None: the
    default step. Modules the stage does not train must be called under torch.no_grad()."""

    name: str
    passes: float
    trains: Tuple[str, ...]
    optimizers: Tuple[str, ...]
    step: Optional[Callable] = None


Backward = Callable[..., torch.Tensor]  # backward(loss, names=None) -> ok (0-dim bool)


class Method(nn.Module):
    """Base class of every registered method (see the module docstring for the protocol)."""

    Config = None  # the method's config dataclass: config section method.<name>
    # Views per image the method needs from the loader (None: any number), and what they are.
    needs_views: Optional[int] = None
    views_are: str = ""

    def __init__(self, **nets: nn.Module):
        super().__init__()
        self.nets: Dict[str, nn.Module] = dict(nets)  # plain dict: not submodules (see above)

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
    def from_config(cls, config, encoder: nn.Module, ctx: BuildContext) -> "Method":
        raise NotImplementedError

    # ---- what the engine trains ---------------------------------------------------------------
    def trained_modules(self) -> Dict[str, nn.Module]:
        return self.nets

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace every trained module by ``fn(module)`` (the engine: device, then DDP)."""
        self.nets = {name: fn(m) for name, m in self.nets.items()}

    def optimizers(self, make) -> Dict[str, Tuple[torch.optim.Optimizer, Callable[[int], float]]]:
        params = [p for m in self.nets.values() for p in m.parameters() if p.requires_grad]
        return {"model": make.default(params)}

    def stages(self, passes: float, optimizer_names: Sequence[str]) -> List[Stage]:
        return [Stage("train", passes, tuple(self.nets), tuple(optimizer_names))]

    # ---- the step ------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        """Called before the step with the global step (per-step seeds)."""

    def after_step(self, out: dict, ok: torch.Tensor) -> None:
        """``@torch.no_grad`` state updates after the optimisers' (gated) steps, applied only
        where the 0-dim bool tensor ``ok`` holds; where it does not, leave the method's state
        (including what the forward changed) as it was before the step."""

    # ---- stage and epoch boundaries (host side, outside the step; the same on every rank) --------
    def stage_start(self, stage: Stage) -> None:
        """Called when ``stage`` starts (at its first loader epoch, not on a resume inside it)."""

    def stage_done(self, stage: Stage) -> bool:
        """Before each loader epoch of ``stage``: True ends the stage now (its remaining epochs are
        skipped, no data is read). Must agree on every rank (decide from all-reduced values)."""
        return False

    def end_epoch(self, stage: Stage, last: bool) -> Dict[str, float]:
        """After each whole loader epoch of ``stage`` (``last``: its final one), before any
        evaluation or checkpoint: per-epoch bookkeeping (may read the device and use
        collectives). Returns values the engine logs to metrics.jsonl (kind "method"), or {}."""
        return {}

    # ---- evaluation and state ------------------------------------------------------------------
    def flush(self) -> None:
        """Bring lazily-updated state up to date (before a checkpoint or an evaluation)."""

    def train_features(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(features [rows_local, D], labels [rows_local]) of this rank's training rows for
        kNN without a recompute pass, or None (the engine then recomputes)."""
        return None

    @property
    def primary(self) -> str:
        """The primary trained module's name: ``encoder``, else the first (a checkpoint's
        ``model``, what kNN, probes and exports of one-trunk methods read)."""
        return "encoder" if "encoder" in self.nets else next(iter(self.nets))

    def probe_trunks(self) -> List[Tuple[str, Optional[Tuple[int, int]]]]:
        """The trunks a linear probe reads, in order, each with the slice of input channels it
        takes (None: all): the probe's features are their pooled features concatenated."""
        return [(self.primary, None)]

    def knn_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding kNN evaluation uses: the encoder's (outside DDP)."""
        return unwrap(self.nets["encoder"])(x)


def default_step(method: Method, batch: dict, backward: Backward) -> dict:
    """Forward the batch, one backward of its loss through every optimiser of the stage."""
    out = method(batch)
    backward(out["loss"])
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_row_layout(ctx: BuildContext, *, key: str, k: int, rows: str, fix: str, sharded: str) -> None:
    """Start-up invariants of a method with one row per training image, sharded by rank (NPID's
    bank, PIC's classifier), checked when the rows are built, not mid-run: the ``k`` rows that
    config key ``key`` samples per step fit in N, and every rank owns a row."""
    if k >= ctx.num_samples:
        raise ConfigError(f"config key '{key}': K={k} {rows} needs a training set larger than K, but "
                          f"{ctx.dataset} has N={ctx.num_samples}; {fix}")
    if ctx.num_samples < ctx.env.world:
        raise ConfigError(f"N={ctx.num_samples} training images is less than the {ctx.env.world} ranks that "
                          f"shard {sharded}; use fewer processes")


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
