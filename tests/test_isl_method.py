"""ISL through the engine (fastinst/methods/isl/method.py): the rounds' stages run in order with the
backbone frozen outside its stages, mining adds symmetric pairs, the GAN's patience ends its
stage early, and a run stopped inside any stage resumes to the uninterrupted run."""
import json
import os
import shutil

import pytest
import torch

from datagen import make_colour_train_val
from fastinst.train import engine
from fastinst.train.checkpoint import find_latest_complete, load_checkpoint
from fastinst.config import load_config

TINY = [
    "method.name=isl", "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8",
    "loader.channels_last=false", "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16",
    "aug.eval_crop=16", "aug.blur_p=0", "model.arch=resnet18", "model.stem=small", "model.width=0.25",
    "model.embed_dim=16", "train.epochs=1", "train.lr=0.03", "train.lr_batch=8", "train.milestones=[]",
    "train.log_every=1", "train.eval_every=0", "train.ckpt_every=1", "train.keep=50",
    # 2 rounds: train0 (1 epoch), gan0 (2), mine0 (2), train1 (1); a permissive miner on tiny data
    "method.isl.rounds=2", "method.isl.gan_epochs=2", "method.isl.mine_epochs=2", "method.isl.negatives=8",
    "method.isl.T=0.1", "method.isl.tau=0.01", "method.isl.R=0.0", "method.isl.cap=4", "method.isl.per=5",
]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


def cfg_of(data, *over):
    return load_config(None, TINY + [f"data.path={data}"] + list(over))


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def state_of(out):
    p = load_checkpoint(find_latest_complete(os.path.join(out, "checkpoints")))
    return {"encoder": p["modules"]["encoder"], "gen": p["modules"]["gen"], "disc": p["modules"]["disc"],
            "method": p["method"], "optimizers": p["optimizers"]}


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_stages_run_in_order_and_mining_adds_symmetric_pairs(colours, tmp_path):
    out = str(tmp_path / "run")
    frozen = {}
    real_gan = engine.run_step  # the loop's own reference

    def spy(tr, stage, batch, epoch):  # the backbone must not move outside the train stages
        enc = {k: v.clone() for k, v in tr.model.state_dict().items()}
        res = real_gan(tr, stage, batch, epoch)
        if not stage.name.startswith("train"):
            frozen[stage.name] = frozen.get(stage.name, True) and all(
                torch.equal(v, tr.model.state_dict()[k]) for k, v in enc.items())
        return res

    engine.run_step = spy
    try:
        tr = engine.train(cfg_of(colours), out)
    finally:
        engine.run_step = real_gan
    assert [s.name for s in tr.stages] == ["train0", "gan0", "mine0", "train1"]
    assert frozen == {"gan0": True, "mine0": True}
    recs = records(out)
    stages = [r["stage"] for r in recs if r["kind"] == "train"]
    assert stages == ["train0"] * 4 + ["gan0"] * 8 + ["mine0"] * 8 + ["train1"] * 4
    gan = [r for r in recs if r["kind"] == "method" and r["stage"] == "gan0"]
    mine = [r for r in recs if r["kind"] == "method" and r["stage"] == "mine0"]
    assert len(gan) == 2 and all(0 <= r["d_acc_real"] <= 1 and 0 <= r["d_acc_fake"] <= 1 for r in gan)
    assert len(mine) == 2 and all(r["triplets_kept"] <= 32 for r in mine)
    nbr = tr.method.table.nbr
    pairs = {(i, int(j)) for i in range(nbr.shape[0]) for j in nbr[i] if j >= 0}
    assert all((j, i) in pairs for i, j in pairs) and mine[-1]["pairs"] == len(pairs) // 2


