"""Embedding network: a torchvision ResNet trunk (or one of the seeds' AlexNets,
fastinst/core/alexnet.py) plus a projection head.

The ResNet trunk is a stock torchvision ResNet (never pretrained weights, nothing is
downloaded) with its ``fc`` removed, so the trained trunk exports straight back into
``torchvision.models.resnetXX()`` for linear probing and transfer. The head maps pooled
features to the instance embedding:

- ``head="linear"``: one Linear to ``embed_dim`` (NPID / lemniscate ``low_dim`` fc, PIC).
- ``head="mlp"``: Linear-BN-ReLU-Linear (SimCLR's projection head).
- ``head="mlp_nobn"``: Linear-ReLU-Linear (MoCo v2's and PIC's ``--mlp-head``: no BN, so the
  embedding of one sample does not depend on the rest of its batch).

The embedding is L2-normalised in fp32 even under autocast: every method in fastinst
divides cosine similarities by a temperature as low as 0.07, and bf16/fp16 rounding of
the unit vectors would be amplified by 1/T before the softmax.

Also here: the AMP helpers (`autocast_context`, `make_grad_scaler`) so that the engine
never branches on the precision mode itself.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import ContextManager, Dict, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .alexnet import AlexNetTrunk, alexnet_trunk, run_stages

__all__ = [
    "ARCHS",
    "EmbeddingNet",
    "build_model",
    "autocast_context",
    "make_grad_scaler",
]

# Constructors by name; all take weights=None so nothing is ever downloaded.
ARCHS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
ALEXNETS = ("alexnet", "alexnet_half")  # ISL's (imagenet / small stem) and CMC's half-width one
STEMS = ("imagenet", "small")
# Per-stage probe pooling of ResNet maps (MMSelfSup's multi-head benchmark: ~9k inputs per head for a
# 224 px ResNet-50); AlexNet's are CMC's (fastinst/core/alexnet.py).
RESNET_STAGE_POOL = {1: (12, "avg"), 2: (6, "avg"), 3: (4, "avg"), 4: (3, "avg"), 5: (2, "avg")}
HEADS = ("linear", "mlp", "mlp_nobn")
AMP_MODES = ("off", "bf16", "fp16")


def _scaled_stages(trunk: torchvision.models.ResNet, width: float, zero_init_residual: bool) -> None:
    """Replace ``layer1..4`` of a torchvision ResNet by stages of int(64 * width) * {1, 2, 4, 8}
    planes (the stem keeps its 64 channels, as CMC's ``resnet50v1/v2/v3`` trunks do), built
    from torchvision's own blocks and initialised as torchvision's ResNet initialises them."""
    block = type(trunk.layer1[0])  # BasicBlock or Bottleneck
    last_bn = "bn3" if block is torchvision.models.resnet.Bottleneck else "bn2"
    inplanes = trunk.conv1.out_channels  # 64
    for i, mult in enumerate((1, 2, 4, 8)):
        depth, planes = len(getattr(trunk, f"layer{i + 1}")), int(64 * width) * mult
        blocks = []
        for b in range(depth):
            stride = 2 if (i > 0 and b == 0) else 1
            down = None
            if stride != 1 or inplanes != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(inplanes, planes, stride, down))
            inplanes = planes * block.expansion
        stage = nn.Sequential(*blocks)
        for m in stage.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity
            for blk in blocks:
                nn.init.zeros_(getattr(blk, last_bn).weight)
        setattr(trunk, f"layer{i + 1}", stage)
    trunk.fc = nn.Linear(inplanes, 1)  # only its in_features is read (feature width), then dropped


def _build_trunk(arch: str, stem: str, zero_init_residual: bool = False,
                 width: float = 1.0, in_channels: int = 3) -> Tuple[nn.Module, int]:
    """torchvision ResNet with ``fc`` replaced by Identity, and its pooled feature width.
    zero_init_residual: the last BN gamma of each residual block starts at 0 (bl0/PIC).
    width: stage widths int(64 * width) * {1, 2, 4, 8}; 1 is the stock torchvision trunk (the
    stem keeps 64 channels, as CMC's resnet50v1/v2/v3).
    in_channels: input channels of conv1 (CMC: 1 for L / Y, 2 for ab / CbCr)."""
    if arch not in ARCHS and arch not in ALEXNETS:
        raise ValueError(f"model.arch={arch!r} is not supported; choose one of {sorted(ARCHS) + list(ALEXNETS)}")
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r} is not supported; choose one of {list(STEMS)}")
    if arch in ALEXNETS:
        if width != 1.0 or zero_init_residual:
            raise ValueError(f"model.arch={arch}: the seeds' AlexNets have fixed widths and no residual blocks; "
                             "use model.width=1 and model.zero_init_residual=false")
        trunk = alexnet_trunk(arch, stem, in_channels)
        return trunk, trunk.feature_dim
    if not (width > 0 and int(64 * width) >= 1):
        raise ValueError(f"model.width={width!r} must be > 0 with int(64 * width) >= 1")
    trunk = ARCHS[arch](weights=None, zero_init_residual=zero_init_residual)
    if stem == "small":
        # CIFAR-style stem (lemniscate models/resnet_cifar.py): 3x3 stride-1 conv and no
        # max-pool, so 28-96 px inputs are not downsampled 4x before layer1.
        trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        trunk.maxpool = nn.Identity()
    if in_channels != 3:
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1")
        c = trunk.conv1
        trunk.conv1 = nn.Conv2d(in_channels, c.out_channels, kernel_size=c.kernel_size, stride=c.stride,
                                padding=c.padding, bias=False)
        nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    if width != 1.0:
        _scaled_stages(trunk, width, zero_init_residual)
    # Identity keeps the torchvision module names (conv1, layer1..4, ...) and has no
    # parameters, so the trunk's state_dict is a torchvision state_dict minus fc.*.
    feature_dim = trunk.fc.in_features  # 512 (resnet18/34) or 2048 (resnet50+), times width
    trunk.fc = nn.Identity()
    return trunk, feature_dim


def _build_head(kind: str, in_dim: int, embed_dim: int, hidden_dim: int) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"model.head={kind!r} is not supported; choose one of {list(HEADS)}")
    if kind == "linear":
        return nn.Linear(in_dim, embed_dim)
    if kind == "mlp_nobn":
        return nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(in_dim, hidden_dim),
                relu=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden_dim, embed_dim),
            )
        )
    # No bias before BN: BN's shift makes it redundant.
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(in_dim, hidden_dim, bias=False),
            bn1=nn.BatchNorm1d(hidden_dim),
            relu=nn.ReLU(inplace=True),
            fc2=nn.Linear(hidden_dim, embed_dim),
        )
    )


class EmbeddingNet(nn.Module):
    """ResNet trunk -> head -> L2-normalised fp32 embedding of size ``embed_dim``."""

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        stem: str = "imagenet",
        embed_dim: int = 128,
        head: str = "linear",
        hidden_dim: int = 2048,
        zero_init_residual: bool = False,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or hidden_dim <= 0:
            raise ValueError(
                f"model.embed_dim={embed_dim} and model.hidden_dim={hidden_dim} must be positive"
            )
        self.arch = arch
        self.stem = stem
        self.width = width
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.backbone, self.feature_dim = _build_trunk(arch, stem, zero_init_residual, width, in_channels)
        self.head = _build_head(head, self.feature_dim, embed_dim, hidden_dim)
        # Set by build_model(channels_last=True): inputs are converted on entry so that a
        # caller handing NCHW-contiguous images does not silently fall back to slow kernels.
        self.channels_last = False

    def _prepare(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # [B, 3, H, W] NHWC strides
        return x

    def backbone_features(self, x: Tensor) -> Tensor:
        """Pooled pre-head features [B, feature_dim] (the linear-probe input)."""
        return self.backbone(self._prepare(x))  # [B, feature_dim]

    def stage_channels(self) -> Dict[int, int]:
        """Channels of each stage's maps (`stage_maps`)."""
        b = self.backbone
        if isinstance(b, AlexNetTrunk):
            return b.stage_channels()
        out = {1: b.conv1.out_channels}
        for k in range(2, 6):
            layer = getattr(b, f"layer{k - 1}")
            last = layer[-1]
            out[k] = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        return out

    def stage_pool(self) -> Dict[int, Tuple[int, str]]:
        """{stage: (side, "avg" | "max")}: how a per-stage probe pools each stage's maps."""
        return self.backbone.stage_pool() if isinstance(self.backbone, AlexNetTrunk) else dict(RESNET_STAGE_POOL)

    def stage_maps(self, x: Tensor, stages) -> Dict[int, Tensor]:
        """Feature maps of the trunk's stages, {stage: [B, C, H, W]}. ResNet: 1 = the stem after
        its ReLU (before max-pooling, as MMSelfSup's Feature1), 2..5 = the outputs of
        layer1..layer4; AlexNet: its five conv blocks."""
        b, out = self.backbone, {}
        if isinstance(b, AlexNetTrunk):
            return b.stage_maps(self._prepare(x), stages)
        x = b.relu(b.bn1(b.conv1(self._prepare(x))))
        if 1 in stages:
            out[1] = x
        return run_stages(b.maxpool(x), [(k, getattr(b, f"layer{k - 1}")) for k in range(2, 6)], stages, out)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(self._prepare(x))  # [B, feature_dim]
        z = self.head(feats)  # [B, embed_dim], autocast dtype if enabled
        # Normalise outside autocast in fp32 (see module docstring).
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.normalize(z.float(), dim=1)  # [B, embed_dim] fp32, unit rows

    def export_backbone_state_dict(self) -> Dict[str, Tensor]:
        """Trunk weights under torchvision's key names, for ``torchvision.models.<arch>()``.

        The dict holds every torchvision key except ``fc.weight`` / ``fc.bias`` (the
        classifier is not part of self-supervised training), so load it with
        ``strict=False``; the returned ``missing_keys`` is then exactly
        ``["fc.weight", "fc.bias"]`` and ``unexpected_keys`` is empty. With
        ``stem="small"`` ``conv1.weight`` is 3x3, so the receiving torchvision model needs
        the same stem surgery (see ``_build_trunk``) before loading, and a ``width`` other
        than 1 needs a trunk of the same stage widths (the keys are the same). SyncBatchNorm layers
        export the same keys as BatchNorm2d. An AlexNet trunk exports its own keys (``block1..5``,
        ``fc6``, ``fc7``: torchvision's AlexNet has no BatchNorm), for
        ``fastinst.core.alexnet.AlexNetTrunk``. Tensors are detached CPU copies.
        """
        return OrderedDict(
            (k, v.detach().to("cpu", copy=True).contiguous())
            for k, v in self.backbone.state_dict().items()
        )


def build_model(
    arch: str = "resnet50",
    *,
    channels_last: bool = False,
    sync_bn: bool = False,
    compile: bool = False,
    **net,
) -> EmbeddingNet:
    """Build an `EmbeddingNet` (``net``: its keyword arguments: stem, embed_dim, head,
    hidden_dim, zero_init_residual, width); the order of conversions matters and is fixed here.

    sync_bn: BatchNorm -> SyncBatchNorm (statistics over all ranks; it falls back to
        plain batch norm when torch.distributed is not initialised, e.g. in tests).
    channels_last: parameters and inputs in NHWC, what tensor-core convolutions want
        under AMP (NVIDIA DeepLearningExamples RN50 recipe).
    compile: ``nn.Module.compile()`` in place (torch >= 2.2) rather than wrapping in
        ``torch.compile(model)``, so the result is still an `EmbeddingNet` and its
        state_dict keys carry no ``_orig_mod.`` prefix (checkpoints stay interchangeable
        between compiled and eager runs).
    """
    model = EmbeddingNet(arch, **net)
    if sync_bn:
        # Returns the same top-level object (it is not a BN layer); children are swapped.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if compile:
        model.compile()
    return model


def autocast_context(device_type: str, amp: str) -> ContextManager:
    """Autocast region for ``amp`` in {"off", "bf16", "fp16"}; "off" is a no-op context."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not supported; choose one of {list(AMP_MODES)}")
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def make_grad_scaler(amp: str, device_type: str = "cuda") -> torch.amp.GradScaler:
    """Loss scaler, enabled only for fp16 (bf16 has fp32's exponent range; no underflow).

    A disabled scaler is returned for "off"/"bf16" so the train loop is the same in every
    mode: ``scale(loss)`` returns the loss unchanged, ``step(opt)`` calls ``opt.step()``
    and ``update()`` does nothing. ``torch.amp.GradScaler(device)`` exists from torch 2.3
    on (the ``torch.cuda.amp`` spelling is deprecated on newer releases).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp={amp!r} is not supported; choose one of {list(AMP_MODES)}")
    return torch.amp.GradScaler(device_type, enabled=(amp == "fp16"))
