"""Linear probe and backbone export (fastinst/linear.py, ``launch.py linear|export``), on CPU.

The probe's checkpoint is a random ResNet-18 whose BatchNorm running statistics were measured
on the data (what any pretraining run leaves in them), saved in the trainer's checkpoint
format. Colour classes are linearly separable in its pooled features, so a working probe
reaches 100% top-1; the CLI test uses a checkpoint written by a real (two-step) training run.
"""
import json
import os

import pytest
import torch
import torchvision
from torch import nn

from datagen import make_colour_zip
from fastinst import engine, linear
from fastinst.checkpoint import find_latest_complete, list_complete, load_checkpoint, save_checkpoint
from fastinst.config import ConfigError, load_config, save_config, to_dict
from fastinst.model import EmbeddingNet, build_model
from tests.distutil import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false",
    "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small",
    # Random features are far larger than trained ones: PIC's lr 30 / 256 would overshoot.
    "linear.lr=1.0", "linear.lr_batch=256", "linear.warmup_epochs=0", "linear.epochs=3", "linear.log_every=1",
]


def tiny_cfg(data, *over):
    return load_config(None, TINY + [f"data.path={data}"] + list(over))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def calibrated_random_checkpoint(cfg, directory, arch="resnet18", stem="small", seed=0):
    """A random EmbeddingNet with BN running stats averaged over the train split, saved as a
    fastinst training checkpoint (model + resolved config)."""
    from loaders import build_loader

    torch.manual_seed(seed)
    model = build_model(arch, stem=stem)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
    loader = build_loader(cfg, cfg.data.train_split, mode="eval")
    with torch.no_grad():
        for b in loader:
            model(b["views"][0])
    loader.close()  # stop its worker now, not in a garbage-collector pass later
    save_checkpoint(directory, 7, {"model": model.state_dict(), "config": to_dict(cfg), "step": 7})
    return model.eval()


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("colours"))
    make_colour_zip(root, n=32, size=(20, 20))
    make_colour_zip(root, n=16, split="val", size=(20, 20))  # the colours of train images 0..15
    ckpts = os.path.join(root, "pretrain", "checkpoints")
    calibrated_random_checkpoint(tiny_cfg(root), ckpts)
    return root, find_latest_complete(ckpts)


def test_probe_learns_linearly_separable_colours(colours, tmp_path):
    data, ckpt = colours
    out = str(tmp_path / "probe")
    res = linear.linear_probe(tiny_cfg(data, "linear.epochs=15", "linear.warmup_epochs=1"), ckpt, out)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["val_n"] == 16
    assert res["epoch"] == 15 and res["step"] == 15 * 4
    recs = read_metrics(out)
    evals = [r for r in recs if r["kind"] == "linear_eval"]
    assert [r["epoch"] for r in evals] == list(range(1, 16))
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    assert evals[0]["top1"] < 100.0  # it had to learn
    train = [r for r in recs if r["kind"] == "linear_train"]
    assert len(train) == 60 and {"loss", "lr", "images_per_s", "data_wait"} <= set(train[0])
    assert train[0]["lr"] == pytest.approx(1.0 * 8 / 256 * 0.01)  # warm-up starts at lr / 100 (PIC)
    assert train[-1]["lr"] < 1e-4  # cosine to zero
    assert load_config(os.path.join(out, "config.yaml")) == tiny_cfg(data, "linear.epochs=15",
                                                                     "linear.warmup_epochs=1")
    state = load_checkpoint(find_latest_complete(os.path.join(out, "checkpoints")))
    assert state["linear"]["weight"].shape == (3, 512) and state["step"] == 60
    assert state["pretrained"] == os.path.abspath(ckpt)


