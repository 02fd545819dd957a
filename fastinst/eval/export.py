"""Pretrained weights of a fastinst training checkpoint, and the backbone export.

`load_pretrained` finds a complete checkpoint (a ckpt_* directory or a run directory) and
returns its primary module's state (``"model"``, the same on every rank under DDP) with the
trunk spec (arch / stem / width) from the checkpoint's own config; `export_backbone` writes the
trunk as a plain torchvision ResNet state_dict (``launch.py export``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import Config, ConfigError
from ..core.model import ALEXNETS, EmbeddingNet
from ..train.checkpoint import CheckpointError, _atomic_write, find_latest_complete, load_checkpoint, saved_world_size

__all__ = ["resolve_pretrained", "load_pretrained", "load_trunks", "trunk_spec", "load_trunk", "export_backbone",
           "FrozenTrunks", "FORMATS", "detectron2_key", "write_format"]

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


def _rank0_payload(path: str) -> Tuple[dict, str]:
    """(rank 0's payload, resolved path): the modules are the same on every rank (DDP), so rank
    0's file serves any world size."""
    path = resolve_pretrained(path)
    payload = load_checkpoint(path, rank=0, world_size=saved_world_size(path), map_location="cpu")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'model' state; is it a fastinst training checkpoint?")
    return payload, path


def load_pretrained(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict], int, str]:
    """(model state, saved config dict or None, step, resolved path) of a fastinst checkpoint."""
    payload, path = _rank0_payload(path)
    return payload["model"], payload.get("config"), int(payload.get("step", -1)), path


def load_trunks(path: str) -> Tuple[List[Tuple[str, Dict[str, torch.Tensor], Optional[Tuple[int, int]]]],
                                     Optional[dict], int, str]:
    """([(module name, state, input-channel slice or None)], saved config, step, path): the
    trunks the method named in ``probe_trunks`` (one for most methods; CMC's L and ab), from
    the checkpoint's per-module states; a checkpoint without the list: its primary module."""
    payload, path = _rank0_payload(path)
    named = payload.get("probe_trunks")
    if not named:
        return [("encoder", payload["model"], None)], payload.get("config"), int(payload.get("step", -1)), path
    trunks = []
    for name, channels in named:
        if name not in (payload.get("modules") or {}):
            raise CheckpointError(f"checkpoint {path}: probe trunk {name!r} is not among its modules "
                                  f"{sorted(payload.get('modules') or {})}")
        trunks.append((name, payload["modules"][name], None if channels is None else tuple(channels)))
    return trunks, payload.get("config"), int(payload.get("step", -1)), path


class FrozenTrunks(nn.Module):
    """Trunks side by side, each on its slice of the input channels: ``backbone_features`` is
    their pooled features concatenated (CMC's probe reads L's and ab's; one trunk: its own)."""

    def __init__(self, nets: List[EmbeddingNet], channels: List[Optional[Tuple[int, int]]]):
        super().__init__()
        self.nets, self.channels = nn.ModuleList(nets), list(channels)
        self.feature_dim = sum(n.feature_dim for n in nets)

    def _views(self, x: torch.Tensor):
        return [x if c is None else x[:, c[0]:c[1]] for c in self.channels]

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([n.backbone_features(v) for n, v in zip(self.nets, self._views(x))], 1)  # [B, sum]

    def stage_maps(self, x: torch.Tensor, stages) -> Dict[int, torch.Tensor]:
        """Each stage's maps of every trunk, concatenated along channels."""
        maps = [n.stage_maps(v, stages) for n, v in zip(self.nets, self._views(x))]
        return {s: torch.cat([m[s] for m in maps], 1) for s in maps[0]}

    def stage_channels(self) -> Dict[int, int]:
        return {s: sum(n.stage_channels()[s] for n in self.nets) for s in range(1, 6)}

    def stage_pool(self) -> Dict[int, Tuple[int, str]]:
        return self.nets[0].stage_pool()  # the trunks are of one architecture


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


# --------------------------------------------------------------------------- export formats

FORMATS = ("torchvision", "detectron2", "mmdet", "timm")
_EXT = {"torchvision": ".pth", "detectron2": ".pkl", "mmdet": ".pth", "timm": ".pth"}


