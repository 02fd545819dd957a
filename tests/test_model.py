import pytest
import torch
import torchvision

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.core.model import EmbeddingNet, autocast_context, build_model, make_grad_scaler


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("stem", "small")
    return build_model("resnet18", **kw).eval()


def test_output_shape_and_unit_norm():
    model = _tiny(embed_dim=32)
    x = torch.randn(3, 3, 32, 32)
    z = model(x)
    assert isinstance(model, EmbeddingNet)
    assert z.shape == (3, 32) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_imagenet_stem_and_features():
    model = _tiny(stem="imagenet")
    assert isinstance(model.backbone.maxpool, torch.nn.MaxPool2d)
    assert model.backbone.conv1.kernel_size == (7, 7)
    x = torch.randn(2, 3, 64, 64)
    assert model.backbone_features(x).shape == (2, 512)
    assert model(x).shape == (2, 128)


def test_small_stem_on_28px():
    model = _tiny()
    assert model.backbone.conv1.kernel_size == (3, 3)
    assert model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 28, 28)
    assert model.backbone_features(x).shape == (2, 512)
    z = model(x)
    assert z.shape == (2, 128) and torch.isfinite(z).all()


def test_channels_last_matches_contiguous():
    ref = _tiny()
    cl = _tiny(channels_last=True)
    cl.load_state_dict(ref.state_dict())
    assert cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(cl(x), ref(x), atol=1e-5, rtol=1e-4)


def test_mlp_head():
    model = _tiny(head="mlp", hidden_dim=64, embed_dim=16)
    names = [type(m).__name__ for m in model.head]
    assert names == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.head[0].in_features == 512 and model.head[-1].out_features == 16
    model.train()  # BN1d in training mode needs B > 1
    z = model(torch.randn(4, 3, 28, 28))
    assert z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    z.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_mlp_head_without_bn_is_per_sample():
    model = _tiny(head="mlp_nobn", hidden_dim=64, embed_dim=16)
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Linear"]
    model.train()
    x = torch.randn(4, 3, 28, 28)
    # no BN in the head: a sample's embedding is independent of the rest of the head's batch
    feats = model.backbone(x)
    torch.testing.assert_close(model.head(feats[:1]), model.head(feats)[:1], atol=1e-6, rtol=1e-5)


def test_zero_init_residual_starts_blocks_at_identity():
    model = _tiny(zero_init_residual=True)
    last_bns = [b.bn2 for layer in (model.backbone.layer1, model.backbone.layer4) for b in layer]
    assert all(bool((bn.weight == 0).all()) for bn in last_bns)
    assert bool((model.backbone.layer1[0].bn1.weight == 1).all())
    assert not any(bool((b.bn2.weight == 0).all()) for b in _tiny().backbone.layer1)


def test_export_loads_into_torchvision():
    model = _tiny(stem="imagenet")
    sd = model.export_backbone_state_dict()
    tv = torchvision.models.resnet18(weights=None)
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    # Strict on everything but the classifier.
    backbone_keys = {k for k in tv.state_dict() if not k.startswith("fc.")}
    assert set(sd) == backbone_keys
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), model.backbone_features(x))


def test_export_small_stem_needs_same_surgery():
    model = _tiny()
    sd = model.export_backbone_state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    tv = torchvision.models.resnet18(weights=None)
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]


def test_autocast_bf16_cpu_gives_fp32_unit_output():
    model = _tiny()
    x = torch.randn(2, 3, 28, 28)
    with autocast_context("cpu", "bf16"):
        feats = model.backbone_features(x)
        z = model(x)
    assert feats.dtype == torch.bfloat16  # autocast really was active
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    with autocast_context("cpu", "off"):
        assert model(x).dtype == torch.float32