def test_backbone_stays_frozen(colours, tmp_path):
    data, ckpt = colours
    cfg = tiny_cfg(data, "linear.max_steps=3", "linear.ckpt_every=0")
    probe = linear.build_probe(cfg, ckpt, str(tmp_path), engine.DistEnv())
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    head0 = probe.head.weight.detach().clone()
    saved = load_checkpoint(ckpt)["model"]
    trunk = [k for k in before if k.startswith("backbone.")]
    assert len(trunk) > 100 and all(torch.equal(before[k], saved[k]) for k in trunk)  # loaded as saved
    assert not any(q.requires_grad for q in probe.backbone.parameters())
    try:
        linear._probe_loop(probe, engine.MetricsLog(str(tmp_path), 1, None))  # rank 1: writes nothing
    finally:
        probe.loader.close()  # stop loader workers now (a later GC pass would wait on them)
        probe.val_loader.close()
    after = probe.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not probe.backbone.training and probe.step == 3
    assert not torch.equal(head0, probe.head.weight)
    # Probe input = pooled trunk features, not the 128-d embedding.
    x = torch.randn(2, 3, 16, 16)
    assert probe.features(x).shape == (2, 512)


def test_resume_reproduces_uninterrupted_probe(colours, tmp_path):
    data, ckpt = colours
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    over = ["linear.warmup_epochs=0.5"]
    straight = linear.linear_probe(tiny_cfg(data, *over), ckpt, a)
    first = linear.linear_probe(tiny_cfg(data, *over, "linear.max_steps=6"), ckpt, b)  # stops mid-epoch 2
    assert first["step"] == 6 and first["epoch"] == 1.5
    resumed = linear.linear_probe(tiny_cfg(data, *over), ckpt, b)  # linear.resume=auto
    assert resumed["step"] == straight["step"] == 12
    sa, sb = (load_checkpoint(find_latest_complete(os.path.join(d, "checkpoints"))) for d in (a, b))
    for k in ("weight", "bias"):
        torch.testing.assert_close(sb["linear"][k], sa["linear"][k], rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_metrics(a) if r["kind"] == "linear_train"]
    lb = [r["loss"] for r in read_metrics(b) if r["kind"] == "linear_train"]
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    assert resumed["top1"] == straight["top1"]
    assert len(list_complete(os.path.join(b, "checkpoints"))) == 2  # linear.keep
    # A probe directory of another checkpoint is not resumed silently.
    other = str(tmp_path / "other")
    calibrated_random_checkpoint(tiny_cfg(data), other, seed=1)
    with pytest.raises(ConfigError, match="linear.resume"):
        linear.linear_probe(tiny_cfg(data, *over, "linear.epochs=4"), find_latest_complete(other), b)


def _saved_model(tmp_path, stem, arch="resnet18"):
    """A random EmbeddingNet with non-trivial BN statistics in a training checkpoint."""
    torch.manual_seed(3)
    model = EmbeddingNet(arch, stem=stem)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    cfg = load_config(None, [f"model.arch={arch}", f"model.stem={stem}"])
    ckpt = save_checkpoint(str(tmp_path / "run" / "checkpoints"), 5, {"model": model.state_dict(), "config": to_dict(cfg),
                                                       "step": 5})
    return model.eval(), ckpt


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_export_loads_into_torchvision(tmp_path, stem):
    model, ckpt = _saved_model(tmp_path, stem)
    out = str(tmp_path / "export" / "r18.pth")
    info = linear.export_backbone(str(tmp_path / "run"), out)  # a run directory: its newest checkpoint
    assert info["arch"] == "resnet18" and info["stem"] == stem and info["step"] == 5
    sd = torch.load(out, weights_only=True)  # a plain tensor dict
    assert not any(k.startswith(("backbone.", "head.", "fc.")) for k in sd)
    tv = torchvision.models.resnet18()
    if stem == "small":  # the same stem surgery as fastinst/model.py
        tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        tv.maxpool = nn.Identity()
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    tv.fc = nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), model.backbone_features(x), rtol=0, atol=0)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]


