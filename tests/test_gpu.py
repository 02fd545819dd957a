"""GPU tests (``pytest -m gpu``; skipped without CUDA): the paths only a GPU executes.

- DALI ``device='mixed'`` decoding (nvJPEG / the hardware decoder) and the ``feed_ndarray``
  hand-off against the same graph decoded on the CPU;
- the fused Triton bank update on CUDA against the torch path;
- one bf16 autocast, channels-last training step of every method through the engine;
- a 1-process NCCL group running ``launch.py train`` under torchrun.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from datagen import make_colour_train_val, make_photo_zip
from fastinst.train import engine, trainer
from fastinst.config import load_config
from fastinst.methods.npid.bank import ShardedMemoryBank

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=32, val=8)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


def test_mixed_decode_matches_cpu_decode(photos):
    """The eval transform (resize + centre crop, no randomness) of every image, decoded on the GPU
    and on the CPU: the same samples in the same order, pixels equal within JPEG decoder
    tolerance (nvJPEG and libjpeg-turbo differ in IDCT and chroma-upsampling rounding)."""
    pytest.importorskip("nvidia.dali")
    from loaders import build_loader

    views, index = {}, {}
    for device in ("gpu", "cpu"):
        cfg = load_config(None, [f"data.path={photos}", "loader.backend=dali", f"loader.device={device}",
                                 "loader.batch_size=8", "aug.eval_resize=96", "aug.eval_crop=80"])
        loader = build_loader(cfg, "train", mode="eval")
        batches = list(loader)
        loader.close()
        views[device] = torch.cat([b["views"][0].float().cpu() for b in batches])  # [32, 3, 80, 80]
        index[device] = torch.cat([b["index"] for b in batches])
        if device == "gpu":
            assert batches[0]["views"][0].is_cuda
    assert torch.equal(index["gpu"], index["cpu"]) and len(index["gpu"]) == 32
    std = torch.tensor(load_config(None).aug.std).view(1, 3, 1, 1)
    levels = (views["gpu"] - views["cpu"]).abs() * std * 255  # back to 8-bit grey levels
    assert float(levels.mean()) <= 2.0, float(levels.mean())
    assert float(levels.quantile(0.99)) <= 16.0, float(levels.quantile(0.99))


def test_torch_loader_normalises_uint8_on_the_gpu_like_the_cpu(photos):
    """The torchvision loader on a GPU ships uint8 views from pinned memory and normalises them
    there: the same tensors as the CPU path's normalisation in the workers."""
    from loaders import build_loader

    views = {}
    for device in ("gpu", "cpu"):
        cfg = load_config(None, [f"data.path={photos}", "loader.backend=torch", f"loader.device={device}",
                                 "loader.batch_size=8", "loader.num_workers=2", "aug.eval_resize=96",
                                 "aug.eval_crop=80"])
        loader = build_loader(cfg, "train", mode="eval")
        batches = list(loader)
        loader.close()
        assert batches[0]["views"][0].is_cuda == (device == "gpu")
        views[device] = torch.cat([b["views"][0].cpu() for b in batches])
    torch.testing.assert_close(views["gpu"], views["cpu"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_triton_update_matches_torch_path_on_cuda(dtype, tol):
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 4099, (512,), generator=g).cuda()
    index[1] = index[0]  # a repeated row: averaged first
    feats = torch.nn.functional.normalize(torch.randn(512, 128, generator=g), dim=1).cuda()
    banks = {k: ShardedMemoryBank(4099, 128, 0.5, rank=1, world_size=3, dtype=dtype, device="cuda", seed=3, kernel=k)
             for k in ("triton", "torch")}
    before = banks["triton"].shard.clone()
    for _ in range(3):
        for b in banks.values():
            b.update(index, feats.to(dtype))
    diff = (banks["triton"].shard.float() - banks["torch"].shard.float()).abs().max()
    assert float(diff) <= tol
    assert not torch.equal(before, banks["triton"].shard)  # it did update owned rows


METHODS = [["method.name=npid", "method.npid.K=16"],
           ["method.name=npid", "method.npid.K=0", "method.npid.loss=softmax"],
           ["method.name=pic", "aug.crops=[{count: 1, size: 32}, {count: 2, size: 16}]"],
           ["method.name=pic", "method.pic.negatives=8", "method.pic.sampling=uniform",
            "aug.crops=[{count: 1, size: 32}, {count: 2, size: 16}]"],
           ["method.name=moco", "method.moco.K=32", "aug.crops=[{count: 2, size: 32}]"],
           ["method.name=simclr", "train.optimizer=lars", "aug.crops=[{count: 2, size: 32}]"],
           ["method.name=cmc", "aug.colorspace=lab", "method.cmc.K=16"]]


@pytest.mark.parametrize("over", METHODS, ids=["npid-nce", "npid-softmax", "pic", "pic-sampled", "moco", "simclr", "cmc"])
def test_bf16_channels_last_step_of_every_method(colours, tmp_path, over):
    cfg = load_config(None, [f"data.path={colours}", "loader.backend=torch", "loader.num_workers=1",
                             "loader.batch_size=8", "aug.crops=[{count: 1, size: 32}]", "aug.eval_resize=32",
                             "aug.eval_crop=32", "model.arch=resnet18", "model.amp=bf16", "model.channels_last=true",
                             "train.epochs=1", "train.lr_batch=8", "train.log_every=1", "train.eval_every=1",
                             "train.milestones=[]"] + over)
    tr = engine.train(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(ln) for ln in f]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert tr.amp == "bf16" and len(losses) == 4 and all(x is not None for x in losses), losses
    conv = tr.model.backbone.conv1.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(p).all() for m in tr.method.trained_modules().values() for p in m.parameters())
    assert [r for r in recs if r["kind"] == "eval"][-1]["knn_top1"] >= 0


