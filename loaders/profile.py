"""``launch.py profile``: loader-only throughput of both backends, side by side.

Both backends read the same split with the same sampler, views and core budget; warm-up
batches (worker start, pipeline build, first allocations) are excluded from the timing.
Stages are also timed in isolation where they can be separated:

* ``read``: fetching encoded bytes (zip mmap slices / files / RAM cache), one process;
* ``decode``: read + decode only, through the backend's own parallelism;
* ``full``: the whole pipeline (decode once + every view + normalise + hand-off as tensors).

The difference between ``decode`` and ``full`` time per image is the augmentation cost.
The doctor (loaders/doctor.py) turns these into the bound stage, the CPU busy share, the
loader's GPU memory and a one-line recommendation, and draws ``profile.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import List, Optional

import torch

from fastinst.config import MixConfig, save_config, to_dict
from fastinst.core.runtime import DistEnv

from . import build_loader, build_source
from .doctor import CpuBusy, bar_chart, diagnose, format_doctor, gpu_used_bytes, transfer_rate, view_bytes
from .mixture import MixPlans, partners
from .sources import log


def _time_loader(loader, warmup: int, batches: int) -> dict:
    """Images/s over ``batches`` batches after ``warmup`` ones (epochs chained as needed), and
    the share of CPU time busy meanwhile."""
    seen, t0, n_img, n_batches, busy = 0, None, 0, 0, CpuBusy()
    while n_batches < batches:
        for batch in loader:
            if seen == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # host sync: timing boundary only
                t0 = time.perf_counter()
                busy.start()
            seen += 1
            if seen > warmup:
                n_img += len(batch["index"])
                n_batches += 1
                if n_batches >= batches:
                    break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images": n_img, "seconds": dt, "images_per_s": n_img / dt, "cpu_busy": busy.stop()}


def _time_read(source, n: int) -> float:
    n = min(n, len(source))
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += len(source.read_checked(i))
    return n / (time.perf_counter() - t0)


def run_profile(cfg, out_dir: str, env: Optional[DistEnv] = None) -> dict:
    env = env or DistEnv()
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    pc = cfg.profile
    source = build_source(cfg, cfg.data.train_split, env)
    log(f"profile: {len(source)} images from {cfg.data.path} ({cfg.data.train_split}), batch {cfg.loader.batch_size}, "
        f"{cfg.aug.num_views} views {[f'{c.count}x{c.size}' for c in cfg.aug.crops]}, "
        f"{pc.warmup_batches} warm-up + {pc.batches} timed batches per backend")
    results: List[dict] = []
    read_rate = _time_read(source, 2000) if pc.stages else None
    for backend in pc.backends:
        row = {"backend": backend}
        mem0 = gpu_used_bytes()
        loader = build_loader(cfg, cfg.data.train_split, mode="train", env=env, source=source, backend=backend)
        try:
            timing = _time_loader(loader, pc.warmup_batches, pc.batches)
            mem1 = gpu_used_bytes()
        finally:
            info = _loader_info(loader)
            loader.close()
            del loader
        row.update(info)
        row.update(images_per_s=timing["images_per_s"], views_per_s=timing["images_per_s"] * cfg.aug.num_views,
                   images=timing["images"], seconds=timing["seconds"], cpu_busy=timing["cpu_busy"],
                   gpu_mem_mib=None if mem0 is None else (mem1 - mem0) / 2**20)
        if info["device"] == "cpu":  # views cross to the GPU: uint8 from torch, normalised floats from DALI
            row["transfer_images_per_s"] = transfer_rate(view_bytes(cfg, uint8=backend == "torch"),
                                                         cfg.loader.batch_size)
        if pc.stages:
            dec = build_loader(cfg, cfg.data.train_split, mode="decode", env=env, source=source, backend=backend)
            try:
                dt = _time_loader(dec, pc.warmup_batches, pc.batches)
            finally:
                dec.close()
                del dec
            per_img_full = 1.0 / row["images_per_s"]
            per_img_dec = 1.0 / dt["images_per_s"]
            row["stages"] = {
                "read_images_per_s_1proc": read_rate,
                "decode_images_per_s": dt["images_per_s"],
                "decode_ms_per_image": per_img_dec * 1e3,
                "augment_ms_per_image": max(0.0, per_img_full - per_img_dec) * 1e3,
                "full_ms_per_image": per_img_full * 1e3,
            }
        if cfg.aug.mix.kind != "none":  # the same loader without the mixture, for its cost
            plain = dataclasses.replace(cfg, aug=dataclasses.replace(cfg.aug, mix=MixConfig()))
            ld = build_loader(plain, cfg.data.train_split, mode="train", env=env, source=source, backend=backend)
            try:
                row["without_mix_images_per_s"] = _time_loader(ld, pc.warmup_batches, pc.batches)["images_per_s"]
            finally:
                ld.close()
                del ld
        log(f"profile: {backend}: {row['images_per_s']:.1f} images/s")
        results.append(row)
    report = {"results": results, "host": _host_info(), "config": to_dict(cfg), "dataset_images": len(source)}
    if cfg.aug.mix.kind != "none":
        report["mix"] = _mix_stats(cfg, len(source))
    report["doctor"] = diagnose(report)
    report["chart"] = bar_chart(report["doctor"], os.path.join(out_dir, "profile.png"))
    by = {r["backend"]: r for r in results}
    if "dali" in by and "torch" in by:
        report["speedup_dali_over_torch"] = by["dali"]["images_per_s"] / by["torch"]["images_per_s"]
    with open(os.path.join(out_dir, "profile.json.tmp"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(out_dir, "profile.json.tmp"), os.path.join(out_dir, "profile.json"))
    print(format_table(report))
    print(format_doctor(report["doctor"]))
    return report


def _mix_stats(cfg, n: int, samples: int = 2000) -> dict:
    """What the mixture asks of the loader: partner images decoded per sampled image (all views),
    and the share of sampled images that need at least one, over the first ``samples`` indices."""
    plans = MixPlans(cfg.aug, cfg.seed, n)
    counts = [sum(len(partners(plans.plan(0, i, v))) for v in range(cfg.aug.num_views)) for i in range(min(n, samples))]
    return {"kind": cfg.aug.mix.kind, "partners_per_image": sum(counts) / len(counts),
            "images_with_partners": sum(c > 0 for c in counts) / len(counts)}


def _loader_info(loader) -> dict:
    if loader.backend == "dali":
        return {"device": loader.device, "decode": "mixed (GPU)" if loader.device == "gpu" else "cpu",
                "threads": loader.num_threads, "workers": loader.num_workers}
    return {"device": "cpu", "decode": "PIL (cpu)", "threads": 1, "workers": loader.num_workers}


def _host_info() -> dict:
    info = {"cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(report: dict) -> str:
    head = f"{'backend':8} {'device':6} {'thr':>3} {'wrk':>3} {'images/s':>10} {'views/s':>10} {'decode img/s':>12} {'dec ms/img':>10} {'aug ms/img':>10}"
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        st = r.get("stages") or {}
        lines.append(f"{r['backend']:8} {r['device']:6} {r['threads']:>3} {r['workers']:>3} {r['images_per_s']:>10.1f} "
                     f"{r['views_per_s']:>10.1f} {st.get('decode_images_per_s', float('nan')):>12.1f} "
                     f"{st.get('decode_ms_per_image', float('nan')):>10.2f} {st.get('augment_ms_per_image', float('nan')):>10.2f}")
    if "speedup_dali_over_torch" in report:
        lines.append(f"DALI / torchvision images/s: {report['speedup_dali_over_torch']:.2f}x")
    if "mix" in report:
        m = report["mix"]
        for r in report["results"]:
            lines.append(f"aug.mix.kind={m['kind']} ({r['backend']}): {r['images_per_s']:.1f} images/s against "
                         f"{r['without_mix_images_per_s']:.1f} with kind=none "
                         f"({r['images_per_s'] / r['without_mix_images_per_s']:.2f}x)")
        lines.append(f"  partner decodes per image: {m['partners_per_image']:.2f}; images needing one: "
                     f"{100 * m['images_with_partners']:.0f}%")
    rr = (report["results"][0].get("stages") or {}).get("read_images_per_s_1proc")
    if rr:
        lines.append(f"read stage alone (1 process): {rr:.0f} images/s")
    h = report["host"]
    lines.append(f"host: {h['cpu_cores']} cores, torch {h['torch']}, dali {h['dali']}, gpu {h.get('gpu', 'none')}")
    return "\n".join(lines)
