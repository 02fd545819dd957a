"""The ``profile`` doctor (loaders/doctor.py): stage rates, the bound stage, CPU busy share, the
recommendation rules, the chart; and ``launch.py profile``'s report carrying them."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
from PIL import Image

from datagen import make_photo_zip
import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import load_config
from loaders import doctor
from loaders.profile import run_profile


def row(backend, device, ips, *, read=None, decode=None, aug_ms=None, transfer=None, busy=None, workers=2):
    st = {"read_images_per_s_1proc": read, "decode_images_per_s": decode, "augment_ms_per_image": aug_ms}
    return {"backend": backend, "device": device, "images_per_s": ips, "stages": st, "workers": workers,
            "threads": 1, "transfer_images_per_s": transfer, "cpu_busy": busy, "gpu_mem_mib": None}


def report(*rows, cores=16):
    return {"results": list(rows), "host": {"cpu_cores": cores}}


def test_stage_rates_and_bound():
    r = row("torch", "cpu", 900, read=500, decode=1500, aug_ms=1.0, transfer=50_000, workers=4)
    rates = doctor.stage_rates(r, readers=4)
    assert rates == {"read": 2000, "decode": 1500, "augment": 1000.0, "transfer": 50_000}
    doc = doctor.diagnose(report(r))
    assert doc["backends"][0]["bound"] == "augment" and doc["cores"] == 16


@pytest.mark.parametrize("rows, cuda, words", [
    ([row("dali", "gpu", 3000, decode=3100, aug_ms=0.1), row("dali", "cpu", 5000, decode=5200, aug_ms=0.1)],
     False, "GPU decode slower than CPU decode here (3000 vs 5000 images/s): loader.device=cpu"),
    ([row("torch", "cpu", 800, read=100, decode=2000, aug_ms=0.2)], False, "read-bound at 200 images/s"),
    ([row("torch", "cpu", 800, read=5000, decode=900, aug_ms=0.2)], True, "decode-bound on 16 cores (800 images/s, "
                                                                         "torch): loader.device=gpu"),
    ([row("dali", "cpu", 800, read=5000, decode=900, aug_ms=0.2, busy=0.3)], False,
     "decode-bound with the CPU 30% busy on 16 cores: raise loader.num_threads"),
    ([row("torch", "cpu", 800, read=9000, decode=9000, aug_ms=0.1, transfer=850)], False, "transfer-bound (850"),
    ([row("dali", "gpu", 12000, decode=13000, aug_ms=0.01), row("torch", "cpu", 2000, read=9000, decode=2100,
                                                               aug_ms=0.2)], False, "loader.backend=dali: 6.0x"),
])
def test_recommendation_rules(monkeypatch, rows, cuda, words):
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: cuda)
    assert words in doctor.diagnose(report(*rows))["recommendation"]


def test_cpu_busy_sees_a_spinning_thread():
    stop = time.perf_counter() + 0.5
    t = threading.Thread(target=lambda: [0 for _ in iter(lambda: time.perf_counter() < stop, False)])
    busy = doctor.CpuBusy().start()
    t.start()
    t.join()
    share = busy.stop()
    cores = len(os.sched_getaffinity(0))
    assert share is not None and share >= 0.5 / cores, share  # one of `cores` cores spun throughout


def test_profile_report_has_the_doctor_and_a_chart(tmp_path):
    pytest.importorskip("nvidia.dali")
    data = make_photo_zip(str(tmp_path / "photos"), n=24, val=8)
    cfg = load_config(None, [f"data.path={data}", "data.cache=full", "loader.batch_size=4", "profile.batches=2",
                             "profile.warmup_batches=1", "aug.crops=[{count: 2, size: 32, scale: [0.2, 1.0]}]",
                             "loader.num_workers=1"])
    rep = run_profile(cfg, str(tmp_path / "prof"))
    with open(tmp_path / "prof" / "profile.json") as f:
        saved = json.load(f)
    doc = saved["doctor"]
    assert [b["backend"] for b in doc["backends"]] == ["dali", "torch"]
    for b in doc["backends"]:
        rates = b["stage_images_per_s"]
        assert rates["read"] > 0 and rates["decode"] > 0 and rates["transfer"] is None  # no CUDA here
        assert b["bound"] == min((s for s in rates if rates[s]), key=lambda s: rates[s])
    assert doc["recommendation"] and doc == rep["doctor"]
    png = tmp_path / "prof" / "profile.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 22 * 8
