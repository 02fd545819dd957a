"""NPID trainer end to end on tiny real JPEG datasets (CPU, ResNet-18 small stem, 16 px)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from datagen import make_colour_train_val, make_photo_zip
from fastinst.train import engine, trainer
from fastinst.train.checkpoint import find_latest_complete, list_complete, load_checkpoint
from fastinst.config import ConfigError, load_config
from fastinst.methods.npid import NPID
from fastinst.train.build import train_schedule
from fastinst.train.optim import scaled_lr
from fastinst.train.schedule import Clock
from tests.distutil import train_on_worlds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false",
    "aug.crops=[{count: 1, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small",
    "method.npid.K=16", "method.npid.T=0.1",
    "train.epochs=2", "train.lr=0.03", "train.lr_batch=8", "train.milestones=[]", "train.log_every=1",
    "train.eval_every=0",
]


def tiny_cfg(data, *over):
    return load_config(None, TINY + [f"data.path={data}"] + list(over))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def train_losses(out):
    return [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]


def test_short_run_writes_metrics_and_checkpoints(colours, tmp_path, capsys):
    """What a run leaves behind (metrics, evaluations, checkpoints, config) and its progress
    output. That NPID's step descends its loss is tests/test_methods.py's
    ``test_method_trains_through_engine[npid-*]``."""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(colours, "train.epochs=4", "train.eval_every=2", "method.npid.K=0",
                   "method.npid.loss=softmax")
    tr = engine.train(cfg, out)
    printed = capsys.readouterr().out
    # The expected duration, once, from the first logged throughput: 15 steps left after step 1
    # and the kNN evaluations of passes 2 and 4.
    eta = [ln for ln in printed.splitlines() if ln.startswith("expected duration:")]
    assert len(eta) == 1 and " more (15 steps at " in eta[0] and eta[0].endswith("+ 2 kNN evaluation(s))"), eta
    assert all(" run " in ln for ln in printed.splitlines() if ln.startswith("ep ") and " step " in ln)
    recs = read_metrics(out)
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == 4 * 4 and all(math.isfinite(x) for x in losses)
    assert {"step", "epoch", "loss", "lr", "images_per_s", "data_wait"} <= set(recs[0])
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [2, 4]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in evals)
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    assert load_config(os.path.join(out, "config.yaml")) == cfg
    assert [os.path.basename(p) for p in list_complete(os.path.join(out, "checkpoints"))] == \
        ["ckpt_000000008", "ckpt_000000012", "ckpt_000000016"]
    payload = load_checkpoint(find_latest_complete(os.path.join(out, "checkpoints")))
    assert payload["step"] == 16 and payload["loader"]["epoch"] == 4
    assert set(payload) >= {"model", "optimizer", "scaler", "loader", "method", "rng", "config"}
    assert torch.equal(payload["method"]["bank.shard"], tr.method.bank.shard)


def test_resume_reproduces_uninterrupted_run(colours, tmp_path):
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    over = ["method.npid.loss=nce", "method.npid.K=16", "method.npid.z=ema", "train.schedule=cosine",
            "train.warmup_epochs=0.5"]
    straight = engine.train(tiny_cfg(colours, *over), a)
    first = engine.train(tiny_cfg(colours, *over, "train.max_steps=4"), b)  # 1 epoch, then stop
    assert first.step == 4 and (first.loader.epoch, first.loader.next_batch) == (0, 4)
    resumed = engine.train(tiny_cfg(colours, *over), b, resume="auto")
    assert resumed.step == straight.step == 8
    assert train_losses(b) == pytest.approx(train_losses(a), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(resumed.method.bank.shard, straight.method.bank.shard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed.method.criterion.nce.z, straight.method.criterion.nce.z)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _nan_at(monkeypatch, bad_calls):
    """Make NPID.forward return a NaN loss on the given (0-based) calls; record, per step, which
    flag the engine passed to after_step (ok: applied) and whether the bank and Z moved."""
    calls, seen = {"n": 0}, []
    forward, after = NPID.forward, NPID.after_step

    def fwd(self, batch):
        self.z_at_forward = None if self.criterion.nce is None else self.criterion.nce.z.clone()
        out = forward(self, batch)
        if calls["n"] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    def record(self, out, ok):
        before = self.bank.shard.clone()
        after(self, out, ok)
        applied = bool(ok)
        changed = not torch.equal(before, self.bank.shard)
        z_same = self.z_at_forward is None or torch.equal(self.z_at_forward, self.criterion.nce.z)
        seen.append((math.isfinite(float(out["loss"].detach())), applied, changed, z_same))

    monkeypatch.setattr(NPID, "forward", fwd)
    monkeypatch.setattr(NPID, "after_step", record)
    return seen


def test_nonfinite_step_is_skipped(colours, tmp_path, monkeypatch):
    seen = _nan_at(monkeypatch, {0, 5})  # the very first step: Z must not be estimated from it
    out = str(tmp_path / "run")
    tr = engine.train(tiny_cfg(colours, "method.npid.loss=nce"), out)
    assert [s[0] for s in seen] == [i not in (0, 5) for i in range(8)]
    for finite, applied, changed, z_same in seen:
        assert applied == finite and changed == finite  # the bank moves only on finite steps
        assert z_same or finite  # and so does NCE's Z (not estimated from the NaN first step)
    assert not seen[1][3] and torch.isfinite(tr.method.criterion.nce.z) and tr.method.criterion.nce.z > 0
    assert tr.skipped == 1 + 1 and tr.nonfinite == 0 and tr.step == 8
    losses = train_losses(out)
    assert losses[0] is None and losses[5] is None and all(math.isfinite(x) for x in losses[6:])
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_consecutive_nonfinite_stops_and_keeps_checkpoint(colours, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(5, 100)))  # epoch 1 (steps 0-3) is fine, then NaN forever
    out = str(tmp_path / "run")
    with pytest.raises(trainer.NonFiniteLossError, match=r"3 consecutive non-finite.*max_nonfinite=3"):
        engine.train(tiny_cfg(colours, "train.max_nonfinite=3", "train.epochs=3"), out)
    ckpt = find_latest_complete(os.path.join(out, "checkpoints"))
    assert os.path.basename(ckpt) == "ckpt_000000004"
    payload = load_checkpoint(ckpt)
    assert payload["step"] == 4 and payload["nonfinite"] == 0
    assert torch.isfinite(payload["method"]["bank.shard"]).all()
    monkeypatch.undo()
    tr = engine.train(tiny_cfg(colours, "train.epochs=3"), out, resume="auto")  # resumes cleanly
    assert tr.step == 12 and all(math.isfinite(x) for x in train_losses(out))


def test_startup_checks(colours, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.npid\.K.*N=32"):
        engine.train(tiny_cfg(colours, "method.npid.K=32"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"method\.npid\.K.*loss=nce"):
        tiny_cfg(colours, "method.npid.K=0")


def test_dali_backend_smoke(tmp_path):
    pytest.importorskip("nvidia.dali")
    data = make_photo_zip(str(tmp_path / "photos"), n=24, val=8)
    out = str(tmp_path / "run")
    tr = engine.train(tiny_cfg(data, "loader.backend=dali", "loader.device=cpu", "loader.num_threads=1",
                               "train.epochs=1", "train.eval_every=1"), out)
    recs = read_metrics(out)
    assert tr.step == 3 and all(math.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    assert [r["kind"] for r in recs][-1] == "eval"


# With TINY: a run whose losses and bank do not depend on the world size at a fixed global batch
# of 16 (also tests/test_two_node.py's)
SAME_ON_ANY_WORLD = [
    "train.lr_batch=16", "train.eval_every=2", "method.npid.loss=nce",
    "method.npid.K=8", "method.npid.negatives=shared",  # order-free: ranks gather rows in another order
    "aug.crops=[{count: 1, size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0]}]",  # deterministic views
    "aug.flip_p=0", "aug.jitter_p=0", "aug.grey_p=0"]


@pytest.mark.slow
def test_two_processes_match_one(colours, tmp_path):
    """2 gloo ranks x batch B == 1 process x batch 2B: same global batches (EpochSampler
    'global' ownership splits one permutation rank::world), same losses, same sharded bank."""
    runs = {}
    for world, (out, ckpt) in train_on_worlds(tmp_path, TINY + [f"data.path={colours}"] + SAME_ON_ANY_WORLD,
                                              ((1, 16), (2, 8))).items():
        bank = torch.cat([load_checkpoint(ckpt, rank=i, world_size=world)["method"]["bank.shard"]
                          for i in range(world)])
        runs[world] = (read_metrics(out), bank)
    (m1, bank1), (m2, bank2) = runs[1], runs[2]
    l1 = [r["loss"] for r in m1 if r["kind"] == "train"]
    l2 = [r["loss"] for r in m2 if r["kind"] == "train"]
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-4)
    torch.testing.assert_close(bank2, bank1, rtol=1e-4, atol=1e-5)
    e1, e2 = ([r for r in m if r["kind"] == "eval"][-1] for m in (m1, m2))
    assert e1["knn_top1"] == e2["knn_top1"] and e1["knn_top5"] == e2["knn_top5"]


def test_lr_schedule_warmup_step_cosine():
    cfg = load_config(None, ["train.epochs=10", "train.milestones=[4, 8]", "train.warmup_epochs=1", "train.lr=0.1",
                             "train.lr_batch=256", "loader.batch_size=64"])
    t = cfg.train
    lr0 = scaled_lr(t.lr, t.lr_batch, cfg.loader.batch_size, world=8)  # global batch 512 -> 2x the quoted lr
    assert lr0 == pytest.approx(0.2)
    sched = train_schedule(cfg, lr0, 10, Clock(10, [t.epochs]))
    lrs = [sched(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.02) and lrs[9] == pytest.approx(0.2)  # linear warm-up over epoch 0
    assert lrs[39] == pytest.approx(0.2) and lrs[40] == pytest.approx(0.02) and lrs[80] == pytest.approx(0.002)
    cos = load_config(None, ["train.epochs=10", "train.schedule=cosine", "train.milestones=[]"])
    sched = train_schedule(cos, 1.0, 10, Clock(10, [cos.train.epochs]))
    lrs = [sched(s) for s in range(101)]
    assert lrs[0] == 1.0 and lrs[50] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("override, match", [
    ("method.npid.loss=hinge", r"'method\.npid\.loss': must be one of \['nce', 'softmax'\]"),
    ("method.npid.T=0", r"'method\.npid\.T': temperature must be > 0"),
    ("method.name=byol", r"'method\.name': must be one of \['npid', 'pic', 'moco', 'simclr', 'cmc', 'isl'\]"),
    ("model.arch=vgg16", r"'model\.arch': must be one of"),
    ("model.amp=fp8", r"'model\.amp'"),
    ("train.milestones=[160, 120]", r"'train\.milestones': must be positive epochs in increasing order"),
    ("train.warmup_epochs=300", r"'train\.warmup_epochs'"),
    ("eval.features=both", r"'eval\.features': must be one of \['bank', 'recompute'\]"),
    ("train.lr_rate=1", r"unknown config key 'train\.lr_rate'"),
])
def test_training_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_shipped_npid_configs_match_the_seeds():
    r50 = load_config(os.path.join(ROOT, "configs", "npid_imagenet_r50.yaml"))
    n = r50.method.npid
    assert (n.K, n.T, n.momentum, n.loss) == (4096, 0.07, 0.5, "nce")
    t = r50.train
    assert (t.lr, t.lr_batch, t.epochs, t.milestones, t.weight_decay) == (0.03, 256, 200, (120, 160), 1e-4)
    assert (r50.aug.crops[0].scale, r50.aug.jitter, r50.aug.jitter_p, r50.aug.grey_p, r50.aug.blur_p) == \
        ((0.2, 1.0), (0.4,) * 4, 1.0, 0.2, 0.0)
    fm = load_config(os.path.join(ROOT, "configs", "npid_fmnist.yaml"))
    assert (fm.method.npid.K, fm.method.npid.loss, fm.method.npid.T, fm.train.weight_decay) == (0, "softmax", 0.1, 5e-4)
    assert fm.aug.crops[0].size == fm.aug.eval_crop == 28 and fm.eval.at_start


def test_compute_threads_are_this_processes_share_of_the_cores():
    """Without OMP_NUM_THREADS each process takes cores / local ranks intra-op threads (one
    process per node on a shared machine must not take every core); with it, nothing changes."""
    code = ("import os, torch; from fastinst.core.runtime import set_compute_threads; "
            "line = set_compute_threads(int(os.environ['LOCAL'])); print(torch.get_num_threads(), '|', line)")
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for local in (1, 2, 64):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "LOCAL": str(local)}, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        n, line = out.split("|")
        assert int(n) == max(1, cores // local) and f"{cores} cores available / {local} local rank(s)" in line
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LOCAL": "1", "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("1 |") and "OMP_NUM_THREADS=1" in out


def _launch_train(cfg_path, out, *over):
    return [sys.executable, os.path.join(ROOT, "launch.py"), "train", "--config", cfg_path, "--out", out, *over]


def test_sigterm_saves_mid_epoch_exits_0_and_resumes_to_the_same_run(colours, tmp_path):
    """SIGTERM mid-epoch: the step finishes, a checkpoint is written at the next log step, the
    process exits 0; resuming finishes with the bank and weights of the uninterrupted run."""
    import signal

    from fastinst.config import save_config

    cfg_path = str(tmp_path / "c.yaml")
    save_config(tiny_cfg(colours, "train.epochs=3", "method.npid.loss=nce"), cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = str(tmp_path / "straight")
    subprocess.run(_launch_train(cfg_path, straight), env=env, cwd=ROOT, check=True, capture_output=True, timeout=300)
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen(_launch_train(cfg_path, cut), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ep 2/3") and "step 6 (" in line:  # mid-epoch 2 (4 steps per epoch)
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(lines[-20:])
    said = [ln for ln in lines if ln.startswith("preempted (signal): checkpoint")]
    assert len(said) == 1, "".join(lines[-20:])
    step = int(said[0].split(" at step ")[1].split()[0])
    assert 6 <= step < 12 and step % 4 != 0, said  # mid-epoch, after the signal, before the end
    assert os.path.basename(find_latest_complete(os.path.join(cut, "checkpoints"))) == f"ckpt_{step:09d}"
    subprocess.run(_launch_train(cfg_path, cut), env=env, cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, b = (load_checkpoint(find_latest_complete(os.path.join(d, "checkpoints"))) for d in (straight, cut))
    assert a["step"] == b["step"] == 12
    torch.testing.assert_close(b["method"]["bank.shard"], a["method"]["bank.shard"], rtol=1e-5, atol=1e-6)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_time_based_saves_land_between_epochs(colours, tmp_path):
    out = str(tmp_path / "run")
    tr = engine.train(tiny_cfg(colours, "train.ckpt_minutes=0.000001", "train.keep=20"), out)
    steps = sorted(int(d.split("_")[1]) for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("ckpt_"))
    assert steps == list(range(1, 9)) and not tr.preempted  # every log step (log_every=1), and it ran to the end


def _children(pid: int):
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _local_rank(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"LOCAL_RANK"])
    except (OSError, KeyError, ValueError):
        return None


@pytest.mark.slow
def test_elastic_restart_after_a_killed_worker_resumes_to_the_same_run(colours, tmp_path):
    """torchrun --max-restarts=2, 2 gloo ranks: rank 1 SIGKILLed in epoch 2; torchrun restarts the
    group, every rank resumes from the newest complete checkpoint (train.resume=auto) and the run
    ends with the bank and weights of an uninterrupted 2-rank run."""
    import signal

    from fastinst.config import save_config

    cfg_path = str(tmp_path / "c.yaml")
    save_config(tiny_cfg(colours, "train.epochs=3", "loader.batch_size=4", "train.lr_batch=8"), cfg_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2"]
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    subprocess.run(run + _launch_train(cfg_path, straight)[1:], env=env, cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen(run + _launch_train(cfg_path, cut)[1:], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, killed = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed is None and line.startswith("ep 2/3") and "step 6 (" in line:
                # torchrun -> its agent process tree -> the workers; rank 1 is the one with LOCAL_RANK=1
                parent, frontier = {}, [proc.pid]
                while frontier:
                    kids = [(c, p) for p in frontier for c in _children(p)]
                    parent.update(kids)
                    frontier = [c for c, _ in kids]
                # the worker itself, not its DataLoader workers (forked children with its environment)
                victims = [p for p in parent if _local_rank(p) == 1 and _local_rank(parent[p]) != 1]
                assert victims, "no worker with LOCAL_RANK=1 found"
                killed = victims[0]
                os.kill(killed, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert killed is not None and "resumed from" in text and "ckpt_000000004" in text.split("resumed from", 1)[1]
    a, b = (load_checkpoint(find_latest_complete(os.path.join(d, "checkpoints")), rank=1, world_size=2)
            for d in (straight, cut))
    assert a["step"] == b["step"] == 12
    torch.testing.assert_close(b["method"]["bank.shard"], a["method"]["bank.shard"], rtol=1e-5, atol=1e-6)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
