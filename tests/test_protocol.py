"""The method protocol through the engine, with the toy methods of tests/toy_methods.py: two
trained encoders (DDP all-reduce, checkpoints, BatchNorm restored on a skipped step, 2
processes == 1), and two stages (a frozen module stays bit-identical, an Adam on its own
schedule, resume in the middle of the second stage == uninterrupted)."""
import json
import math
import os

import pytest
import torch

from datagen import make_colour_train_val
from fastinst.train import engine
from fastinst.train.build import build_encoder
from fastinst.train.checkpoint import find_latest_complete, list_complete, load_checkpoint
from fastinst.config import load_config
from fastinst.core.runtime import DistEnv
from tests.distutil import train_on_worlds
from toy_methods import TwoEncoders, register_toys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false",
    "aug.crops=[{count: 2, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small", "model.width=0.25", "model.embed_dim=32",
    "train.epochs=1", "train.lr=0.05", "train.lr_batch=8", "train.milestones=[]", "train.log_every=1",
    "train.eval_every=0", "train.schedule=cosine",
]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


@pytest.fixture
def toys(monkeypatch):
    register_toys(monkeypatch)


def tiny_cfg(data, *over):
    return load_config(None, TINY + [f"data.path={data}"] + list(over))


def records(out, kind="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def modules_at(out, step=None):
    """The trained modules of the checkpoint at ``step`` (the newest when None), rank 0's file."""
    d = os.path.join(out, "checkpoints")
    path = find_latest_complete(d) if step is None else os.path.join(d, f"ckpt_{step:09d}")
    return load_checkpoint(path)


# ---- two trained encoders ------------------------------------------------------------------


@pytest.mark.slow
def test_two_encoders_two_processes_match_one(colours, tmp_path):
    """2 gloo ranks x batch 4 == 1 process x batch 8 (BN removed, views deterministic): the same
    losses, and after 2 epochs the same weights of both encoders, which happens only if DDP
    all-reduces both encoders' gradients; both are in every rank's checkpoint, identical."""
    over = ["method.name=toy2enc", "train.epochs=2", "aug.crops=[{count: 2, size: 16, scale: [1.0, 1.0], "
            "ratio: [1.0, 1.0]}]", "aug.flip_p=0", "aug.jitter_p=0", "aug.grey_p=0"]
    runs = {}
    for world, (out, ckpt) in train_on_worlds(tmp_path, TINY + [f"data.path={colours}"] + over,
                                              ((1, 8), (2, 4)), what="toy2enc").items():
        states = [load_checkpoint(ckpt, rank=r, world_size=world) for r in range(world)]
        runs[world] = ([r["loss"] for r in records(out)], states)
    (l1, (s1,)), (l2, (s2a, s2b)) = runs[1], runs[2]
    assert len(l1) == len(l2) == 8 and l2 == pytest.approx(l1, rel=1e-4)
    for name in ("encoder", "other"):
        for k, v in s1["modules"][name].items():
            torch.testing.assert_close(s2a["modules"][name][k], v, rtol=1e-4, atol=1e-6)
            assert torch.equal(s2a["modules"][name][k], s2b["modules"][name][k])  # DDP replicas
    enc, oth = s1["modules"]["encoder"], s1["modules"]["other"]
    assert any(not torch.equal(enc[k], oth[k]) for k in enc)  # two distinct encoders


def test_two_encoders_checkpointed_and_bn_restored_on_a_skipped_step(colours, tmp_path, toys, monkeypatch):
    """With BatchNorm: a NaN loss at step 2 leaves both encoders' BN statistics as they were
    before the step (each finite step moves them), and the checkpoint holds both encoders."""
    forward = TwoEncoders.forward
    calls = {"n": 0}

    def nan_at_2(self, batch):
        out = forward(self, batch)
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(TwoEncoders, "forward", nan_at_2)
    out = str(tmp_path / "run")
    tr = engine.train(tiny_cfg(colours, "method.name=toy2enc"), out)
    assert tr.method.bn_events == [(True, False), (True, False), (False, True), (True, False)]
    assert tr.skipped == 1 and [r["loss"] is None for r in records(out)] == [False, False, True, False]
    saved = modules_at(out)["modules"]
    assert set(saved) == {"encoder", "other"}
    for name, net in tr.method.trained_modules().items():
        mine = engine.unwrap(net).state_dict()
        assert set(saved[name]) == set(mine) and all(torch.equal(saved[name][k], mine[k]) for k in mine)


# ---- two stages ---------------------------------------------------------------------------------


STAGES = ["method.name=toy2stage", "method.toy2stage.head_lr=0.02", "train.ckpt_every=1", "train.keep=5"]


def test_two_stages_freeze_the_backbone_and_follow_their_own_schedules(colours, tmp_path, toys):
    """Stage 'backbone' (1 pass = 4 steps): SGD on the train.* cosine; stage 'head' (4 steps):
    the encoder frozen (bit-identical weights and BN statistics), Adam on its own cosine."""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(colours, *STAGES)
    tr = engine.train(cfg, out)
    assert [s.name for s in tr.stages] == ["backbone", "head"] and tr.step == 8
    recs = records(out)
    assert [r["stage"] for r in recs] == ["backbone"] * 4 + ["head"] * 4
    lr0 = 0.05 * 8 / 8
    for k, r in enumerate(recs[:4]):  # cosine over the backbone's 4 steps
        assert r["lrs"] == {"model": pytest.approx(lr0 * 0.5 * (1 + math.cos(math.pi * k / 4)))}
    for k, r in enumerate(recs[4:]):  # the head's own cosine, counted from its first step
        assert r["lrs"] == {"head": pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * k / 4)))}
    assert tr.optimizers["head"].param_groups[0]["lr"] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert type(tr.optimizers["head"]).__name__ == "Adam" and tr.opt_steps == {"model": 4, "head": 4}
    after_1, after_2 = modules_at(out, 4)["modules"], modules_at(out, 8)["modules"]
    enc1, enc2 = after_1["encoder"], after_2["encoder"]
    assert all(torch.equal(enc1[k], enc2[k]) for k in enc1)  # weights and BN statistics
    assert any(not torch.equal(after_1["head"][k], after_2["head"][k]) for k in after_1["head"])
    init = build_encoder(cfg, DistEnv()).state_dict()
    assert any(not torch.equal(init[k], enc1[k]) for k in init)  # stage 1 did train it