def detectron2_key(key: str) -> str:
    """A torchvision ResNet key under detectron2's ResNet names (what its
    ``tools/convert-torchvision-to-d2.py`` produces): the stem's conv1 / bn1 under ``stem.``,
    layer1..4 -> res2..res5, bnN -> convN.norm, downsample.0 / .1 -> shortcut / shortcut.norm."""
    if not key.startswith("layer"):
        key = "stem." + key
    for t in range(1, 5):
        key = key.replace(f"layer{t}.", f"res{t + 1}.")
    for t in range(1, 4):
        key = key.replace(f"bn{t}.", f"conv{t}.norm.")
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def write_format(sd: Dict[str, torch.Tensor], target: str, fmt: str) -> None:
    """Write a torchvision-named trunk state_dict in ``fmt`` (atomically):

    - torchvision / timm: the state_dict itself (timm's ResNets use torchvision's key names;
      load with ``timm.create_model(arch, num_classes=0)`` and ``strict=True``);
    - mmdet: ``{"state_dict": sd, "meta": {...}}`` (mmcv's checkpoint loader reads
      ``state_dict``; MMDetection's ``init_cfg=dict(type="Pretrained", checkpoint=...)``);
    - detectron2: a pickle ``{"model": {d2 name: numpy array}, "__author__": "fastinst",
      "matching_heuristics": True}`` (``MODEL.WEIGHTS``; RGB input with torchvision's
      mean / std in 0-255 units and ``RESNETS.STRIDE_IN_1X1: False``)."""
    import pickle

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {list(FORMATS)}")
    if fmt == "detectron2":
        obj = {"model": {detectron2_key(k): v.numpy() for k, v in sd.items()}, "__author__": "fastinst",
               "matching_heuristics": True}
        _atomic_write(target, lambda f: pickle.dump(obj, f))
        return
    obj = {"state_dict": sd, "meta": {"author": "fastinst"}} if fmt == "mmdet" else sd
    _atomic_write(target, lambda f: torch.save(obj, f))


def export_backbone(checkpoint: str, out_file: str, cfg: Optional[Config] = None,
                    fmt: str = "torchvision") -> Dict[str, Any]:
    """Write the trunk of ``checkpoint`` as a torchvision ResNet state_dict to ``out_file``
    (atomically). ``torchvision.models.<arch>().load_state_dict(sd, strict=False)`` then
    misses exactly fc.weight / fc.bias; a 'small' stem's conv1 is 3x3 (see fastinst/core/model.py).
    Several trunks (CMC): one file each, ``<out_file stem>.<name><suffix>``; their conv1 takes
    1 or 2 channels, so torchvision's ResNet needs ``conv1`` replaced by
    ``nn.Conv2d(C, 64, 7, 2, 3, bias=False)`` first (C = the trunk's ``in_channels``).
    ``fmt``: torchvision, detectron2, mmdet or timm (`write_format`)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {list(FORMATS)}")
    trunks, saved, step, path = load_trunks(checkpoint)
    spec = trunk_spec(cfg, saved, path)
    if spec["arch"] in ALEXNETS and fmt != "torchvision":
        raise ConfigError(f"export --format {fmt}: {fmt} has no AlexNet with BatchNorm; a {spec['arch']} trunk "
                          "exports with --format torchvision (fastinst's AlexNet keys, for "
                          "fastinst.core.alexnet.AlexNetTrunk)")
    files = []
    for name, state, channels in trunks:
        c = 3 if channels is None else channels[1] - channels[0]
        model = EmbeddingNet(spec["arch"], stem=spec["stem"], width=spec["width"], in_channels=c)
        load_trunk(model, state, path)
        sd = model.export_backbone_state_dict()
        stem, ext = os.path.splitext(os.path.abspath(out_file))
        target = os.path.abspath(out_file) if len(trunks) == 1 else f"{stem}.{name}{ext or _EXT[fmt]}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_format(sd, target, fmt)
        files.append({"name": name, "file": target, "in_channels": c, "feature_dim": model.feature_dim,
                      "tensors": len(sd)})
    one = files[0]
    return {"file": one["file"] if len(files) == 1 else [f["file"] for f in files], "checkpoint": path,
            "step": step, "format": fmt, **spec, "feature_dim": sum(f["feature_dim"] for f in files),
            "tensors": sum(f["tensors"] for f in files), "trunks": files}


