"""Linear probe and backbone export (fastinst/eval/linear.py, ``launch.py linear|export``), on CPU.

The probe's checkpoint is a random ResNet-18 whose BatchNorm running statistics were measured
on the data (what any pretraining run leaves in them), saved in the trainer's checkpoint
format. The data are constant-colour images whose class is the dominant channel: linearly
separable with a wide margin in its pooled features. The probe's lr keeps training in the
stable (non-chaotic) regime of that convex problem, checked against the features' largest
curvature in ``test_probe_learns_linearly_separable_colours``, so what the tests assert does
not depend on one float trajectory. The CLI test uses a checkpoint written by a real
(two-step) training run.
"""
import io
import zipfile
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from datagen import channel_items
from fastinst.train import engine
from fastinst.eval import export, linear
from fastinst.train.checkpoint import find_latest_complete, list_complete, load_checkpoint, save_checkpoint
from fastinst.config import ConfigError, load_config, save_config, to_dict
from fastinst.train.metrics import MetricsLog
from fastinst.core.model import EmbeddingNet, build_model
from fastinst.core.runtime import DistEnv
from loaders.prepare import write_zip_layout
from tests.distutil import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false",
    "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small",
    # Random features are far larger than trained ones (norms ~10-100): PIC's lr 30 / 256 would
    # overshoot. 0.002 per batch of 8 keeps lr x (largest curvature) <= 1 on this data (checked
    # in test_probe_learns_linearly_separable_colours).
    "linear.lr=0.002", "linear.lr_batch=8", "linear.warmup_epochs=0", "linear.epochs=3", "linear.log_every=1",
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
    write_zip_layout(root, "train", channel_items(32))
    write_zip_layout(root, "val", channel_items(16))  # the colours of train images 0..15
    ckpts = os.path.join(root, "pretrain", "checkpoints")
    calibrated_random_checkpoint(tiny_cfg(root), ckpts)
    return root, find_latest_complete(ckpts)


def split_features(ckpt, data, split, cfg):
    """float64 pooled features of the saved trunk on ``split``, computed here without the
    loaders: each JPEG decoded by PIL, resized to the eval crop (the images are one colour, so
    resize and centre crop only set the size), normalised by aug.mean/std."""
    model = EmbeddingNet("resnet18", stem="small")
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    model = model.double().eval()
    with open(os.path.join(data, f"{split}_map.txt")) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    with zipfile.ZipFile(os.path.join(data, f"{split}.zip")) as zf:
        imgs = [Image.open(io.BytesIO(zf.read(rel))).convert("RGB").resize((cfg.aug.eval_crop,) * 2) for rel, _ in rows]
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in imgs]))  # [n, H, W, 3]
    x = (x - torch.tensor(cfg.aug.mean, dtype=torch.float64)) / torch.tensor(cfg.aug.std, dtype=torch.float64)
    with torch.no_grad():
        feats = model.backbone_features(x.permute(0, 3, 1, 2).contiguous())  # [n, 512]
    return feats, torch.tensor([int(lab) for _, lab in rows])


def test_probe_learns_linearly_separable_colours(colours, tmp_path):
    """A frozen trunk + linear probe learns a separable 3-class problem: 100% val top-1 at the end,
    with every val sample's probability of its class above 0.6 under the saved head, evaluated
    here in float64 on independently computed features (a margin, not one float trajectory).

    Why this holds on any CPU: the probe's loss is convex in the head and (lambda_max / 2)-smooth,
    lambda_max the largest eigenvalue of E[[x, 1][x, 1]^T] (the softmax-CE Hessian in the logits
    is <= I/2). With lr * lambda_max <= 1 each step is well inside the stable range (lr < 4 /
    lambda_max even without momentum), so rounding differences shrink instead of growing."""
    data, ckpt = colours
    over = ["linear.epochs=15", "linear.warmup_epochs=1"]
    cfg = tiny_cfg(data, *over)
    x, y = split_features(ckpt, data, "train", cfg)
    xv, yv = split_features(ckpt, data, "val", cfg)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [32, 513] with the bias input
    lam = float(torch.linalg.eigvalsh(xb.T @ xb / len(x))[-1])
    lr = cfg.linear.lr * cfg.loader.batch_size / cfg.linear.lr_batch
    assert lr * lam <= 1.0, f"lr {lr} x lambda_max {lam:.1f} > 1: the probe would leave the stable regime"
    # The premise, certified here: a linear map classifies every train image (least squares).
    w_ls = torch.linalg.lstsq(xb, torch.eye(3, dtype=xb.dtype)[y]).solution  # [513, 3]
    assert torch.equal((xb @ w_ls).argmax(1), y)

    out = str(tmp_path / "probe")
    res = linear.linear_probe(cfg, ckpt, out)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["val_n"] == 16
    assert res["epoch"] == 15 and res["step"] == 15 * 4
    state = load_checkpoint(find_latest_complete(os.path.join(out, "checkpoints")))
    head = state["linear"]
    assert set(head) == {"heads.avgpool.weight", "heads.avgpool.bias"}  # one head, on the pooled features
    assert head["heads.avgpool.weight"].shape == (3, 512) and state["step"] == 60
    logits = xv @ head["heads.avgpool.weight"].double().T + head["heads.avgpool.bias"].double()  # [16, 3]
    p_true = logits.softmax(1)[torch.arange(len(yv)), yv]
    assert float(p_true.min()) > 0.6, p_true  # correct with a margin: rounding cannot flip it
    assert 100.0 * float((logits.argmax(1) == yv).double().mean()) == res["top1"]
    val_loss = float(-p_true.log().mean())
    assert res["val_loss"] == pytest.approx(val_loss, rel=1e-3, abs=1e-4)  # the probe's own val loss

    recs = read_metrics(out)
    evals = [r for r in recs if r["kind"] == "linear_eval"]
    assert [r["epoch"] for r in evals] == list(range(1, 16))
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]  # it had to learn
    train = [r for r in recs if r["kind"] == "linear_train"]
    assert len(train) == 60 and {"loss", "lr", "images_per_s", "data_wait"} <= set(train[0])
    assert train[0]["lr"] == pytest.approx(lr * 0.01)  # warm-up starts at lr / 100 (PIC)
    assert train[-1]["lr"] < 1e-2 * lr  # cosine to zero
    assert load_config(os.path.join(out, "config.yaml")) == cfg
    assert state["pretrained"] == os.path.abspath(ckpt)


