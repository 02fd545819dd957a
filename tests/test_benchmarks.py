"""benchmarks/step_time.py runs end to end on the CPU (tiny sizes) and writes a complete
report: every case, the bank-update timing and the side-by-side ratios. No timing is asserted."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_time_benchmark_writes_every_case(tmp_path):
    out = tmp_path / "st"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"), "--out", str(out),
           "--configs", "npid_imagenet_r50", "pic_imagenet_r50", "--arch", "resnet18", "--max-size", "32",
           "--batch", "2", "--num-samples", "300", "--pic-negatives", "16", "--pic-large-n", "900", "--steps", "1",
           "--warmup", "0",
           "--set", "method.npid.K=16"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600)
    res = json.loads((tmp_path / "st.json").read_text())
    names = [c["name"] for c in res["cases"]]
    assert names == ["npid_imagenet_r50", "npid_imagenet_r50 (baseline)", "pic_imagenet_r50",
                     "pic_imagenet_r50 (K=16)", "pic_imagenet_r50 (K=16, N=900)"]
    for c in res["cases"]:
        assert c["arch"] == "resnet18" and c["batch"] == 2 and c["num_samples"] == (900 if "N=900" in c["name"] else 300)
        assert c["step_ms_median"] > 0 and math.isclose(c["images_per_s"], 2000 / c["step_ms_median"])
    assert [c["views"] for c in res["cases"]][2] == ["1x32", "3x32"]  # PIC's multi-crop, clamped
    torch_update = res["bank_update"]["torch"]
    assert res["bank_update"]["triton"] is None and torch_update["ms_median"] > 0
    # 2 rows x 128 x (4 + 4 + 4) bytes per update, over its median time
    assert math.isclose(torch_update["gb_per_s"], 2 * 128 * 12 / (torch_update["ms_median"] / 1000) / 1e9)
    assert res["copy"]["gb_per_s"] > 0 and res["copy"]["bytes"] == 1 << 26
    assert set(res["ratios"]) == {"npid_imagenet_r50: bank + loss share of the step",
                                  "pic_imagenet_r50: full-softmax step / K=16 step",
                                  "pic_imagenet_r50: K=16 step at N=900 / at N=300",
                                  "bank update (torch): GB/s / copy GB/s"}
    md = (tmp_path / "st.md").read_text()
    assert res["device"] in md and "pic_imagenet_r50 (K=16)" in md


def test_model_speed_benchmark_reports_each_thread_count(tmp_path):
    out = tmp_path / "ms"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "model_speed.py"), "--out", str(out), "--threads", "1", "2",
           "--steps", "2", "--warmup", "0", "--batch", "4", "--width", "0.25"]
    printed = subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True, text=True).stdout
    res = json.loads((tmp_path / "ms.json").read_text())
    assert res["model"] == {"arch": "resnet18", "stem": "imagenet", "width": 0.25, "size": 28, "batch": 4}
    assert [r["threads"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["step_ms_median"] > 0 and math.isclose(r["images_per_s"], 4000 / r["step_ms_median"])
        assert math.isclose(r["images_per_s_per_thread"], r["images_per_s"] / r["threads"])
    assert printed.count("thread(s):") == 2 and res["device"] in printed
