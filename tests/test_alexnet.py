"""The seeds' AlexNet trunks (fastinst/core/alexnet.py): shapes and parameter counts against the
seeds' layer lists written out here, CMC's split model through the CMC method, a per-stage probe
on conv5 and the export round trip, ISL's 32 px AlexNet through the engine, the configs."""
import os

import pytest
import torch
from torch import nn

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import ConfigError, load_config
from fastinst.core.alexnet import AlexNetTrunk
from fastinst.core.model import build_model
from fastinst.core.runtime import DistEnv
from fastinst.eval import export, linear
from fastinst.train import engine
from tests.datagen import make_colour_train_val, make_photo_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_bn(c_in, c_out, k, bias):  # parameters of Conv2d + BatchNorm2d (weight, bias)
    return c_in * c_out * k * k + (c_out if bias else 0) + 2 * c_out


def fc_bn(d_in, d_out):  # Linear + BatchNorm1d
    return d_in * d_out + d_out + 2 * d_out


def seed_params(widths, kernels, c_in, fc, side, bias):
    total, c = 0, c_in
    for w, k in zip(widths, kernels):
        total, c = total + conv_bn(c, w, k, bias), w
    return total + fc_bn(c * side * side, fc) + fc_bn(fc, fc)


@pytest.mark.parametrize("arch, stem, c_in, px, maps, fc, params", [
    # CMC's alexnet_half (models/alexnet.py): conv_block_1..5, fc6, fc7 (fc8 is fastinst's head)
    ("alexnet_half", "imagenet", 1, 224, [(48, 27), (128, 13), (192, 13), (192, 13), (128, 6)], 2048,
     seed_params((48, 128, 192, 192, 128), (11, 5, 3, 3, 3), 1, 2048, 6, False)),
    ("alexnet_half", "imagenet", 2, 224, [(48, 27), (128, 13), (192, 13), (192, 13), (128, 6)], 2048,
     seed_params((48, 128, 192, 192, 128), (11, 5, 3, 3, 3), 2, 2048, 6, False)),
    # ISL's ImageNetAlexNet and CIFARAlexNet (features, fc1, fc2; its projection is the head)
    ("alexnet", "imagenet", 3, 224, [(64, 27), (192, 13), (384, 13), (256, 13), (256, 6)], 4096,
     seed_params((64, 192, 384, 256, 256), (11, 5, 3, 3, 3), 3, 4096, 6, True)),
    ("alexnet", "small", 3, 32, [(64, 16), (192, 8), (384, 8), (256, 8), (256, 4)], 1024,
     seed_params((64, 192, 384, 256, 256), (3, 3, 3, 3, 3), 3, 1024, 4, True)),
])
def test_trunk_shapes_and_parameters_are_the_seeds(arch, stem, c_in, px, maps, fc, params):
    net = build_model(arch, stem=stem, in_channels=c_in, embed_dim=128, head="linear")
    assert isinstance(net.backbone, AlexNetTrunk) and net.feature_dim == fc
    assert sum(p.numel() for p in net.backbone.parameters()) == params
    assert sum(p.numel() for p in net.head.parameters()) == fc * 128 + 128  # the seeds' fc8 / projection
    x = torch.randn(2, c_in, px, px)
    got = net.stage_maps(x, [1, 2, 3, 4, 5])
    assert [(m.shape[1], m.shape[2]) for m in got.values()] == maps and all(m.shape[2] == m.shape[3] for m in got.values())
    assert net.stage_channels() == {k + 1: c for k, (c, _) in enumerate(maps)}
    z = net(x)
    assert z.shape == (2, 128) and torch.allclose(z.norm(dim=1), torch.ones(2))
    # channels-last and AMP: the same network, the same function
    cl = build_model(arch, stem=stem, in_channels=c_in, channels_last=True)
    cl.load_state_dict(build_model(arch, stem=stem, in_channels=c_in).state_dict())
    net2 = build_model(arch, stem=stem, in_channels=c_in)
    net2.load_state_dict(cl.state_dict())
    net2.eval(), cl.eval()
    torch.testing.assert_close(cl(x), net2(x), rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cl(x).dtype == torch.float32  # the embedding is normalised in fp32


def test_config_checks():
    with pytest.raises(ConfigError, match=r"'model\.arch'.*model\.width=1"):
        load_config(None, ["model.arch=alexnet", "model.width=0.5"])
    with pytest.raises(ConfigError, match=r"'model\.stem'"):
        load_config(None, ["model.arch=alexnet_half", "model.stem=small"])
    with pytest.raises(ValueError, match="fixed widths"):
        build_model("alexnet", zero_init_residual=True)


def test_seed_configs():
    cmc = load_config(os.path.join(ROOT, "configs", "cmc_imagenet_alexnet_lab.yaml"))
    assert (cmc.method.name, cmc.model.arch, cmc.aug.colorspace, cmc.aug.crops[0].scale) == \
           ("cmc", "alexnet_half", "lab", (0.2, 1.0))
    c = cmc.method.cmc
    assert (c.K, c.T, c.momentum, cmc.train.lr, cmc.train.epochs, cmc.train.milestones) == \
           (16384, 0.07, 0.5, 0.03, 240, (120, 160, 200))
    assert (cmc.linear.stages, cmc.linear.lr, cmc.linear.epochs, cmc.linear.milestones, cmc.linear.gamma) == \
           ((5,), 0.1, 60, (30, 40, 50), 0.2)
    isl = load_config(os.path.join(ROOT, "configs", "isl_cifar_alexnet.yaml"))
    r18 = load_config(os.path.join(ROOT, "configs", "isl_cifar_r18.yaml"))
    assert (isl.model.arch, isl.model.stem) == ("alexnet", "small")
    assert isl.method.isl == r18.method.isl and isl.train == r18.train and isl.aug == r18.aug


@pytest.fixture(scope="module")
def cmc_run(tmp_path_factory):
    photos = make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=24, val=12)
    over = [f"data.path={photos}", "method.name=cmc", "aug.colorspace=lab", "model.arch=alexnet_half",
            "method.cmc.K=0", "method.cmc.loss=softmax", "aug.crops=[{count: 1, size: 64}]", "aug.eval_resize=64",
            "aug.eval_crop=64", "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8",
            "loader.channels_last=false", "train.epochs=1", "train.lr_batch=8", "train.log_every=1",
            "train.milestones=[]", "linear.epochs=1", "linear.warmup_epochs=0", "linear.stages=[5]"]
    out = str(tmp_path_factory.mktemp("run"))
    tr = engine.train(load_config(None, over), out)
    return tr, over, out


