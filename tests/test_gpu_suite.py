"""The GPU suite's smoke run (benchmarks/gpu/run.sh --smoke): every part's entry point on the
CPU at toy sizes, so the suite cannot rot while no GPU host is available (~70 s here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["gpu_tests", "loader", "loader_aug", "step_time", "end_to_end", "compile", "fmnist"]


def test_run_sh_smoke_writes_every_part_and_the_bundle(tmp_path):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--smoke", "--bundle",
                           str(bundle), str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in PARTS:
        with open(out / f"{part}.json") as f:
            res = json.load(f)
        assert res["part"] == part and res["smoke"] is True and "no GPU" in res["device"]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["parts_done"] == PARTS and summary["parts_missing"] == [] and summary["smoke"]
    names = {r["figure"] for r in summary["figures"]}
    assert len(names) == 10 and all(isinstance(r["value"], float) for r in summary["figures"])
    assert "SMOKE RUN" in (out / "summary.md").read_text()
    # what the device tool can bring back: three files, the parts' JSON inside the tarball
    assert sorted(os.listdir(bundle)) == ["suite.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(bundle / "suite.tar.gz") as tar:
        members = set(tar.getnames())
    assert {f"./{p}.json" for p in PARTS} <= members and any(m.endswith("profile.png") for m in members)
    # the GPU tests were collected and skipped here, not missing
    with open(out / "gpu_tests.json") as f:
        tests = json.load(f)
    assert tests["tests"] >= 15 and tests["skipped"] == tests["tests"] and tests["failures"] == 0
    # the loader part's doctor gave one recommendation per set of views
    with open(out / "loader.json") as f:
        loader = json.load(f)
    assert loader["SimCLR 2x224: doctor"]["recommendation"] and loader["PIC 1x160+3x96: doctor"]["recommendation"]
    # the mixture / RandAugment part: both views, each backend, the mixture also timed without it
    with open(out / "loader_aug.json") as f:
        aug = json.load(f)
    rows = {(r["views"], r["variant"]): r for r in aug["rows"]}
    assert len(rows) == 4 and all(r["images_per_s"] > 0 for r in rows.values())
    assert all((r["without_mix_images_per_s"] or 0) > 0 for (v, _), r in rows.items() if v.endswith("IM"))
