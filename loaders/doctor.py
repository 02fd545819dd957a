"""The ``profile`` doctor: where a loader's time goes, which stage bounds it, what to change.

For each backend that ``launch.py profile`` timed, the images/s each stage could sustain on
its own:

- ``read``: encoded bytes from the source (one process, scaled by the processes reading);
- ``decode``: read + decode through the backend's own parallelism (decode-only pipeline);
- ``augment``: crops, flips, colour ops and normalisation, from the full pipeline's time per
  image minus the decode-only one (the two overlap in a real pipeline: an estimate);
- ``transfer``: host-to-GPU copies of the batch's views from pinned memory (CUDA only);

the share of the machine's CPU time that was busy while the full pipeline ran (/proc/stat,
every core), the GPU memory the loader held, the stage that bounds the throughput, and a
one-line recommendation. `bar_chart` draws the backends and stages into a PNG (PIL).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import torch

STAGES = ("read", "decode", "augment", "transfer")


class CpuBusy:
    """Share of all cores' time that was busy between start() and stop() (Linux /proc/stat)."""

    @staticmethod
    def _sample() -> Optional[List[int]]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return [sum(fields), idle]

    def start(self) -> "CpuBusy":
        self.t0 = self._sample()
        return self

    def stop(self) -> Optional[float]:
        t1 = self._sample()
        if self.t0 is None or t1 is None or t1[0] == self.t0[0]:
            return None
        total, idle = t1[0] - self.t0[0], t1[1] - self.t0[1]
        return max(0.0, min(1.0, 1.0 - idle / total))


def gpu_used_bytes() -> Optional[int]:
    """Device memory in use by everything on the GPU (DALI allocates outside torch's caching
    allocator, so torch.cuda.memory_allocated would miss it)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def transfer_rate(bytes_per_image: int, batch: int = 256, repeats: int = 10) -> Optional[float]:
    """Images/s a pinned host-to-GPU copy of ``batch`` images' views sustains (CUDA only)."""
    if not torch.cuda.is_available() or bytes_per_image <= 0:
        return None
    host = torch.empty(batch * bytes_per_image, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()  # host sync: timing boundary
    t0 = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - t0)


def view_bytes(cfg, uint8: bool) -> int:
    """Bytes of one image's views as they cross to the GPU (uint8, or float32/fp16 tensors)."""
    pixels = sum(c.count * 3 * c.size * c.size for c in cfg.aug.crops)
    return pixels * (1 if uint8 else 2 if cfg.loader.fp16 else 4)


def stage_rates(row: dict, readers: int) -> Dict[str, Optional[float]]:
    st = row.get("stages") or {}
    rates: Dict[str, Optional[float]] = {s: None for s in STAGES}
    if st.get("read_images_per_s_1proc"):
        rates["read"] = st["read_images_per_s_1proc"] * max(1, readers)
    rates["decode"] = st.get("decode_images_per_s")
    aug_ms = st.get("augment_ms_per_image")
    rates["augment"] = 1e3 / aug_ms if aug_ms else None
    rates["transfer"] = row.get("transfer_images_per_s")
    return rates


def diagnose(report: dict) -> dict:
    """Per backend: stage rates, the bound stage, CPU busy share, GPU memory; then one line."""
    cores = report["host"]["cpu_cores"]
    rows, verdicts = [], []
    for r in report["results"]:
        readers = r.get("workers") or r.get("threads") or 1
        rates = stage_rates(r, readers)
        known = {s: v for s, v in rates.items() if v}
        bound = min(known, key=known.get) if known else None
        rows.append({"backend": r["backend"], "device": r["device"], "images_per_s": r["images_per_s"],
                     "stage_images_per_s": rates, "bound": bound, "cpu_busy": r.get("cpu_busy"),
                     "gpu_mem_mib": r.get("gpu_mem_mib")})
        verdicts.append((r, bound, known))
    return {"cores": cores, "backends": rows, "recommendation": recommend(verdicts, cores)}


