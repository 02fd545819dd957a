"""The frozen pretrained trunk(s) the evaluation protocols read, and their features.

`build_frozen_backbone` loads the trunk(s) a checkpoint's method named for probing (CMC: L and
ab) without running any code in the file (fastinst/eval/export.py reads it), frozen: eval
mode, so BatchNorm uses its running statistics, and no gradients; ``"random"`` is the
untrained encoder, a baseline for the same protocol. `frozen_features` gives the globally
pooled features or each ResNet stage's map pooled to MMSelfSup's sizes, what the linear
probe's heads (fastinst/eval/linear.py) and the SVMs (fastinst/eval/svm.py) read.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..core.model import autocast_context, build_model
from ..core.runtime import DistEnv
from .export import FrozenTrunks, load_trunk, load_trunks, trunk_spec

RANDOM_INIT = "random"  # the checkpoint name of the untrained encoder (a baseline)


def build_frozen_backbone(cfg: Config, checkpoint: str, env: DistEnv) -> Tuple[nn.Module, str, int]:
    """The pretrained trunk(s) the method's ``probe_trunks`` named (CMC: L and ab, whose pooled
    features are concatenated) on ``env.device``, frozen (eval mode, no gradients).
    ``checkpoint="random"``: the encoder ``model.*`` builds at ``seed`` (the training run's step
    0, BN statistics at their initial values), a baseline for the same protocol."""
    m = cfg.model
    if checkpoint == RANDOM_INIT:
        from ..train.build import build_encoder

        net = build_encoder(dataclasses.replace(cfg, model=dataclasses.replace(m, compile=False)), env)
        return net.to(env.device).eval().requires_grad_(False), RANDOM_INIT, 0
    trunks, saved, step, path = load_trunks(checkpoint)
    spec = trunk_spec(cfg, saved, path)
    nets = []
    for _, state, channels in trunks:
        net = build_model(spec["arch"], stem=spec["stem"], width=spec["width"], embed_dim=m.embed_dim,
                          head=m.head, hidden_dim=m.hidden_dim, in_channels=3 if channels is None else
                          channels[1] - channels[0], channels_last=m.channels_last and env.device.type == "cuda")
        load_trunk(net, state, path)
        nets.append(net)
    model = nets[0] if len(nets) == 1 and trunks[0][2] is None else FrozenTrunks(nets, [c for _, _, c in trunks])
    model = model.to(env.device).eval().requires_grad_(False)
    if m.compile:
        model.compile()
    return model, path, step


@torch.no_grad()
def frozen_features(backbone: nn.Module, x: torch.Tensor, names, amp: str) -> Dict[str, torch.Tensor]:
    """The frozen trunk's features named ``names``, fp32 (AMP inside the trunk only):
    ``avgpool`` [B, feature_dim] (the global pool), ``feat<k>`` [B, C_k, s_k, s_k] (stage k's
    map, adaptive-pooled as the trunk's ``stage_pool`` says: ResNet averages to MMSelfSup's sizes,
    AlexNet max-pools to CMC's). The linear probe's heads and the SVMs read them."""
    if amp == "off" and x.dtype != torch.float32:
        x = x.float()  # loader.fp16 views without autocast
    stages = [int(n[len("feat"):]) for n in names if n != "avgpool"]
    out = {}
    with autocast_context(x.device.type, amp):
        if "avgpool" in names:
            out["avgpool"] = backbone.backbone_features(x).float()
        if stages:
            pools = backbone.stage_pool()
            for s, m in backbone.stage_maps(x, stages).items():
                side, kind = pools[s]
                pool = F.adaptive_max_pool2d if kind == "max" else F.adaptive_avg_pool2d
                out[f"feat{s}"] = pool(m.float(), side)
    return out