@pytest.mark.parametrize("name", ["sgd (fused)", "adam (fused)", "lars"])
def test_gated_optimiser_step_skips_exactly_on_cuda(name):
    from test_guard import check_gated_step

    check_gated_step(name, "cuda")


@pytest.mark.parametrize("method", ["npid", "moco", "simclr"])
def test_no_host_sync_in_a_training_step(colours, tmp_path, method):
    """bf16, channels-last: ``torch.cuda.set_sync_debug_mode("error")`` around three engine
    steps (one of them non-finite) raises on any synchronising call; the NaN step changes
    nothing. (PIC syncs by design: its sampled column set has a data-dependent size.)"""
    from test_guard import _batches, _everything, _trainer

    tr = _trainer(colours, tmp_path, method, "model.amp=bf16", "model.channels_last=true")
    try:
        stage = tr.stages[0]
        trainer.enter_stage(tr, stage)
        batches = [{**b, "index": b["index"].cuda(), "views": [v.cuda() for v in b["views"]]}
                   for b in _batches(tr, 4)]
        trainer.run_step(tr, stage, batches[0], 0)  # warm-up: lazy allocations, cuDNN plans
        torch.cuda.synchronize()
        forward = type(tr.method).forward

        def nan_forward(self, batch):
            out = forward(self, batch)
            return {**out, "loss": out["loss"] * float("nan")}

        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.run_step(tr, stage, batches[1], 0)
            torch.cuda.set_sync_debug_mode(0)
            before = _everything(tr)
            torch.cuda.set_sync_debug_mode("error")
            tr.method.forward = nan_forward.__get__(tr.method)
            trainer.run_step(tr, stage, batches[2], 0)
            del tr.method.forward
        finally:
            torch.cuda.set_sync_debug_mode(0)
        after = _everything(tr)
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
        assert tr.skipped == 1
    finally:
        tr.close_loaders()


def test_one_process_nccl_group_trains(colours, tmp_path):
    """launch.py train under torchrun (1 process): a NCCL process group, DDP, the DALI GPU
    loader when DALI imports (the torch loader otherwise), a checkpoint."""
    dali = subprocess.run([sys.executable, "-c", "import nvidia.dali"], capture_output=True).returncode == 0
    out = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "launch.py", "train",
           "--config", os.path.join(ROOT, "configs", "npid_fmnist.yaml"), "--out", out, f"data.path={colours}",
           f"loader.backend={'dali' if dali else 'torch'}", "loader.batch_size=8", "train.max_steps=3",
           "train.log_every=1", "train.eval_every=0", "eval.at_start=false", "method.npid.K=16",
           "method.npid.loss=nce", "aug.crops=[{count: 1, size: 32}]", "aug.eval_crop=32", "aug.eval_resize=32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world=1" in proc.stdout and "device=cuda" in proc.stdout
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert len(losses) == 3 and all(x is not None for x in losses)
    assert os.path.isfile(os.path.join(out, "checkpoints", "ckpt_000000003", "COMPLETE"))


