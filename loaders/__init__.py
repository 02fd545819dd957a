"""Data path: sources (zip / folder / RAM cache), resumable samplers, DALI and torch pipelines.

``build_loader(cfg, split)`` is the one entry point the engine uses; it returns an iterable of
``{"views": [...], "index": LongTensor, "label": LongTensor}`` with ``len()`` and
``state_dict()/load_state_dict()``. Only the ``loaders.dali_*`` modules (the pipeline, its graph
functions, RandAugment's ops) import ``nvidia.dali``.
"""
from __future__ import annotations

from typing import Optional

from fastinst.core.runtime import DistEnv

from .sources import DataError, Source, open_source  # noqa: F401  (public API)


def build_source(cfg, split: str, env: DistEnv) -> Source:
    from .cache import CachedSource

    src = open_source(cfg.data.path, split, on_error=cfg.data.on_error, num_classes=cfg.data.num_classes,
                      classes=cfg.data.classes)
    if cfg.data.cache != "none":
        src = CachedSource(src, cfg.data.cache, rank=env.rank, world=env.world,
                           local_rank=env.local_rank, cache_dir=cfg.data.cache_dir)
    return src


def build_loader(cfg, split: str = "train", *, mode: Optional[str] = None, env: Optional[DistEnv] = None,
                 source: Optional[Source] = None, backend: Optional[str] = None):
    """Loader for ``split`` on ``env`` (its ranks and device; torchrun's variables when None).
    mode 'train' cuts the configured views; 'eval' the eval transform over every sample of this
    rank's shard exactly once, in order (no shuffle, no drop)."""
    from .samplers import build_sampler

    env = env or DistEnv.from_env()
    mode = mode or ("train" if split == cfg.data.train_split else "eval")
    source = source or build_source(cfg, split, env)
    # a 'part' RAM cache holds only rows i % world == rank: sample only those
    ownership = "local" if cfg.data.cache == "part" else "global"
    if mode == "train":
        sampler = build_sampler(cfg.sampler, len(source), rank=env.rank, world=env.world,
                                ownership=ownership)
        drop_last = cfg.loader.drop_last
    else:
        from .samplers import EpochSampler

        sampler = EpochSampler(len(source), rank=env.rank, world=env.world, shuffle=False,
                               ownership="local")
        drop_last = False
    lc = cfg.loader
    backend = backend or lc.backend
    common = dict(aug=cfg.aug, batch_size=lc.batch_size, mode=mode, num_workers=lc.num_workers,
                  prefetch=lc.prefetch, channels_last=lc.channels_last, fp16=lc.fp16, drop_last=drop_last,
                  on_error=cfg.data.on_error, seed=cfg.seed, rank=env.rank, local_world=env.local_world)
    if backend == "dali":
        from .dali_backend import DaliLoader

        return DaliLoader(source, sampler, device=lc.device, device_id=env.device_id, num_threads=lc.num_threads,
                          hw_decoder_load=lc.hw_decoder_load, **common)
    from .torch_backend import TorchLoader

    return TorchLoader(source, sampler, device=lc.device, **common)
