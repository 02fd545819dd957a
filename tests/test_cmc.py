"""CMC (fastinst/methods/cmc/method.py): the two-bank cross-view loss and its gradients against a
float64 formula written here, the bank updates, start-up checks, 2 processes == 1, resume ==
uninterrupted, the probe on two concatenated trunks, export, and the seed configs."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datagen import make_photo_zip
from fastinst.train import engine
from fastinst.train.checkpoint import find_latest_complete, load_checkpoint
from fastinst.config import ConfigError, load_config
from fastinst.methods.cmc import CMC
from tests.distutil import train_on_worlds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, B, K, D, T = 40, 6, 5, 8, 0.1


class Tiny(nn.Module):
    """A linear "trunk" on a channel slice: view -> unit rows (what the loss sees)."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(channels * 16, D)

    def forward(self, x):
        return F.normalize(self.lin(x.flatten(1)).float(), dim=1)


def ref_direction(f, bank, index, noise, loss):
    """float64: feature f [B, D] scored against ``bank`` rows: positive = its own index, noise
    [B, K]; NCE with Z = mean(exp(s/T)) * N of this batch (set on the first batch), or softmax-CE."""
    rows = torch.cat([index[:, None], noise], 1)  # [B, 1+K]
    s = torch.einsum("bd,bkd->bk", f, bank[rows])  # [B, 1+K]
    if loss == "softmax":
        return F.cross_entropy(s / T, torch.zeros(len(f), dtype=torch.long))
    e = torch.exp(s / T)
    z = e.detach().mean() * N
    p, kpn = e / z, K / N
    return -(torch.log(p[:, 0] / (p[:, 0] + kpn)).sum() + torch.log(kpn / (p[:, 1:] + kpn)).sum()) / len(f)


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_loss_gradients_and_bank_updates_match_the_formula(loss):
    # Z as an EMA: set from the first batch (the reference's Z), then moved by every forward,
    # so the non-finite step below must put it back
    method = CMC(Tiny(1, 1), Tiny(2, 2), N, embed_dim=D, K=K, T=T, loss=loss, z_momentum=0.5, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 4, 4, generator=g)
    index = torch.randperm(N, generator=g)[:B]
    noise = torch.randint(N, (B, K), generator=g)
    method.crit_l.draw_noise = lambda b, device: noise  # the one draw both directions use
    bank_l, bank_ab = method.bank_l.shard.clone().double(), method.bank_ab.shard.clone().double()
    out = method({"index": index, "views": [x]})
    out["loss"].backward()
    # float64 reference: the same weights, L against the ab bank and ab against the L bank
    w = {n: (m.lin.weight.detach().double().requires_grad_(), m.lin.bias.detach().double().requires_grad_())
         for n, m in method.nets.items()}
    f_l = F.normalize(x[:, :1].double().flatten(1) @ w["l"][0].T + w["l"][1], dim=1)
    f_ab = F.normalize(x[:, 1:].double().flatten(1) @ w["ab"][0].T + w["ab"][1], dim=1)
    ref = ref_direction(f_l, bank_ab, index, noise, loss) + ref_direction(f_ab, bank_l, index, noise, loss)
    ref.backward()
    assert float(out["loss"]) == pytest.approx(float(ref), rel=1e-5)
    for n, m in method.nets.items():
        torch.testing.assert_close(m.lin.weight.grad.double(), w[n][0].grad, rtol=1e-4, atol=1e-6)
    if loss == "nce":  # one Z per direction, each from its own scores
        assert float(method.crit_l.nce.z) != pytest.approx(float(method.crit_ab.nce.z), rel=1e-3)
    # after the step: each bank moves towards its own view's feature (m = 0.5), other rows stay
    method.after_step(out, torch.tensor(True))
    for bank0, bank, f in ((bank_l, method.bank_l.shard, f_l), (bank_ab, method.bank_ab.shard, f_ab)):
        want = F.normalize(0.5 * bank0[index] + 0.5 * f.detach(), dim=1)
        torch.testing.assert_close(bank[index].double(), want, rtol=1e-5, atol=1e-6)
        rest = torch.ones(N, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(bank[rest].double(), bank0[rest])
    # a non-finite step: no row moves, Z put back
    before = (method.bank_l.shard.clone(), method.bank_ab.shard.clone())
    z = [c.nce.z.clone() for c in (method.crit_l, method.crit_ab) if c.nce is not None]
    out = method({"index": index, "views": [x * 3]})  # other features: the EMA moves Z
    assert loss != "nce" or not torch.equal(z[0], method.crit_l.nce.z)
    method.after_step(out, torch.tensor(False))
    assert torch.equal(before[0], method.bank_l.shard) and torch.equal(before[1], method.bank_ab.shard)
    assert all(torch.equal(a, c.nce.z) for a, c in zip(z, (method.crit_l, method.crit_ab)) if c.nce is not None)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=32, val=16)


