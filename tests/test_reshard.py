"""Checkpoints that resume at another world size (issue 12, item 3).

A checkpoint stores, next to each rank's shards, their global row ranges; a rank of another
world size cuts its new block from the saved shards overlapping it. Checked against tables
assembled by hand in the test (no resharding code), and end to end: 2 ranks train, save, and
the run continues at 1 and at 3 ranks with the same global batch.
"""
import json
import os
import shutil

import pytest
import torch

from datagen import make_colour_train_val
from fastinst.train import checkpoint as ck
from fastinst.methods.npid.bank import ShardedMemoryBank
from fastinst.methods.pic.classifier import ShardedClassifier
from fastinst.train.reshard import row_manifest
from tests.distutil import train_on_worlds

N, D = 11, 3


def _full(seed):
    """An N×D table with distinct rows (the reference, built without any shard logic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64).float()


def _bounds(rank, world):  # written out here: first N % W ranks hold one more row
    base, extra = divmod(N, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _save_world(directory, world, bank_full, weight_full, mom_full):
    """Write a checkpoint of ``world`` emulated ranks (rank 0 last, no process group)."""
    for rank in reversed(range(world)):
        s, e = _bounds(rank, world)
        bank = ShardedMemoryBank(N, D, rank=rank, world_size=world)
        clf = ShardedClassifier(N, D, rank=rank, world_size=world)
        with torch.no_grad():
            bank.shard.copy_(bank_full[s:e])
            clf.weight.copy_(weight_full[s:e])
        opt = torch.optim.SGD([clf.weight], lr=0.1, momentum=0.9)
        opt.state[clf.weight]["momentum_buffer"] = mom_full[s:e].clone()
        model = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(model.weight, 0.5)
        payload = {"modules": {"net": model.state_dict(), "classifier": clf.state_dict()},
                   "method": {"bank": bank.state_dict()}, "optimizers": {"classifier": opt.state_dict()},
                   "rng": {"rank": torch.tensor([rank])}, "step": 7}
        payload["row_shards"] = row_manifest(payload, [bank, clf], {"classifier": opt})
        ck.save_checkpoint(directory, 7, payload, rank=rank, world_size=world)
    return ck.checkpoint_path(directory, 7)


@pytest.mark.parametrize("saved,world", [(2, 1), (2, 3), (3, 2), (1, 4)])
def test_rows_are_cut_from_the_overlapping_shards(tmp_path, saved, world):
    bank_full, weight_full, mom_full = _full(1), _full(2), _full(3)
    path = _save_world(str(tmp_path), saved, bank_full, weight_full, mom_full)
    for rank in range(world):
        s, e = _bounds(rank, world)
        p = ck.load_checkpoint(path, rank=rank, world_size=world, any_world=True)
        assert torch.equal(p["method"]["bank"]["shard"], bank_full[s:e])
        assert torch.equal(p["modules"]["classifier"]["weight"], weight_full[s:e])
        assert torch.equal(p["optimizers"]["classifier"]["state"][0]["momentum_buffer"], mom_full[s:e])
        assert torch.equal(p["modules"]["net"]["weight"], torch.full((2, 2), 0.5))  # replicated: as saved
        for rec in (p["method"]["bank"]["_extra_state"], p["modules"]["classifier"]["_extra_state"]):
            assert (rec["rank"], rec["world_size"], rec["start"], rec["end"]) == (rank, world, s, e)
        # RNG: the saved rank's own where it existed, none beyond the saved world
        assert (p["rng"] is None) if rank >= saved else torch.equal(p["rng"]["rank"], torch.tensor([rank]))
        # the resharded layout record loads into a module of the new layout
        bank = ShardedMemoryBank(N, D, rank=rank, world_size=world)
        bank.load_state_dict(p["method"]["bank"])
        assert torch.equal(bank.shard, bank_full[s:e])


def test_other_world_refused_without_any_world_and_old_checkpoints_named(tmp_path):
    path = _save_world(str(tmp_path / "a"), 2, _full(1), _full(2), _full(3))
    with pytest.raises(ck.CheckpointError, match="saved by 2 ranks.*world_size=3"):
        ck.load_checkpoint(path, rank=0, world_size=3)
    old = ck.save_checkpoint(str(tmp_path / "b"), 1, {"rng": None, "step": 1})  # no row manifest
    with pytest.raises(ck.CheckpointError, match="no row manifest.*resume it with 1 ranks"):
        ck.load_checkpoint(old, rank=0, world_size=2, any_world=True)


# ---- end to end: 2 ranks → 1 and 3 ranks ------------------------------------------------------

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.channels_last=false",
    "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small", "model.width=0.25", "model.embed_dim=16",
    "train.lr=0.03", "train.lr_batch=12", "train.milestones=[]", "train.log_every=1", "train.eval_every=0",
    "train.ckpt_every=1", "train.keep=10",
]
METHODS = {
    "npid": ["method.name=npid", "method.npid.K=0", "method.npid.loss=softmax", "method.npid.T=0.1"],  # full softmax over the bank
    "pic": ["method.name=pic", "method.pic.negatives=0", "sampler.kind=sliding_window", "sampler.window=24",
            "sampler.stride=12"],  # LazySGD rows; the global sliding window
    "cmc": ["method.name=cmc", "aug.colorspace=lab", "method.cmc.K=0", "method.cmc.loss=softmax",
            "method.cmc.T=0.1"],  # two banks
}


ROWS = {"npid": ["bank.shard"], "pic": ["classifier.weight"],  # the row tables in the method's state
        "cmc": ["bank_l.shard", "bank_ab.shard"]}


def _table(path, world, method, saved=None):
    """The tables assembled from the rank payloads, in rank order, side by side: the files as
    written (``saved`` None) or cut for ``world`` ranks from a checkpoint of ``saved`` ranks."""
    states = [ck.load_checkpoint(path, rank=r, world_size=world, any_world=saved is not None)["method"]
              for r in range(world)]
    return torch.cat([torch.cat([s[k] for s in states]) for k in ROWS[method]], 1)


def _losses(out, after=0):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train" and r["step"] > after]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_at_one_and_three_ranks_continues_the_two_rank_run(tmp_path, method):
    data = make_colour_train_val(str(tmp_path / "data"), n_train=36)  # 3 steps of 12 per epoch
    args = TINY + METHODS[method] + [f"data.path={data}", "train.epochs=3"]
    (out2, last2), = train_on_worlds(tmp_path / "full", args, [(2, 6)], what="2-rank run").values()
    first = ck.list_complete(os.path.join(out2, "checkpoints"))[0]  # after the first epoch
    saved = _table(first, 2, method)
    ref_losses = _losses(out2, after=torch.load(os.path.join(first, "rank0.pt"))["step"])
    assert len(ref_losses) >= 4
    for world in (1, 3):
        # each rank of the new world gets exactly its block of the saved table
        assert torch.equal(_table(first, world, method, saved=2), saved)
        run = tmp_path / f"w{world}"
        os.makedirs(run / f"w{world}" / "checkpoints")
        shutil.copytree(first, run / f"w{world}" / "checkpoints" / os.path.basename(first))
        # relaunched as torchrun --nnodes=MIN:MAX would: the same command (loader.batch_size=6
        # fits neither world) with loader.global_batch, which sets the per-rank batch
        (out, last), = train_on_worlds(run, args + ["train.resume=auto", "loader.global_batch=12"], [(world, 6)],
                                       what=f"resume at {world} ranks").values()
        # the continued run: the 2-rank run's losses and table (float sums in another order)
        assert _losses(out) == pytest.approx(ref_losses, rel=1e-4), world
        torch.testing.assert_close(_table(last, world, method), _table(last2, 2, method), rtol=1e-4, atol=1e-5)


def test_global_batch_sets_the_per_rank_batch():
    from fastinst.config import ConfigError, for_world, load_config

    cfg = load_config(None, ["loader.global_batch=12", "loader.batch_size=5"])
    assert [for_world(cfg, w).loader.batch_size for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert for_world(load_config(None, ["loader.batch_size=5"]), 3).loader.batch_size == 5  # off: per rank
    with pytest.raises(ConfigError, match="'loader.global_batch': 12 is not divisible by the 5 ranks"):
        for_world(cfg, 5)
