"""Pretrained weights of a fastinst training checkpoint, and the backbone export.

`load_pretrained` finds a complete checkpoint (a ckpt_* directory or a run directory) and
returns its primary module's state (``"model"``, the same on every rank under DDP) with the
trunk spec (arch / stem / width) from the checkpoint's own config; `export_backbone` writes the
trunk as a plain torchvision ResNet state_dict (``launch.py export``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from .checkpoint import CheckpointError, _atomic_write, find_latest_complete, load_checkpoint, saved_world_size
from .config import Config, ConfigError
from .model import EmbeddingNet

__all__ = ["resolve_pretrained", "load_pretrained", "trunk_spec", "load_trunk", "export_backbone"]

# Architecture keys a checkpoint's trunk depends on (the head is never used here).
_TRUNK_KEYS = ("arch", "stem", "width")
# A saved config from before a key existed: the value that key's absence meant.
_TRUNK_DEFAULTS = {"width": 1.0}


# --------------------------------------------------------------------------- pretrained weights


def resolve_pretrained(path: str) -> str:
    """A complete checkpoint directory from ``path``: a ckpt_* directory itself, or the newest
    complete one in ``path`` or in ``path``/checkpoints (a run directory)."""
    if os.path.isfile(os.path.join(path, "COMPLETE")):
        return path
    for d in (path, os.path.join(path, "checkpoints")):
        found = find_latest_complete(d)
        if found is not None:
            return found
    raise CheckpointError(f"no complete fastinst checkpoint at {path}: pass a ckpt_* directory with a "
                          "COMPLETE marker, or a run directory holding checkpoints/")


def load_pretrained(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict], int, str]:
    """(model state, saved config dict or None, step, resolved path) of a fastinst checkpoint.
    The model is the same on every rank (DDP), so rank 0's file serves any world size."""
    path = resolve_pretrained(path)
    payload = load_checkpoint(path, rank=0, world_size=saved_world_size(path), map_location="cpu")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'model' state; is it a fastinst training checkpoint?")
    return payload["model"], payload.get("config"), int(payload.get("step", -1)), path


def trunk_spec(cfg: Optional[Config], saved: Optional[dict], path: str) -> Dict[str, Any]:
    """arch/stem/width of the trunk: the checkpoint's own config, checked against ``cfg.model``."""
    saved_model = (saved or {}).get("model") or {}
    spec = {}
    for k in _TRUNK_KEYS:
        mine = getattr(cfg.model, k) if cfg is not None else None
        theirs = saved_model.get(k, _TRUNK_DEFAULTS.get(k) if saved_model else None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(f"config key 'model.{k}': checkpoint {path} was trained with model.{k}={theirs} "
                              f"but the config says {mine}; pass model.{k}={theirs} (or the pretraining config)")
        spec[k] = theirs if theirs is not None else mine
        if spec[k] is None:
            raise CheckpointError(f"checkpoint {path} saved no config; pass --config with its model.{k}")
    return spec


def load_trunk(model: EmbeddingNet, state: Dict[str, torch.Tensor], path: str) -> None:
    """Copy the ``backbone.*`` entries of a saved EmbeddingNet state into ``model.backbone``."""
    trunk = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not trunk:
        raise CheckpointError(f"checkpoint {path}: model state has no 'backbone.*' weights")
    try:
        model.backbone.load_state_dict(trunk, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: trunk weights do not fit "
                              f"model.arch/model.stem/model.width: {e}") from e


def export_backbone(checkpoint: str, out_file: str, cfg: Optional[Config] = None) -> Dict[str, Any]:
    """Write the trunk of ``checkpoint`` as a torchvision ResNet state_dict to ``out_file``
    (atomically). ``torchvision.models.<arch>().load_state_dict(sd, strict=False)`` then
    misses exactly fc.weight / fc.bias; a 'small' stem's conv1 is 3x3 (see fastinst/model.py)."""
    state, saved, step, path = load_pretrained(checkpoint)
    spec = trunk_spec(cfg, saved, path)
    model = EmbeddingNet(spec["arch"], stem=spec["stem"], width=spec["width"])
    load_trunk(model, state, path)
    sd = model.export_backbone_state_dict()
    out_dir = os.path.dirname(os.path.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.abspath(out_file), lambda f: torch.save(sd, f))
    return {"file": out_file, "checkpoint": path, "step": step, **spec, "feature_dim": model.feature_dim,
            "tensors": len(sd)}