def recommend(verdicts, cores: int) -> str:
    """One line: the most useful change, from the measured rates (first rule that applies)."""
    if not verdicts:
        return "nothing was profiled"
    best, bound, known = max(verdicts, key=lambda v: v[0]["images_per_s"])
    rate = best["images_per_s"]
    by: Dict[tuple, float] = {}
    for r, _, _ in verdicts:  # the best of each (backend, device), e.g. over hw_decoder_load settings
        key = (r["backend"], r["device"])
        by[key] = max(by.get(key, 0.0), r["images_per_s"])
    cuda = torch.cuda.is_available()
    if by.get(("dali", "gpu")) and by.get(("dali", "cpu")) and by[("dali", "gpu")] < by[("dali", "cpu")]:
        return (f"GPU decode slower than CPU decode here ({by[('dali', 'gpu')]:.0f} vs {by[('dali', 'cpu')]:.0f} "
                "images/s): loader.device=cpu")
    if bound == "read":
        return (f"read-bound at {known['read']:.0f} images/s ({best['backend']}): data.cache=full (RAM) or "
                "faster storage")
    if bound in ("decode", "augment") and best["device"] == "cpu":
        if cuda:
            return f"{bound}-bound on {cores} cores ({rate:.0f} images/s, {best['backend']}): loader.device=gpu"
        busy = best.get("cpu_busy")
        if busy is not None and busy < 0.6:
            return (f"{bound}-bound with the CPU {100 * busy:.0f}% busy on {cores} cores: raise "
                    "loader.num_threads / loader.num_workers")
        return (f"{bound}-bound on {cores} CPU cores ({rate:.0f} images/s, {best['backend']}); no GPU here: "
                "more cores, or smaller/fewer views")
    if bound == "transfer":
        return f"transfer-bound ({known['transfer']:.0f} images/s): keep views uint8 until the GPU"
    if by.get(("torch", "cpu")) and best["backend"] == "dali":
        return (f"loader.backend=dali: {rate / by[('torch', 'cpu')]:.1f}x the torchvision loader "
                f"({rate:.0f} images/s, bound by {bound})")
    return f"{best['backend']} sustains {rate:.0f} images/s (bound by {bound}); compare benchmarks/step_time.py"


def format_doctor(doc: dict) -> str:
    lines = [f"doctor ({doc['cores']} cores): images/s each stage could sustain"]
    for b in doc["backends"]:
        rates = " ".join(f"{s} {v:.0f}" if v else f"{s} -" for s, v in b["stage_images_per_s"].items())
        busy = "-" if b["cpu_busy"] is None else f"{100 * b['cpu_busy']:.0f}%"
        mem = "" if b["gpu_mem_mib"] is None else f", GPU memory {b['gpu_mem_mib']:.0f} MiB"
        lines.append(f"  {b['backend']}/{b['device']}: {b['images_per_s']:.0f} images/s; {rates}; bound by "
                     f"{b['bound']}; CPU busy {busy}{mem}")
    lines.append(f"recommendation: {doc['recommendation']}")
    return "\n".join(lines)


def bar_chart(doc: dict, path: str) -> Optional[str]:
    """Horizontal bars (log-free, images/s) per backend: the full pipeline and each stage."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    bars = []
    for b in doc["backends"]:
        bars.append((f"{b['backend']}/{b['device']} full", b["images_per_s"], (40, 90, 160)))
        for s, v in b["stage_images_per_s"].items():
            if v:
                bars.append((f"  {s}", v, (230, 150, 40) if s == b["bound"] else (150, 150, 150)))
    if not bars:
        return None
    top = max(v for _, v, _ in bars)
    w, row, left = 760, 22, 190
    img = Image.new("RGB", (w, row * (len(bars) + 2)), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), f"images/s per stage ({doc['cores']} cores); orange: the bound stage", fill="black")
    for i, (label, v, colour) in enumerate(bars):
        y = row * (i + 1) + 4
        d.text((8, y + 3), label, fill="black")
        length = max(1, int((w - left - 80) * v / top))
        d.rectangle([left, y, left + length, y + row - 6], fill=colour)
        d.text((left + length + 6, y + 3), f"{v:.0f}", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path
