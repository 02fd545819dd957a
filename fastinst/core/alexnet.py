"""AlexNet trunks of the seeds, with BatchNorm after every convolution and fully connected layer:

- ``alexnet_half`` (CMC, HobbitLong/CMC models/alexnet.py ``alexnet_half``): half of AlexNet's
  widths (48, 128, 192, 192, 128 channels; fc6 / fc7 of 2048), convolutions without bias, for
  one colour channel group (CMC trains one on L and one on ab: two ``in_channels`` 1 and 2);
- ``alexnet`` with the ``imagenet`` stem (ISL, ZiweiWangTHU/ISL models/alexnet.py
  ``ImageNetAlexNet``): 64, 192, 384, 256, 256 channels, 11x11/4 then 5x5 then 3x3 convolutions,
  3x3/2 max-pools after blocks 1, 2 and 5, fc of 4096;
- ``alexnet`` with the ``small`` stem (ISL's ``CIFARAlexNet``, 32 px): the same widths, 3x3/1
  convolutions, 2x2/2 max-pools after blocks 1, 2 and 5, fc of 1024.

The trunk ends after fc7 (the seeds' fc2): its output is the pooled feature the probes read, and
the embedding head (``model.head=linear``: the seeds' fc8 / projection) maps it to ``embed_dim``.
Before fc6 the last map is adaptive-average-pooled to the seeds' fixed size (6 x 6 at 224 px, 4 x 4
at 32 px), a no-op at the seeds' input sizes that lets other sizes run. The five conv blocks are
the stages of per-stage probes (`stage_maps`, each block's output after its pool, as CMC's
``compute_feat``), pooled as CMC's LinearClassifierAlexNet does (adaptive max-pool to 10, 6, 5,
5, 6 px).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

_SPECS = {  # (channels per block, (kernel, stride, padding) per block, pool, fc width, last map side, conv bias)
    "half": ((48, 128, 192, 192, 128), ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)), (3, 2), 2048, 6,
             False),
    "imagenet": ((64, 192, 384, 256, 256), ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)), (3, 2), 4096, 6,
                 True),
    "small": ((64, 192, 384, 256, 256), ((3, 1, 1),) * 5, (2, 2), 1024, 4, True),
}
POOLED_BLOCKS = (1, 2, 5)


def run_stages(x: Tensor, blocks: Sequence[Tuple[int, nn.Module]], stages, out: Dict[int, Tensor]) -> Dict[int, Tensor]:
    """Run ``blocks`` ([(stage, module)] in order) on ``x`` until the last stage asked for,
    adding each asked stage's output to ``out`` (a trunk's per-stage maps, ResNet's and AlexNet's)."""
    for k, block in blocks:
        if all(s < k for s in stages):
            break
        x = block(x)
        if k in stages:
            out[k] = x
    return out
STAGE_POOL = {1: (10, "max"), 2: (6, "max"), 3: (5, "max"), 4: (5, "max"), 5: (6, "max")}  # CMC's probe


class AlexNetTrunk(nn.Module):
    """Conv blocks ``block1..5`` (conv, BN, ReLU[, max-pool]) -> adaptive pool -> flatten ->
    ``fc6``, ``fc7`` (Linear, BN, ReLU): [B, C, H, W] -> [B, feature_dim]."""

    def __init__(self, variant: str, in_channels: int = 3):
        super().__init__()
        if variant not in _SPECS:
            raise ValueError(f"AlexNet variant {variant!r}: choose one of {sorted(_SPECS)}")
        widths, convs, (pk, ps), fc, side, bias = _SPECS[variant]
        self.variant, self.in_channels = variant, in_channels
        c_in = in_channels
        for k, (c, (kernel, stride, pad)) in enumerate(zip(widths, convs), 1):
            layers = [nn.Conv2d(c_in, c, kernel, stride, pad, bias=bias), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if k in POOLED_BLOCKS:
                layers.append(nn.MaxPool2d(pk, ps))
            setattr(self, f"block{k}", nn.Sequential(*layers))
            c_in = c
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.fc6 = nn.Sequential(nn.Linear(c_in * side * side, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(fc, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True))
        self.feature_dim = fc
        self.widths = widths

    def stage_channels(self) -> Dict[int, int]:
        return {k: c for k, c in enumerate(self.widths, 1)}

    def stage_pool(self) -> Dict[int, Tuple[int, str]]:
        return dict(STAGE_POOL)

    def stage_maps(self, x: Tensor, stages) -> Dict[int, Tensor]:
        """{k: block k's output} for the blocks in ``stages`` (1..5)."""
        return run_stages(x, [(k, getattr(self, f"block{k}")) for k in range(1, 6)], stages, {})

    def forward(self, x: Tensor) -> Tensor:
        for k in range(1, 6):
            x = getattr(self, f"block{k}")(x)  # [B, C_k, H_k, W_k]
        x = torch.flatten(self.pool(x), 1)  # [B, C_5 * side * side]
        return self.fc7(self.fc6(x))  # [B, feature_dim]


def alexnet_trunk(arch: str, stem: str, in_channels: int = 3) -> AlexNetTrunk:
    """``alexnet`` (ISL's, ``stem`` imagenet or small) or ``alexnet_half`` (CMC's, imagenet stem)."""
    if arch == "alexnet_half":
        if stem != "imagenet":
            raise ValueError("model.arch=alexnet_half is CMC's 224 px half AlexNet: use model.stem=imagenet")
        return AlexNetTrunk("half", in_channels)
    return AlexNetTrunk(stem, in_channels)