def test_cmc_split_alexnet_probe_and_export(cmc_run, tmp_path):
    """CMC's two halves (L: 1 channel, ab: 2) train; the conv5 probe reads both halves' maps
    (2 x 128 channels, CMC's 6 px max-pool: 9216 inputs, its LinearClassifierAlexNet layer 5);
    export writes each half, which loads into a fresh trunk and gives the same features."""
    tr, over, out = cmc_run
    nets = tr.method.trained_modules()
    firsts = {n: engine.unwrap(m).backbone.block1[0].weight.shape for n, m in nets.items()}
    assert sorted(firsts.values()) == [(48, 1, 11, 11), (48, 2, 11, 11)]
    cfg = load_config(None, over)
    probe = linear.build_probe(cfg, out, str(tmp_path / "probe"), DistEnv())
    try:
        fc = engine.unwrap(probe.head).heads["feat5"][-1]
        assert fc.in_features == 2 * 128 * 6 * 6
        feats = probe.features(torch.randn(2, 3, 64, 64))["feat5"]
        assert feats.shape == (2, 256, 6, 6)
    finally:
        probe.loader.close(), probe.val_loader.close()
    info = export.export_backbone(out, str(tmp_path / "ex" / "alexnet.pth"), cfg)
    assert len(info["trunks"]) == 2
    for t in info["trunks"]:
        fresh = AlexNetTrunk("half", t["in_channels"]).eval()
        fresh.load_state_dict(torch.load(t["file"], weights_only=True), strict=True)
        mine = engine.unwrap(nets[t["name"]]).backbone.eval()
        x = torch.randn(2, t["in_channels"], 64, 64)
        assert torch.equal(fresh(x), mine(x))
    with pytest.raises(ConfigError, match="no AlexNet"):
        export.export_backbone(out, str(tmp_path / "ex" / "d2.pkl"), cfg, fmt="detectron2")


def test_isl_cifar_alexnet_trains_through_the_engine(tmp_path):
    data = make_colour_train_val(str(tmp_path / "data"), n_train=16, n_val=8, size=(32, 32))
    cfg = load_config(os.path.join(ROOT, "configs", "isl_cifar_alexnet.yaml"),
                      [f"data.path={data}", "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8",
                       "train.epochs=1", "train.max_steps=2", "train.log_every=1", "method.isl.rounds=1",
                       "method.isl.negatives=8", "eval.knn_k=4", "train.eval_every=0"])
    tr = engine.train(cfg, str(tmp_path / "run"))
    assert tr.step == 2 and isinstance(engine.unwrap(tr.model).backbone, AlexNetTrunk)
    assert isinstance(engine.unwrap(tr.model).backbone.block1[0], nn.Conv2d)