def test_backbone_stays_frozen(colours, tmp_path):
    data, ckpt = colours
    cfg = tiny_cfg(data, "linear.max_steps=3", "linear.ckpt_every=0")
    probe = linear.build_probe(cfg, ckpt, str(tmp_path), DistEnv())
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    head0 = probe.head.heads["avgpool"].weight.detach().clone()
    saved = load_checkpoint(ckpt)["model"]
    trunk = [k for k in before if k.startswith("backbone.")]
    assert len(trunk) > 100 and all(torch.equal(before[k], saved[k]) for k in trunk)  # loaded as saved
    assert not any(q.requires_grad for q in probe.backbone.parameters())
    try:
        linear._probe_loop(probe, MetricsLog(str(tmp_path), 1, None))  # rank 1: writes nothing
    finally:
        probe.loader.close()  # stop loader workers now (a later GC pass would wait on them)
        probe.val_loader.close()
    after = probe.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not probe.backbone.training and probe.step == 3
    assert not torch.equal(head0, probe.head.heads["avgpool"].weight)
    # Probe input = pooled trunk features, not the 128-d embedding.
    x = torch.randn(2, 3, 16, 16)
    assert probe.features(x)["avgpool"].shape == (2, 512)


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
    for k in ("heads.avgpool.weight", "heads.avgpool.bias"):
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
    info = export.export_backbone(str(tmp_path / "run"), out)  # a run directory: its newest checkpoint
    assert info["arch"] == "resnet18" and info["stem"] == stem and info["step"] == 5
    sd = torch.load(out, weights_only=True)  # a plain tensor dict
    assert not any(k.startswith(("backbone.", "head.", "fc.")) for k in sd)
    tv = torchvision.models.resnet18()
    if stem == "small":  # the same stem surgery as fastinst/core/model.py
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
    staged = str(tmp_path / "staged")
    assert launch.main(["linear", "--config", cfg_path, "--checkpoint", run, "--out", staged, "--stages", "2,4",
                        "linear.epochs=1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-5:-3] == ["| head | top-1 | top-5 |", "|---|---|---|"]  # the per-stage table
    assert [ln.split(" | ")[0] for ln in printed[-3:-1]] == ["| feat2", "| feat4"]
    assert set(json.loads(printed[-1])["heads"]) == {"feat2", "feat4"}
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
    for k in ("heads.avgpool.weight", "heads.avgpool.bias"):
        torch.testing.assert_close(h2[k], h1[k], rtol=1e-4, atol=1e-6)
    e1, e2 = ([r for r in m if r["kind"] == "linear_eval"] for m in (m1, m2))
    assert len(e1) == len(e2) == 2
    assert [(r["top1"], r["top5"], r["val_n"]) for r in e1] == [(r["top1"], r["top5"], r["val_n"]) for r in e2]
    # Epoch train loss and val loss are reduced over ranks: the global-batch values.
    for k in ("train_loss", "val_loss"):
        assert [r[k] for r in e2] == pytest.approx([r[k] for r in e1], rel=1e-4)


def test_per_stage_heads_each_learn_the_separable_colours(colours, tmp_path):
    """linear.stages=[1..5] (MMSelfSup's multi-head benchmark): one head per ResNet stage on its
    map pooled to 12/6/4/3/2 px behind a BN without affine, all trained in one pass; the
    colour classes (separable: test_probe_learns_linearly_separable_colours) are learnt by
    every head, each reported in metrics.jsonl."""
    data, ckpt = colours
    cfg = tiny_cfg(data, "linear.stages=[1, 2, 3, 4, 5]", "linear.epochs=15", "linear.warmup_epochs=1")
    out = str(tmp_path / "probe")
    res = linear.linear_probe(cfg, ckpt, out)
    heads = res["heads"]
    assert list(heads) == ["feat1", "feat2", "feat3", "feat4", "feat5"] and res["top1"] == heads["feat5"]["top1"]
    assert {n: h["top1"] for n, h in heads.items()} == {n: 100.0 for n in heads}, heads
    state = load_checkpoint(find_latest_complete(os.path.join(out, "checkpoints")))["linear"]
    # resnet18 (small stem): stage channels 64 / 64 / 128 / 256 / 512, pooled to 12 / 6 / 4 / 3 / 2 px
    dims = {f"feat{k}": c * s * s for k, c, s in zip(range(1, 6), (64, 64, 128, 256, 512), (12, 6, 4, 3, 2))}
    assert {n: state[f"heads.{n}.2.weight"].shape for n in heads} == {n: (3, d) for n, d in dims.items()}
    assert all(f"heads.{n}.0.running_mean" in state and f"heads.{n}.0.weight" not in state for n in heads)  # no affine
    evals = [r for r in read_metrics(out) if r["kind"] == "linear_eval"]
    assert set(evals[-1]["heads"]) == set(heads)