def test_resume_in_the_second_stage_reproduces_the_uninterrupted_run(colours, tmp_path, toys):
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = engine.train(tiny_cfg(colours, *STAGES), a)
    first = engine.train(tiny_cfg(colours, *STAGES, "train.max_steps=6"), b)  # 2 steps into stage 2
    assert first.step == 6 and [os.path.basename(p) for p in list_complete(os.path.join(b, "checkpoints"))] == \
        ["ckpt_000000004", "ckpt_000000006"]
    resumed = engine.train(tiny_cfg(colours, *STAGES), b, resume="auto")
    assert resumed.step == straight.step == 8 and resumed.opt_steps == straight.opt_steps
    la, lb = ([(r["step"], r["stage"], r["loss"], r["lrs"]) for r in records(d)] for d in (a, b))
    assert [x[:2] for x in lb] == [x[:2] for x in la] and [x[3] for x in lb] == [x[3] for x in la]
    assert [x[2] for x in lb] == pytest.approx([x[2] for x in la], rel=1e-5, abs=1e-6)
    for name in ("encoder", "head"):
        sa = engine.unwrap(straight.method.trained_modules()[name]).state_dict()
        sb = engine.unwrap(resumed.method.trained_modules()[name]).state_dict()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)
    adam_a, adam_b = straight.optimizers["head"].state_dict()["state"], resumed.optimizers["head"].state_dict()["state"]
    assert set(adam_a) == set(adam_b) and adam_a
    for i in adam_a:
        for k in adam_a[i]:
            torch.testing.assert_close(adam_b[i][k], adam_a[i][k], rtol=1e-5, atol=1e-6)
