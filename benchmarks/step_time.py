"""Training-step throughput of every method on in-device synthetic images (no loader), with
side-by-side ratios measured in the same run:

- images/s of one training step per method config (NPID, InstDisc, PIC, MoCo v2, SimCLR: the
  shipped ImageNet ResNet-50 recipes unless ``--configs`` says otherwise);
- NPID's bank + loss share of the step: the NPID step against the same network, views and
  optimiser with a trivial loss (the embedding mean) in place of the method;
- PIC's step with the full softmax over N rows against negative sampling (``--pic-negatives``
  rows shared by the batch + LazySGD's correction) at N = ``--num-samples`` (1.28M default);
- the memory-bank momentum update: the fused Triton kernel against the plain torch
  index_select / index_copy_ path (CUDA only; on the CPU only the torch path runs).

Every case runs ``fastinst.train.trainer.train_step`` — the trainer's own step — so the numbers are
the trainer's, minus data loading (``launch.py profile`` measures the loader; the ratio of
the two is the end-to-end check).

    python benchmarks/step_time.py --out benchmarks/results/h100_step_time          # GPU
    python benchmarks/step_time.py --out /tmp/st --arch resnet18 --max-size 32 \\
        --batch 4 --num-samples 1000 --pic-negatives 64 --steps 2 --warmup 1 \\
        --set method.npid.K=64 method.moco.K=64                                     # CPU smoke

Writes OUT.json and OUT.md (a table naming the device).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fastinst.train import build, trainer  # noqa: E402
from fastinst.core.runtime import init_distributed  # noqa: E402
from fastinst.config import load_config  # noqa: E402
from fastinst.methods.npid.bank import ShardedMemoryBank  # noqa: E402
from fastinst.core.model import make_grad_scaler  # noqa: E402
from fastinst.methods.base import Method, embed_views  # noqa: E402

DEFAULT_CONFIGS = ["npid_imagenet_r50", "instdisc_imagenet_r50", "pic_imagenet_r50", "mocov2_imagenet_r50",
                   "simclr_imagenet_r50", "cmc_imagenet_r50v1_lab"]
IMAGENET_N = 1281167


class EmbeddingMean(Method):
    """The baseline 'method': the same views through the same model, loss = mean embedding
    (no bank, no softmax), so NPID's step minus this step is what the bank and the loss cost."""

    def __init__(self, encoder):
        super().__init__(encoder=encoder)

    def forward(self, batch: dict) -> dict:
        feats = embed_views(self.nets["encoder"], batch["views"])
        return {"loss": torch.stack([f.float().mean() for f in feats]).mean()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batches(cfg, n: int, device, count: int = 4) -> List[dict]:
    """``count`` batches of random views in the loader's output format (NCHW, channels-last
    strides when the loader would give them, fp16 when loader.fp16) and random indices."""
    g = torch.Generator().manual_seed(0)
    b = cfg.loader.batch_size
    dtype = torch.float16 if cfg.loader.fp16 else torch.float32
    fmt = torch.channels_last if cfg.loader.channels_last else torch.contiguous_format
    views = [torch.randn(b, 3, c.size, c.size, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
             for c in cfg.aug.view_crops]
    return [{"views": views, "index": torch.randint(n, (b,), generator=g).to(device),
             "label": torch.zeros(b, dtype=torch.long, device=device)} for _ in range(count)]


def time_case(name: str, cfg, n: int, env, steps: int, warmup: int, baseline: bool = False) -> Dict:
    """Median / mean wall time of ``steps`` training steps after ``warmup``."""
    if baseline:
        method = EmbeddingMean(build.build_encoder(cfg, env))
        method.wrap(lambda m: env.wrap_ddp(m.to(env.device)))
    else:
        method = build.build_method(cfg, env, n)
    plan = build.build_plan(cfg, env, method, steps_per_epoch=max(1, n // (cfg.loader.batch_size * env.world)))
    stage = plan.stages[0]
    optimizers = {name: plan.optimizers[name] for name in stage.optimizers}  # at the base lr
    amp = build.resolve_amp(cfg, env.device)
    scaler = make_grad_scaler(amp, env.device.type)
    batches = synthetic_batches(cfg, n, env.device)
    for m in method.trained_modules().values():
        m.train()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        method.before_step(i)
        sync(env.device)
        t0 = time.perf_counter()
        out, loss, ok = trainer.train_step(method, optimizers, scaler, amp, env.device.type, batch, stage.step)
        method.after_step(out, ok)
        sync(env.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not bool(ok):  # read after the timed interval
            raise RuntimeError(f"{name}: non-finite loss {float(loss)} at step {i}")
    b = cfg.loader.batch_size
    med = statistics.median(times)
    res = {"name": name, "config": cfg.name, "method": "embedding-mean baseline" if baseline else cfg.method.name,
           "arch": cfg.model.arch, "amp": amp, "batch": b, "world": env.world,
           "views": [f"{c.count}x{c.size}" for c in cfg.aug.crops], "num_samples": n, "steps": steps,
           "step_ms_median": 1000 * med, "step_ms_mean": 1000 * statistics.fmean(times),
           "images_per_s": b * env.world / med}
    del method, plan, optimizers
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"  {name:<28} {res['step_ms_median']:9.2f} ms/step  {res['images_per_s']:9.1f} img/s", flush=True)
    return res


def time_bank_update(n: int, batch: int, device, steps: int, warmup: int) -> Dict:
    """ShardedMemoryBank.update on N rows with a batch of random rows: Triton vs torch."""
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(n, (batch,), generator=g).to(device) for _ in range(4)]
    feats = [torch.nn.functional.normalize(torch.randn(batch, 128, generator=g), dim=1).to(device) for _ in range(4)]
    out = {"num_rows": n, "batch": batch}
    for kernel in ("triton", "torch"):
        if kernel == "triton" and device.type != "cuda":
            out[kernel] = None  # the Triton path is for CUDA (CPU runs it only interpreted, in tests)
            continue
        bank = ShardedMemoryBank(n, 128, 0.5, device=device, kernel=kernel)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            bank.update(idx[i % 4], feats[i % 4])
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times)
        # Bytes the update must move: per batch row, the old bank row read and the new one
        # written (storage dtype) and the fp32 feature read; index traffic is negligible.
        moved = batch * 128 * (2 * bank.shard.element_size() + 4)
        out[kernel] = {"ms_median": ms, "gb_per_s": moved / (ms / 1000) / 1e9}
        del bank
    print(f"  bank update ({n} rows, batch {batch}): "
          + ", ".join(f"{k} {v['ms_median']:.3f} ms" for k, v in out.items() if isinstance(v, dict)), flush=True)
    return out


def copy_bandwidth(device, steps: int = 10) -> Dict:
    """Device-to-device copy of a large buffer: GB/s counting bytes read and written, the
    ceiling a memory-bound kernel is compared with (measured, not the datasheet)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)  # bytes: 1 GiB on a GPU, 64 MiB on the CPU
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    gbs = 2 * n / statistics.median(times) / 1e9
    print(f"  copy bandwidth: {gbs:.1f} GB/s (read + write, {n >> 20} MiB)", flush=True)
    return {"bytes": n, "gb_per_s": gbs}


def run(args) -> Dict:
    env = init_distributed()
    torch.backends.cudnn.benchmark = True
    common = ([f"loader.batch_size={args.batch}"] if args.batch else []) + list(args.set)
    if args.arch:
        common.append(f"model.arch={args.arch}")
    cases, by_name = [], {}

    def load(name: str, extra=()):
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), common + list(extra))
        if args.max_size:  # CPU smoke runs: same views, smaller images (replace() re-runs the checks)
            crops = tuple(dataclasses.replace(c, size=min(c.size, args.max_size)) for c in cfg.aug.crops)
            cfg = dataclasses.replace(cfg, aug=dataclasses.replace(cfg.aug, crops=crops))
        return cfg

    def add(res):
        cases.append(res)
        by_name[res["name"]] = res

    print(f"device: {device_name(env.device)}; torch {torch.__version__}; N = {args.num_samples}", flush=True)
    for name in args.configs:
        extra = ["method.pic.negatives=0"] if name.startswith("pic") else []
        add(time_case(name, load(name, extra), args.num_samples, env, args.steps, args.warmup))
        if name.startswith("npid"):
            add(time_case(name + " (baseline)", load(name), args.num_samples, env, args.steps, args.warmup,
                          baseline=True))
        if name.startswith("pic") and args.pic_negatives:
            sampled = load(name, [f"method.pic.negatives={args.pic_negatives}"])
            add(time_case(f"{name} (K={args.pic_negatives})", sampled, args.num_samples, env, args.steps, args.warmup))
            if args.pic_large_n:
                add(time_case(f"{name} (K={args.pic_negatives}, N={args.pic_large_n})", sampled, args.pic_large_n,
                              env, args.steps, args.warmup))
    bank_batch = args.batch or load(args.configs[0]).loader.batch_size
    bank = time_bank_update(args.num_samples, bank_batch, env.device, args.steps * 5, args.warmup)
    copy = copy_bandwidth(env.device)

    ratios = {}
    for name in args.configs:
        base = by_name.get(name + " (baseline)")
        if base:
            full = by_name[name]["step_ms_median"]
            ratios[f"{name}: bank + loss share of the step"] = (full - base["step_ms_median"]) / full
        sampled = by_name.get(f"{name} (K={args.pic_negatives})")
        if sampled:
            ratios[f"{name}: full-softmax step / K={args.pic_negatives} step"] = (
                by_name[name]["step_ms_median"] / sampled["step_ms_median"])
        large = by_name.get(f"{name} (K={args.pic_negatives}, N={args.pic_large_n})")
        if sampled and large:
            ratios[f"{name}: K={args.pic_negatives} step at N={args.pic_large_n} / at N={args.num_samples}"] = (
                large["step_ms_median"] / sampled["step_ms_median"])
    for kernel in ("triton", "torch"):
        if bank.get(kernel):
            ratios[f"bank update ({kernel}): GB/s / copy GB/s"] = bank[kernel]["gb_per_s"] / copy["gb_per_s"]
    if bank.get("triton"):
        ratios["bank update: torch path / fused Triton kernel"] = bank["torch"]["ms_median"] / bank["triton"]["ms_median"]
    return {"device": device_name(env.device), "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/step_time.py"] + sys.argv[1:]),
            "cases": cases, "bank_update": bank, "copy": copy, "ratios": ratios}


def markdown(res: Dict) -> str:
    lines = [f"# Training-step throughput on {res['device']}", "",
             f"torch {res['torch']}; synthetic in-device images (no loader); `{res['command']}`", "",
             "| case | arch | amp | batch | views | N | ms/step (median) | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        lines.append(f"| {c['name']} | {c['arch']} | {c['amp']} | {c['batch']}x{c['world']} | "
                     f"{' + '.join(c['views'])} | {c['num_samples']} | {c['step_ms_median']:.2f} | {c['images_per_s']:.1f} |")
    b = res["bank_update"]
    lines += ["", f"Memory-bank update, {b['num_rows']} rows, batch {b['batch']}: "
              + ", ".join(f"{k} {v['ms_median']:.3f} ms ({v['gb_per_s']:.1f} GB/s)" if v else f"{k} not run (no CUDA)"
                          for k, v in b.items() if k in ("triton", "torch"))
              + f"; device copy {res['copy']['gb_per_s']:.1f} GB/s", "", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in res["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output path without extension (writes OUT.json, OUT.md)")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config names under configs/")
    ap.add_argument("--num-samples", type=int, default=IMAGENET_N, help="N: bank / classifier rows")
    ap.add_argument("--pic-negatives", type=int, default=65536, help="K for PIC's sampled case (0: skip it)")
    ap.add_argument("--pic-large-n", type=int, default=10_000_000,
                    help="also time PIC's sampled case at this N (0: skip it)")
    ap.add_argument("--batch", type=int, default=0, help="per-rank batch (0: each config's own)")
    ap.add_argument("--arch", default="", help="override model.arch (e.g. resnet18 for a CPU smoke run)")
    ap.add_argument("--max-size", type=int, default=0, help="clamp crop sizes (CPU smoke runs)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every case (e.g. method.npid.K=64 for a small N)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    res = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