def test_cli_linear_and_export_from_a_training_run(colours, tmp_path, capsys):
    import launch

    data, _ = colours
    run = str(tmp_path / "run")
    tr = engine.train(load_config(None, TINY + [f"data.path={data}", "train.max_steps=2", "train.eval_every=0",
                                                "train.lr_batch=8", "train.milestones=[]",
                                                "method.npid.K=8"]), run)
    tr.loader.close()  # stop its workers now (a later GC pass would wait on them)
    cfg_path = str(tmp_path / "tiny.yaml")
    save_config(tiny_cfg(data), cfg_path)
    probe = str(tmp_path / "probe")
    assert launch.main(["linear", "--config", cfg_path, "--checkpoint", run, "--out", probe,
                        "linear.epochs=1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("linear probe: top-1 ")
    res = json.loads(printed[-1])
    assert res["epoch"] == 1 and 0 <= res["top1"] <= res["top5"] <= 100
    assert [r["kind"] for r in read_metrics(probe)][-1] == "linear_eval"
    pth = str(tmp_path / "r18.pth")
    assert launch.main(["export", "--checkpoint", run, "--out", pth]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["step"] == 2 and info["feature_dim"] == 512
    trained = load_checkpoint(find_latest_complete(os.path.join(run, "checkpoints")))["model"]
    sd = torch.load(pth, weights_only=True)
    assert all(torch.equal(sd[k], trained["backbone." + k]) for k in sd)
    # Errors name the key: a config whose trunk differs from the checkpoint's.
    assert launch.main(["linear", "--config", cfg_path, "--checkpoint", run, "--out", probe,
                        "model.arch=resnet34"]) == 2
    assert "model.arch" in capsys.readouterr().err


@pytest.mark.parametrize("override, match", [
    ("linear.lr=0", "linear.lr"),
    ("linear.epochs=0", "linear.epochs"),
    ("linear.warmup_epochs=5", "linear.warmup_epochs"),  # epochs=3 in TINY
    ("linear.crop_scale=[0.5, 0.1]", "linear.crop_scale"),
    ("linear.momentum=1.0", "linear.momentum"),
    ("linear.schedule=poly", "linear.schedule"),
    ("linear.crop_size=4", "linear.crop_size"),
    ("linear.bogus=1", "linear.bogus"),
])
def test_linear_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + [override])


def test_defaults_follow_pic_main_linear():
    lin = load_config(None).linear
    assert (lin.epochs, lin.lr, lin.lr_batch, lin.momentum, lin.weight_decay, lin.schedule) == \
        (100, 30.0, 256, 0.9, 0.0, "cosine")
    assert lin.crop_scale == (0.08, 1.0) and (lin.warmup_epochs, lin.warmup_start) == (5.0, 0.01)
    pcfg = linear.probe_data_config(load_config(None))
    assert (pcfg.aug.jitter_p, pcfg.aug.grey_p, pcfg.aug.blur_p, pcfg.aug.solarize_p) == (0, 0, 0, 0)
    assert pcfg.aug.crops[0].size == 224 and pcfg.aug.crops[0].count == 1 and pcfg.sampler.kind == "epoch"


@pytest.mark.slow
def test_two_processes_match_one(colours, tmp_path):
    """2 gloo ranks x batch 4 == 1 process x batch 8: the frozen trunk is batch-independent (eval
    BN), the epoch sampler splits one permutation rank::world, crops depend on (seed, epoch,
    index) only, DDP averages the head's gradient; val counts are all-reduced."""
    data, ckpt = colours
    cfg_path = str(tmp_path / "tiny.yaml")
    save_config(tiny_cfg(data, "linear.epochs=2"), cfg_path)
    runs = {}
    for world, bs in ((1, 8), (2, 4)):
        out = str(tmp_path / f"w{world}")
        run_on_ranks(world, [os.path.join(ROOT, "launch.py"), "linear", "--config", cfg_path, "--checkpoint", ckpt,
                             "--out", out, f"loader.batch_size={bs}"], cwd=ROOT, what="probe")
        last = find_latest_complete(os.path.join(out, "checkpoints"))
        runs[world] = (read_metrics(out), load_checkpoint(last, rank=0, world_size=world)["linear"])
    (m1, h1), (m2, h2) = runs[1], runs[2]
    for k in ("weight", "bias"):
        torch.testing.assert_close(h2[k], h1[k], rtol=1e-4, atol=1e-6)
    e1, e2 = ([r for r in m if r["kind"] == "linear_eval"] for m in (m1, m2))
    assert len(e1) == len(e2) == 2
    assert [(r["top1"], r["top5"], r["val_n"]) for r in e1] == [(r["top1"], r["top5"], r["val_n"]) for r in e2]
    # Epoch train loss and val loss are reduced over ranks: the global-batch values.
    for k in ("train_loss", "val_loss"):
        assert [r[k] for r in e2] == pytest.approx([r[k] for r in e1], rel=1e-4)