def test_sync_bn_conversion_runs_without_process_group():
    model = _tiny(sync_bn=True, head="mlp", hidden_dim=32)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm in kinds
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d not in kinds
    model.train()
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 128)
    # Same keys as a plain model: checkpoints move between sync_bn on and off.
    assert set(model.state_dict()) == set(_tiny(head="mlp", hidden_dim=32).state_dict())


def test_compile_keeps_type_and_keys():
    # Only construction: running inductor on CPU would take too long for this suite.
    model = _tiny(compile=True)
    assert isinstance(model, EmbeddingNet)
    assert set(model.state_dict()) == set(_tiny().state_dict())


def test_grad_scaler_only_for_fp16():
    assert make_grad_scaler("fp16", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("off", "cpu").is_enabled()
    with pytest.raises(ValueError, match="amp"):
        make_grad_scaler("fp8", "cpu")
    with pytest.raises(ValueError, match="amp"):
        autocast_context("cpu", "half")


def test_bad_arch_names_the_key():
    with pytest.raises(ValueError, match="model.arch"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="model.stem"):
        build_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="model.head"):
        build_model("resnet18", head="conv")


@pytest.mark.parametrize("arch, width, expansion, depths", [
    ("resnet18", 0.5, 1, (2, 2, 2, 2)),
    ("resnet18", 0.25, 1, (2, 2, 2, 2)),
    ("resnet50", 0.5, 4, (3, 4, 6, 3)),  # CMC's resnet50v1 trunk
    ("resnet50", 2.0, 4, (3, 4, 6, 3)),  # CMC's resnet50v3 trunk
])
def test_width_scales_the_stages_and_keeps_the_stem(arch, width, expansion, depths):
    """Stage s has int(64 * width) * 2**s planes (x4 out for Bottleneck), the stem keeps 64
    channels (CMC), strides as torchvision, and initialisation as torchvision's ResNet."""
    torch.manual_seed(0)
    model = build_model(arch, stem="imagenet", width=width, zero_init_residual=True).eval()
    t = model.backbone
    assert t.conv1.out_channels == 64
    inplanes = 64
    for s, depth in enumerate(depths):
        layer = getattr(t, f"layer{s + 1}")
        planes = int(64 * width) * 2 ** s
        assert len(layer) == depth
        for b, blk in enumerate(layer):
            convs = [m for n, m in blk.named_children() if n.startswith("conv")]
            assert convs[0].in_channels == inplanes and convs[-1].out_channels == planes * expansion
            assert all(c.out_channels == planes for c in convs[:-1])
            stride = 2 if (s > 0 and b == 0) else 1
            assert max(c.stride[0] for c in convs) == stride
            has_down = stride != 1 or inplanes != planes * expansion
            assert (blk.downsample is not None) == has_down
            last_bn = blk.bn3 if expansion == 4 else blk.bn2
            assert torch.count_nonzero(last_bn.weight) == 0  # zero_init_residual
            assert torch.all(blk.bn1.weight == 1) and torch.all(blk.bn1.bias == 0)
            inplanes = planes * expansion
    assert model.feature_dim == int(64 * width) * 8 * expansion
    x = torch.randn(2, 3, 64, 64)
    assert model.backbone_features(x).shape == (2, model.feature_dim)
    z = model(x)
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    # Conv weights follow kaiming_normal(fan_out): std sqrt(2 / (out * k * k)).
    c = t.layer4[0].conv1
    fan_out = c.out_channels * c.kernel_size[0] * c.kernel_size[1]
    assert float(c.weight.detach().std()) == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)


def test_width_one_is_the_stock_torchvision_trunk():
    torch.manual_seed(0)
    ours = build_model("resnet18", stem="imagenet", width=1.0).backbone
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    sd = tv.state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(sd) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(mine[k], sd[k]) for k in mine)


def test_bad_width_names_the_key():
    from fastinst.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'model\.width'"):
        load_config(None, ["model.width=0"])
    with pytest.raises(ValueError, match=r"model\.width"):
        build_model("resnet18", width=0.001)