TINY = ["method.name=cmc", "aug.colorspace=lab", "method.cmc.K=8", "method.cmc.T=0.1", "loader.backend=torch",
        "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false", "model.arch=resnet18",
        "model.stem=small", "model.width=0.25", "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]",
        "aug.eval_resize=16", "aug.eval_crop=16", "train.epochs=2", "train.lr=0.03", "train.lr_batch=8",
        "train.milestones=[]", "train.log_every=1", "train.eval_every=1"]


def cfg_of(photos, *over):
    return load_config(None, TINY + [f"data.path={photos}"] + list(over))


@pytest.mark.parametrize("over, match", [
    (["aug.colorspace=rgb"], r"'aug\.colorspace': method\.name=cmc trains on L/ab"),
    (["aug.crops=[{count: 2, size: 16}]"], r"'aug\.crops': method\.name=cmc needs exactly 1 views"),
    (["method.cmc.K=0"], r"'method\.cmc\.K': is 0 \(full softmax\) but method\.cmc\.loss=nce"),
    (["method.cmc.T=0"], r"'method\.cmc\.T'"),
])
def test_startup_checks_name_the_key(photos, over, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(photos, *over)


def test_k_must_be_below_n(photos, tmp_path):
    with pytest.raises(ConfigError, match=r"'method\.cmc\.K': K=32 noise rows needs a training set larger"):
        engine.train(cfg_of(photos, "method.cmc.K=32"), str(tmp_path / "run"))


def _state(tr):
    return {**{f"net.{n}.{k}": v for n, m in tr.method.trained_modules().items()
               for k, v in engine.unwrap(m).state_dict().items()},
            **{f"method.{k}": v for k, v in tr.method.state_dict().items() if torch.is_tensor(v)}}


def test_resume_reproduces_the_uninterrupted_run(photos, tmp_path):
    straight = engine.train(cfg_of(photos, "train.epochs=3"), str(tmp_path / "a"))
    engine.train(cfg_of(photos, "train.epochs=3", "train.max_steps=5"), str(tmp_path / "b"))
    resumed = engine.train(cfg_of(photos, "train.epochs=3"), str(tmp_path / "b"), resume="auto")
    a, b = _state(straight), _state(resumed)
    assert set(a) == set(b) and {"method.bank_l.shard", "method.bank_ab.shard", "method.crit_l.nce.z"} <= set(a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a["method.bank_l.shard"], a["method.bank_ab.shard"])


def test_two_processes_match_one(photos, tmp_path):
    """2 gloo ranks x batch B == 1 process x 2B (BN removed): losses, both sharded banks, kNN.
    (Shared negatives: per-sample noise rows pair with the global batch's order, which differs.)
    lr 0.01, not TINY's 0.03: the two runs differ only in float summation order (the gradient
    all-reduce), ~1e-7 in the banks after step 2, and at 0.03 the next two steps amplified that to
    1.5e-5 on an Intel Xeon (over atol); at 0.01 they stay at ~1e-7 there, still 4 steps, 2 epochs."""
    over = ["train.lr_batch=16", "train.lr=0.01", "train.eval_every=2", "method.cmc.negatives=shared",  # order-free
            "aug.crops=[{count: 1, size: 16, scale: [1.0, 1.0], "
            "ratio: [1.0, 1.0]}]", "aug.flip_p=0"]
    runs = {}
    for world, (out, ckpt) in train_on_worlds(tmp_path, TINY + [f"data.path={photos}"] + over,
                                              ((1, 16), (2, 8)), what="cmc").items():
        states = [load_checkpoint(ckpt, rank=r, world_size=world)["method"] for r in range(world)]
        banks = {b: torch.cat([s[f"{b}.shard"] for s in states]) for b in ("bank_l", "bank_ab")}
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(ln) for ln in f]
        runs[world] = ([r["loss"] for r in recs if r["kind"] == "train"], banks,
                       [r for r in recs if r["kind"] == "eval"][-1])
    (l1, b1, e1), (l2, b2, e2) = runs[1], runs[2]
    assert len(l1) == len(l2) == 4 and l2 == pytest.approx(l1, rel=1e-4)
    for name in b1:
        torch.testing.assert_close(b2[name], b1[name], rtol=1e-4, atol=1e-5)
    assert (e1["knn_top1"], e1["knn_top5"]) == (e2["knn_top1"], e2["knn_top5"])