def _planted_isl(d_bias: float, R: float = 0.9, topk: int = 3):
    """An ISL of 8 rows in two tight clusters (positive coordinates), G = the positive p (weights
    set by hand: p passes LeakyReLU unchanged) and D's score sigmoid(d_bias) for every triplet."""
    from fastinst.methods.isl import ISL, ISLConfig

    d = 4
    c = ISLConfig(T=0.1, tau=0.5, R=R, topk=topk, cap=4, negatives=4)
    m = ISL(torch.nn.Flatten(), 8, c, embed_dim=d, labels=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.1, 0.1, 0.1], [0.1, 0.1, 1.0, 0.1]])
    rows = centres.repeat_interleave(4, 0) + 0.01 * torch.rand(8, d, generator=g)
    m.bank.shard.copy_(torch.nn.functional.normalize(rows, dim=1))
    with torch.no_grad():
        lin = [mod for mod in m.kept_gen.net if isinstance(mod, torch.nn.Linear)]
        for mod in lin:
            mod.weight.zero_()
            mod.bias.zero_()
        lin[0].weight[:d, d:2 * d] = torch.eye(d)  # the p part of cat(a, p, n)
        lin[1].weight[:, :d] = torch.eye(d)
        lin[2].weight.copy_(torch.eye(d))
        disc = [mod for mod in m.kept_disc.net if isinstance(mod, torch.nn.Linear)]
        disc[-1].weight.zero_()
        disc[-1].bias.fill_(d_bias)
    return m


