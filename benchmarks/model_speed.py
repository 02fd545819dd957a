"""Model-only training speed: forward + backward + SGD step of the embedding network on random
images already in memory (no loader, no method), images/s at each thread count.

This is the number to scale the README's timings by: the main job's wall time on another CPU
is about (README wall time) x (README model-only images/s) / (this machine's model-only
images/s). The defaults are the main job's model (configs/npid_fmnist.yaml); ``--width 1``
is the stock ResNet-18.

    python benchmarks/model_speed.py                                   # the main job's model
    python benchmarks/model_speed.py --width 1 --threads 1 2 --out /tmp/ms

Writes OUT.json when ``--out`` is given. Timings vary run to run; compare numbers from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fastinst.train.optim import sgd  # noqa: E402
from fastinst.core.model import build_model  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(args.arch, stem=args.stem, width=args.width).train()
    opt = sgd(model.parameters(), 0.01, 0.9, 5e-4, cuda=False)
    x = torch.randn(args.batch, 3, args.size, args.size)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(x).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"threads": threads, "step_ms_median": 1e3 * step, "images_per_s": args.batch / step,
            "images_per_s_per_thread": args.batch / step / threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--stem", default="imagenet")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, min(2, os.cpu_count() or 1)])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="write OUT.json")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    res = {"device": f"CPU ({cpu_name()}, {os.cpu_count()} cores)", "torch": torch.__version__,
           "model": {k: getattr(args, k) for k in ("arch", "stem", "width", "size", "batch")}, "runs": []}
    print(f"{res['device']}: {args.arch} width {args.width} {args.stem} stem, {args.size} px, batch {args.batch}, "
          "forward + backward + SGD step")
    for t in dict.fromkeys(args.threads):
        r = measure(args, t)
        res["runs"].append(r)
        print(f"  {t} thread(s): {r['images_per_s']:.1f} img/s ({r['images_per_s_per_thread']:.1f} per thread, "
              f"{r['step_ms_median']:.1f} ms/step)", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