def test_probe_reads_both_trunks_and_export_writes_each(photos, tmp_path):
    """The probe's features are the two trunks' pooled features side by side (L on channel 0,
    ab on 1-2), it learns the (separable) photo labels of its train split, and the export
    writes one torchvision-style state_dict per trunk (conv1 with 1 and 2 input channels)."""
    from fastinst.eval import linear
    from fastinst.eval.export import export_backbone
    from fastinst.core.runtime import DistEnv

    run = str(tmp_path / "pre")
    tr = engine.train(cfg_of(photos, "train.epochs=1"), run)
    ckpt = find_latest_complete(os.path.join(run, "checkpoints"))
    cfg = cfg_of(photos, "linear.epochs=40", "linear.lr=0.01", "linear.lr_batch=8", "linear.lr_batch=8", "linear.warmup_epochs=0", "linear.crop_scale=[1.0, 1.0]",
                 "linear.flip_p=0", "linear.log_every=4", "linear.eval_every=40", "linear.ckpt_every=0")
    probe = linear.build_probe(cfg, ckpt, str(tmp_path / "probe"), DistEnv())
    x = torch.randn(4, 3, 16, 16)
    nets = {n: engine.unwrap(m).eval() for n, m in tr.method.trained_modules().items()}
    with torch.no_grad():
        want = torch.cat([nets["l"].backbone_features(x[:, :1]), nets["ab"].backbone_features(x[:, 1:])], 1)
        got = probe.backbone.backbone_features(x)
    assert probe.backbone.feature_dim == 2 * 128 and got.shape == (4, 256)
    torch.testing.assert_close(got, want)
    res = linear.linear_probe(cfg, ckpt, str(tmp_path / "probe"))
    # fixed views (no crop, no flip): 32 points in 256-d are separable; the convex probe at a
    # small lr fits most of them (chance: ~1/12) and its training loss falls by more than half
    with open(os.path.join(str(tmp_path / "probe"), "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "linear_train"]
    assert res["train_top1"] >= 60.0 and losses[-1] < 0.5 * losses[0], (res, losses)
    info = export_backbone(ckpt, str(tmp_path / "exp" / "cmc.pth"))
    files = {t["name"]: t for t in info["trunks"]}
    assert set(files) == {"l", "ab"} and all(os.path.isfile(t["file"]) for t in files.values())
    for name, c in (("l", 1), ("ab", 2)):
        sd = torch.load(files[name]["file"])
        assert sd["conv1.weight"].shape[1] == c and not any(k.startswith("fc.") for k in sd)


def test_seed_configs_load_with_the_seed_values():
    for name, width, space, loss in (("cmc_imagenet_r50v1_lab", 0.5, "lab", "nce"),
                                     ("cmc_imagenet_r50v2_ycbcr", 1.0, "ycbcr", "nce")):
        c = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        m, t, lin = c.method.cmc, c.train, c.linear
        assert (c.method.name, c.model.arch, c.model.width, c.aug.colorspace) == ("cmc", "resnet50", width, space)
        assert (m.K, m.T, m.momentum, m.loss, m.z, m.negatives) == (4096, 0.07, 0.5, loss, "once", "per_sample")
        assert [(cr.count, cr.size, cr.scale) for cr in c.aug.crops] == [(1, 224, (0.08, 1.0))]
        assert (c.aug.jitter_p, c.aug.grey_p, c.aug.blur_p, c.aug.flip_p) == (0.0, 0.0, 0.0, 0.5)
        assert (t.epochs, t.lr, t.lr_batch, t.momentum, t.weight_decay, t.schedule, t.milestones, t.gamma) == (
            240, 0.03, 256, 0.9, 1e-4, "step", (120, 160, 200), 0.1)
        assert (lin.epochs, lin.lr, lin.momentum, lin.weight_decay, lin.schedule, lin.milestones, lin.gamma) == (
            60, 30.0, 0.9, 0.0, "step", (30, 40, 50), 0.2)
    in100 = load_config(os.path.join(ROOT, "configs", "cmc_imagenet100_r50v1_ycbcr.yaml"))
    assert (in100.data.classes, in100.method.cmc.loss, in100.method.cmc.K, in100.model.width) == (
        "configs/imagenet100.txt", "softmax", 4096, 0.5)
    from loaders.sources import read_class_list

    synsets = read_class_list(os.path.join(ROOT, in100.data.classes))
    assert len(synsets) == 100 and all(s[0] == "n" and len(s) == 9 and s[1:].isdigit() for s in synsets)
    demo = load_config(os.path.join(ROOT, "configs", "cmc_photos.yaml"))
    assert (demo.method.name, demo.aug.colorspace, demo.model.arch) == ("cmc", "lab", "resnet18")