def test_dali_gpu_mixture_and_randaugment_match_the_cpu_graph():
    """The image mixture and RandAugment graph functions on GPU data (their factors moved to the
    GPU, positions / boxes / matrices read on the CPU) against the same graph on the CPU, on the
    same inputs and draws."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from loaders.dali_graph import mix_view
    from loaders.dali_randaugment import rand_augment
    from loaders.mixture import MixPlans, MixRows
    from loaders.randaugment import RandAugmentParams

    aug = load_config(None, ["aug.crops=[{count: 1, size: 32}]", "aug.mix.kind=im", "aug.mix.g_prob=0.6",
                             "aug.mix.r_prob=0.6", "aug.randaugment.n=3", "aug.randaugment.p=1"]).aug
    b, n = 16, 24
    ops = [[MixPlans(aug, 0, n).plan(0, i, 0)] for i in range(b)]
    found, rows = MixRows(aug.mix).batch(ops)
    rng = np.random.default_rng(0)
    floats = [rng.normal(size=(32, 32, 3)).astype(np.float32) for _ in range(b + len(found))]
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(b)]
    ra = [RandAugmentParams(aug, 0).rows(0, i, 0) for i in range(b)]
    out = {}
    for device in ("gpu", "cpu"):
        @pipeline_def(batch_size=len(floats), num_threads=2, device_id=0 if device == "gpu" else None,
                      enable_conditionals=True)
        def mix_pipe():
            x, m = fn.external_source(source=lambda: (floats, list(rows[:, 0])), num_outputs=2, batch=True,
                                      layout=["HWC", None])
            return mix_view(x.gpu(), m, aug.mix, MixRows(aug.mix), "HWC", m.gpu()) if device == "gpu" else \
                mix_view(x, m, aug.mix, MixRows(aug.mix), "HWC")

        @pipeline_def(batch_size=b, num_threads=2, device_id=0 if device == "gpu" else None, enable_conditionals=True)
        def ra_pipe():
            x, r = fn.external_source(source=lambda: (images, ra), num_outputs=2, batch=True, layout=["HWC", None])
            return rand_augment(x.gpu(), r, aug.randaugment, 32, r.gpu()) if device == "gpu" else \
                rand_augment(x, r, aug.randaugment, 32)

        res = []
        for make in (mix_pipe, ra_pipe):
            p = make()
            p.build()
            tl = p.run()[0]
            tl = tl.as_cpu() if device == "gpu" else tl
            res.append([np.array(tl[i]) for i in range(len(tl))])
        out[device] = res
    for g, c in zip(out["gpu"][0][:b], out["cpu"][0][:b]):
        np.testing.assert_allclose(g, c, rtol=0, atol=1e-5)
    diffs = [np.abs(g.astype(np.int32) - c.astype(np.int32)) for g, c in zip(*(out[d][1] for d in ("gpu", "cpu")))]
    assert max(float(d.mean()) for d in diffs) <= 0.5 and max(int(np.quantile(d, 0.99)) for d in diffs) <= 2


def test_dali_gpu_loader_with_mixture_and_randaugment(photos):
    pytest.importorskip("nvidia.dali")
    from loaders import build_loader

    cfg = load_config(None, [f"data.path={photos}", "loader.backend=dali", "loader.device=gpu", "loader.batch_size=8",
                             "aug.crops=[{count: 2, size: 64}]", "aug.mix.kind=im", "aug.mix.g_prob=0.5",
                             "aug.mix.r_prob=0.5", "aug.randaugment.n=2", "loader.fp16=true"])
    loader = build_loader(cfg, "train")
    batches = list(loader)
    loader.close()
    assert len(batches) == 4 and sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(32))
    for b in batches:
        assert all(v.is_cuda and v.dtype == torch.float16 and v.shape == (8, 3, 64, 64) for v in b["views"])
        assert all(bool(torch.isfinite(v).all()) for v in b["views"])