def test_mining_adds_the_neighbours_inside_the_radius():
    m = _planted_isl(d_bias=10.0)  # s ~ 1: radius ~ R = 0.9, only cluster-mates are that close
    batch = {"index": torch.arange(8), "views": [torch.nn.functional.normalize(torch.rand(8, 4), dim=1)]}
    m._mine_step(m, batch, None)
    got = {i: sorted(int(j) for j in m.table.nbr[i] if j >= 0) for i in range(8)}
    assert got == {i: sorted(set(range(4 * (i // 4), 4 * (i // 4) + 4)) - {i}) for i in range(8)}
    assert m.neighbour_precision() == 1.0  # every pair inside a class
    # D unconvinced (s ~ 0 < tau): no triplet is kept, nothing is added
    m = _planted_isl(d_bias=-10.0)
    m._mine_step(m, batch, None)
    assert int((m.table.nbr >= 0).sum()) == 0
    # top-5 reaches 2 rows of the other cluster (cosine ~0.2): the radius keeps them out ...
    m = _planted_isl(d_bias=10.0, topk=5)
    m._mine_step(m, batch, None)
    assert {i: sorted(int(j) for j in m.table.nbr[i] if j >= 0) for i in range(8)} == got
    # ... and a radius of ~0 lets them in (cross-cluster pairs appear)
    m = _planted_isl(d_bias=10.0, R=0.0, topk=5)
    m._mine_step(m, batch, None)
    assert any(int(j) // 4 != i // 4 for i in range(8) for j in m.table.nbr[i] if j >= 0)
    pairs = [(i, int(j)) for i in range(8) for j in m.table.nbr[i] if j >= 0]
    assert m.neighbour_precision() == pytest.approx(sum(i // 4 == j // 4 for i, j in pairs) / len(pairs))


@pytest.mark.parametrize("keep", ["last", "best"])
def test_a_stopped_gan_stage_skips_its_remaining_epochs(colours, tmp_path, monkeypatch, keep):
    """The rule (scripted here; the rule itself is tested on scripted losses in test_isl.py) calls
    GAN epoch 1 the best and stops after epoch 2 of 4: epochs 3-4 are skipped without reading
    data, mining runs with the (G, D) of epoch 2 (gan_keep=last) or of epoch 1 (best)."""
    from fastinst.methods.isl.gan import StoppingRule

    real = StoppingRule.update

    def update(self, loss):  # scripted: epoch 1 is the best, epoch 2 is not and stops
        real(self, loss)
        self.calls = getattr(self, "calls", 0) + 1
        self.stopped = self.calls >= 2
        return self.calls == 1, self.stopped

    monkeypatch.setattr(StoppingRule, "update", update)
    out = str(tmp_path / "run")
    tr = engine.train(cfg_of(colours, "method.isl.gan_epochs=4", "method.isl.gan_patience=1",
                             f"method.isl.gan_keep={keep}"), out)
    recs = records(out)
    gan = [r for r in recs if r["kind"] == "method" and r["stage"] == "gan0"]
    assert [r["stopped"] for r in gan] == [False, True]
    assert [r for r in recs if r["kind"] == "stage"] == [
        {"kind": "stage", "step": 12, "epoch": 3, "stage": "gan0", "skipped_epochs": 2}]
    stages = [r["stage"] for r in recs if r["kind"] == "train"]
    assert stages == ["train0"] * 4 + ["gan0"] * 8 + ["mine0"] * 8 + ["train1"] * 4
    assert [r["best"] for r in gan] == [True, False]
    # the pair mining used: the G and D of the last GAN epoch, or of the last best one
    kept_step = gan[-1]["step"] if keep == "last" else [r for r in gan if r["best"]][-1]["step"]
    saved = load_checkpoint(os.path.join(out, "checkpoints", f"ckpt_{kept_step:09d}"))["modules"]
    for name, mod in (("gen", tr.method.kept_gen), ("disc", tr.method.kept_disc)):
        assert_same(dict(mod.state_dict()), dict(saved[name]))


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [6, 11, 17, 22], ids=["mid-gan", "gan-epoch-end", "mid-mine", "mid-train1"])
def test_resume_inside_each_stage_equals_the_uninterrupted_run(colours, tmp_path, stop_at):
    full = str(tmp_path / "full")
    engine.train(cfg_of(colours), full)
    part = str(tmp_path / "part")
    tr = engine.train(cfg_of(colours, f"train.max_steps={stop_at}"), part)
    assert tr.step == stop_at
    engine.train(cfg_of(colours), part)  # resume auto from the max_steps checkpoint
    assert_same(state_of(part), state_of(full))
    lf = [r["loss"] for r in records(full) if r["kind"] == "train"]
    lp = [r["loss"] for r in records(part) if r["kind"] == "train"]
    assert lp == lf


@pytest.mark.slow
def test_two_processes_match_one(colours, tmp_path):
    """2 gloo ranks x batch B == 1 process x 2B (BN removed, deterministic views): the backbone,
    GAN and mining steps with G and D in DDP, the sharded bank and neighbour table."""
    from tests.distutil import train_on_worlds

    args = TINY + [f"data.path={colours}", "aug.crops=[{count: 1, size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0]}]",
                   "aug.flip_p=0", "aug.jitter_p=0", "aug.grey_p=0", "train.lr_batch=16"]
    runs = {}
    for world, (out, ckpt) in train_on_worlds(tmp_path, args, ((1, 16), (2, 8)), what="isl").items():
        states = [load_checkpoint(ckpt, rank=r, world_size=world)["method"] for r in range(world)]
        tables = {k: torch.cat([s[k] for s in states]) for k in ("bank.shard", "table.nbr", "table.sim")}
        recs = records(out)
        runs[world] = ([r["loss"] for r in recs if r["kind"] == "train"], tables,
                       [r for r in recs if r["kind"] == "method"])
    (l1, t1, m1), (l2, t2, m2) = runs[1], runs[2]
    assert len(l1) == len(l2) == 12 and l2 == pytest.approx(l1, rel=1e-4)
    torch.testing.assert_close(t2["bank.shard"], t1["bank.shard"], rtol=1e-4, atol=1e-5)
    assert torch.equal(t2["table.nbr"], t1["table.nbr"])
    assert [(r["stage"], r.get("pairs"), r.get("triplets_kept")) for r in m2] == \
        [(r["stage"], r.get("pairs"), r.get("triplets_kept")) for r in m1]


def test_a_time_based_save_on_an_epochs_last_batch_includes_its_bookkeeping(colours, tmp_path):
    """train.ckpt_minutes tiny: a save at every step. The one on the last batch of GAN epoch 1
    (step 8) is made after that epoch's end_epoch (the stopping rule's update), so a run
    resumed from it ends where the uninterrupted one does."""
    over = ["train.ckpt_minutes=0.000001", "train.ckpt_every=0", "train.keep=100"]
    full = str(tmp_path / "full")
    engine.train(cfg_of(colours, *over), full)
    part = str(tmp_path / "part")
    os.makedirs(os.path.join(part, "checkpoints"))
    name = "ckpt_000000008"
    shutil.copytree(os.path.join(full, "checkpoints", name), os.path.join(part, "checkpoints", name))
    rule = load_checkpoint(os.path.join(part, "checkpoints", name))["method"]["_extra_state"]["rule"]
    assert rule["ema"] is not None  # GAN epoch 1's loss is in the rule
    engine.train(cfg_of(colours, *over), part)
    assert_same(state_of(part), state_of(full))
