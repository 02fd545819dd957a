"""The GPU suite: five parts, each writing OUT/<part>.json (and .md) as soon as it finishes, so
a timeout keeps what was measured; then a summary table of every figure against its goal.

    python benchmarks/gpu/suite.py --out OUT --part gpu_tests|loader|loader_aug|step_time|end_to_end|compile|fmnist
    python benchmarks/gpu/suite.py --out OUT --summary
    ... --smoke      the same entry points on the CPU at toy sizes (CI runs this)

``benchmarks/gpu/run.sh`` runs the parts in order with a time limit each. ``--data`` is the
carried folder (gpu_carry/data: photos/ and fmnist/ IDX files); a smoke run makes its own.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

PARTS = ["gpu_tests", "loader", "loader_aug", "step_time", "end_to_end", "compile", "fmnist"]
GOALS = {  # figure -> (goal, direction): DESIGN.md's goals for one H200
    "loader SimCLR 2x224 images/s (best DALI)": (10000, ">="),
    "loader SimCLR 2x224: best DALI / torchvision": (4.0, ">="),
    "NPID R50 AMP channels-last images/s (synthetic)": (6000, ">="),
    "end to end / synthetic step (NPID R50)": (0.97, ">="),
    "NPID R50 step: torch.compile / eager images/s": (None, ""),  # measured; no goal set
    "CMC R50v1 (2 trunks) images/s (synthetic)": (None, ""),
    "loader CMC 1x224 Lab images/s (best DALI)": (None, ""),
    "NPID bank + loss share of the step": (0.02, "<="),
    "PIC sampled: step at N=10M / at N=1.28M": (1.05, "<="),
    "FMNIST NPID kNN top-1 - raw-pixel kNN top-1": (0.0, ">"),
}


def device_name() -> str:
    """The device this process measures on (step_time's wording, so the tables agree)."""
    import step_time

    return step_time.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


SMOKE = False  # set by main(): every JSON says whether its figures are toy-size smoke output


def write(out: str, part: str, res: dict, md: str = "") -> dict:
    from fastinst.train.checkpoint import _atomic_write

    res = {"part": part, "device": device_name(), "torch": torch.__version__, "smoke": SMOKE, **res}
    _atomic_write(os.path.join(out, f"{part}.json"), lambda f: f.write(json.dumps(res, indent=2).encode()))
    if md:
        with open(os.path.join(out, f"{part}.md"), "w") as f:
            f.write(md)
    print(f"[suite] {part}: written to {out}/{part}.json", flush=True)
    return res


def smoke_data(out: str) -> str:
    """Tiny photo and Fashion-MNIST sets for --smoke (from this machine's Debian packages)."""
    from loaders.prepare import photo_crops

    data = os.path.join(out, "smoke_data")
    if not os.path.isdir(os.path.join(data, "photos")):
        photo_crops(os.path.join(data, "photos"), n=24, val=8, short_side=(64, 96), seed=1)
    os.makedirs(os.path.join(data, "fmnist"), exist_ok=True)
    for f in glob.glob("/usr/share/datasets/fashion-mnist/*.gz"):
        dst = os.path.join(data, "fmnist", os.path.basename(f))
        if not os.path.exists(dst):
            os.symlink(f, dst)
    return data


# --------------------------------------------------------------------------- 1. GPU tests


def part_gpu_tests(out: str, smoke: bool, data: str) -> dict:
    xml = os.path.join(out, "gpu_tests.xml")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", os.path.join(ROOT, "tests")], cwd=ROOT, capture_output=True, text=True)
    counts, failures = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
    if os.path.exists(xml):
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in counts}
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                 "message": (bad.get("message") or "")[:500]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res = {"returncode": proc.returncode, **counts, "failed_tests": failures, "seconds": time.perf_counter() - t0,
           "output_tail": proc.stdout[-2000:]}
    md = (f"# GPU tests on {device_name()}\n\n{counts['passed']} passed, {counts['failures']} failed, "
          f"{counts['errors']} errors, {counts['skipped']} skipped\n\n"
          + "".join(f"- FAILED {f['test']}: {f['message']}\n" for f in failures))
    return write(out, "gpu_tests", res, md)


# --------------------------------------------------------------------------- 2. loader


VIEWS = {"SimCLR 2x224": ("profile_simclr", "[{count: 2, size: 224, scale: [0.08, 1.0]}]",
                          "[{count: 2, size: 32, scale: [0.08, 1.0]}]"),
         "CMC 1x224 Lab": ("cmc_imagenet_r50v1_lab", "[{count: 1, size: 224, scale: [0.08, 1.0]}]",
                           "[{count: 1, size: 32, scale: [0.08, 1.0]}]"),
         "PIC 1x160+3x96": ("profile_multicrop", "[{count: 1, size: 160, scale: [0.14, 1.0]}, {count: 3, size: 96, "
                            "scale: [0.08, 0.14]}]", "[{count: 1, size: 32, scale: [0.14, 1.0]}, {count: 3, size: 16, "
                            "scale: [0.08, 0.14]}]")}


def loader_variants(cuda: bool, view: str):
    loads = (0.65,) if view.startswith("CMC") else (0.0, 0.65, 1.0)  # CMC: its Lab pipeline once, in the budget
    dali = [(f"DALI mixed, hw_decoder_load {h}", ["loader.backend=dali", "loader.device=gpu",
                                                   f"loader.hw_decoder_load={h}"]) for h in loads]
    cpu = [("DALI cpu", ["loader.backend=dali", "loader.device=cpu"]), ("torchvision/PIL", ["loader.backend=torch"])]
    return (dali if cuda else []) + cpu


def part_loader(out: str, smoke: bool, data: str) -> dict:
    import fastinst.methods  # noqa: F401  (registers the methods' config sections)
    from fastinst.config import load_config
    from loaders.doctor import bar_chart, diagnose
    from loaders.profile import run_profile

    cuda = torch.cuda.is_available()
    size = ["loader.batch_size=4", "profile.batches=2", "profile.warmup_batches=1"] if smoke else \
        ["loader.batch_size=256", "profile.batches=12", "profile.warmup_batches=2"]
    rows, skipped, raw = [], [] if cuda else ["DALI mixed (no CUDA here)"], {}
    for view, (cfg_name, crops, smoke_crops) in VIEWS.items():
        for name, over in loader_variants(cuda, view):
            backend = "torch" if "loader.backend=torch" in over else "dali"
            cfg = load_config(os.path.join(ROOT, "configs", f"{cfg_name}.yaml"),
                              [f"data.path={os.path.join(data, 'photos')}", "data.cache=full",
                               f"aug.crops={smoke_crops if smoke else crops}", f"profile.backends=[{backend}]",
                               "profile.stages=true"] + size + over)
            rep = run_profile(cfg, os.path.join(out, "loader", f"{view}-{name}".replace(" ", "_").replace("/", "_")))
            r = rep["results"][0]
            raw.setdefault(view, {"results": [], "host": rep["host"]})["results"].append(r)
            rows.append({"views": view, "variant": name, "images_per_s": r["images_per_s"],
                         "views_per_s": r["views_per_s"], "stages": r.get("stages"), "doctor": rep.get("doctor")})
    res = {"rows": rows, "skipped": skipped, "cores": len(os.sched_getaffinity(0))}
    for view in VIEWS:  # the doctor over every variant of these views: one recommendation
        res[f"{view}: doctor"] = doc = diagnose(raw[view])
        bar_chart(doc, os.path.join(out, "loader", f"{view.split()[0]}_doctor.png"))
    for view in VIEWS:
        mine = [r for r in rows if r["views"] == view]
        best = max((r for r in mine if r["variant"].startswith("DALI")), key=lambda r: r["images_per_s"])
        tv = next(r for r in mine if r["variant"] == "torchvision/PIL")
        res[f"{view}: best DALI"] = {"variant": best["variant"], "images_per_s": best["images_per_s"],
                                     "over_torchvision": best["images_per_s"] / tv["images_per_s"]}
    md = [f"# Loader throughput on {device_name()}, {res['cores']} cores, data.cache=full", "",
          "| views | variant | images/s | views/s |", "|---|---|---|---|"]
    md += [f"| {r['views']} | {r['variant']} | {r['images_per_s']:.0f} | {r['views_per_s']:.0f} |" for r in rows]
    md += [""] + [f"- {v}: best DALI ({res[f'{v}: best DALI']['variant']}) = "
                  f"{res[f'{v}: best DALI']['over_torchvision']:.2f}x torchvision; doctor: "
                  f"{res[f'{v}: doctor']['recommendation']}" for v in VIEWS]
    return write(out, "loader", res, "\n".join(md) + "\n")


# --------------------------------------------------------------------------- 2b. mixture, RandAugment


AUG_VIEWS = {"SimCLR 2x224 + IM": ["aug.mix.kind=im"], "SimCLR 2x224 + RandAugment": ["aug.randaugment.n=2"]}


def part_loader_aug(out: str, smoke: bool, data: str) -> dict:
    """SimCLR 2x224 with CMC's image mixture (the seed's IM defaults; the profile also times it
    without, in the same run) and with PIC's RandAugment: DALI mixed (their GPU graphs) and the
    torchvision backend, from data.cache=full."""
    import fastinst.methods  # noqa: F401  (registers the methods' config sections)
    from fastinst.config import load_config
    from loaders.profile import run_profile

    cuda = torch.cuda.is_available()
    _, crops, smoke_crops = VIEWS["SimCLR 2x224"]
    size = ["loader.batch_size=4", "profile.batches=2", "profile.warmup_batches=1"] if smoke else \
        ["loader.batch_size=256", "profile.batches=6", "profile.warmup_batches=1"]
    variants = ([("DALI mixed, hw_decoder_load 0.65", ["loader.backend=dali", "loader.device=gpu"])] if cuda else
                [("DALI cpu", ["loader.backend=dali", "loader.device=cpu"])]) + \
        [("torchvision/PIL", ["loader.backend=torch"])]
    rows = []
    for view, extra in AUG_VIEWS.items():
        for name, over in variants:
            backend = "torch" if "loader.backend=torch" in over else "dali"
            cfg = load_config(os.path.join(ROOT, "configs", "profile_simclr.yaml"),
                              [f"data.path={os.path.join(data, 'photos')}", "data.cache=full",
                               f"aug.crops={smoke_crops if smoke else crops}", f"profile.backends=[{backend}]",
                               "profile.stages=false"] + size + over + extra)
            run_dir = f"{view}-{name}".replace(" ", "_").replace("/", "_")
            rep = run_profile(cfg, os.path.join(out, "loader_aug", run_dir))
            r = rep["results"][0]
            rows.append({"views": view, "variant": name, "images_per_s": r["images_per_s"],
                         "without_mix_images_per_s": r.get("without_mix_images_per_s"), "mix": rep.get("mix")})
    md = [f"# Loader throughput with the image mixture and RandAugment on {device_name()}", "",
          "| views | variant | images/s | without the mixture |", "|---|---|---|---|"]
    md += [f"| {r['views']} | {r['variant']} | {r['images_per_s']:.0f} | "
           + (f"{r['without_mix_images_per_s']:.0f} |" if r["without_mix_images_per_s"] else "- |") for r in rows]
    return write(out, "loader_aug", {"rows": rows}, "\n".join(md) + "\n")


# --------------------------------------------------------------------------- 3. step time


def part_step_time(out: str, smoke: bool, data: str) -> dict:
    import step_time

    args = ["--out", os.path.join(out, "step_time")]
    if smoke:
        args += ["--configs", "npid_imagenet_r50", "pic_imagenet_r50", "cmc_imagenet_r50v1_lab", "--arch", "resnet18",
                 "--max-size", "32",
                 "--batch", "2", "--num-samples", "300", "--pic-negatives", "16", "--pic-large-n", "900",
                 "--steps", "1", "--warmup", "0", "--set", "method.npid.K=16", "method.moco.K=16", "method.cmc.K=16"]
    step_time.main(args)
    with open(os.path.join(out, "step_time.json")) as f:
        res = json.load(f)
    return write(out, "step_time", {"step_time": res})


# --------------------------------------------------------------------------- 4. end to end


def part_end_to_end(out: str, smoke: bool, data: str) -> dict:
    """NPID R50 through the DALI loader (mixed decoding on a GPU) against the same step on
    synthetic in-device images, both measured here."""
    import step_time
    from fastinst.train import engine
    from fastinst.config import load_config
    from fastinst.core.runtime import DistEnv

    photos = os.path.join(data, "photos")
    over = [f"data.path={photos}", "data.cache=full", "loader.backend=dali", "train.eval_every=0",
            "train.ckpt_every=0", "method.npid.K=256", "eval.at_start=false"]
    over += (["model.arch=resnet18", "aug.crops=[{count: 1, size: 32, scale: [0.2, 1.0]}]", "loader.batch_size=4",
              "train.max_steps=6", "train.log_every=2", "method.npid.K=8"] if smoke else
             ["loader.batch_size=128", "train.max_steps=160", "train.log_every=20"])
    cfg = load_config(os.path.join(ROOT, "configs", "npid_imagenet_r50.yaml"), over)
    run_dir = os.path.join(out, "end_to_end_run")
    tr = engine.train(cfg, run_dir, resume="none")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    e2e = statistics.median(r["images_per_s"] for r in recs[1:] or recs)  # the first interval warms up
    synthetic = step_time.time_case("npid (synthetic)", cfg, len(tr.source), DistEnv(device=tr.env.device),
                                    steps=2 if smoke else 30, warmup=0 if smoke else 10)
    res = {"loader_device": tr.loader.device, "batch": cfg.loader.batch_size, "steps": tr.step,
           "end_to_end_images_per_s": e2e, "synthetic_images_per_s": synthetic["images_per_s"],
           "ratio": e2e / synthetic["images_per_s"], "data_wait": statistics.median(r["data_wait"] for r in recs)}
    md = (f"# End to end on {device_name()}: NPID {cfg.model.arch}, batch {cfg.loader.batch_size}, DALI "
          f"{tr.loader.device}\n\nthrough the loader {e2e:.0f} img/s, synthetic {synthetic['images_per_s']:.0f} "
          f"img/s: ratio {res['ratio']:.3f} (data wait {100 * res['data_wait']:.0f}%)\n")
    return write(out, "end_to_end", res, md)


# --------------------------------------------------------------------------- 5. torch.compile


def part_compile(out: str, smoke: bool, data: str) -> dict:
    """NPID R50's step with ``model.compile`` off and on (inductor; the warm-up steps include the
    compilation, whose wall time is reported separately). The smoke run compiles with dynamo's
    "eager" backend: the same entry points, without minutes of CPU code generation."""
    import functools

    import step_time
    from fastinst.config import load_config
    from fastinst.core.runtime import DistEnv

    env = DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    over = ["model.arch=resnet18", "loader.batch_size=2", "aug.crops=[{count: 1, size: 32, scale: [0.2, 1.0]}]",
            "method.npid.K=16"] if smoke else ["loader.batch_size=256"]
    n, steps, warmup = (300, 1, 1) if smoke else (1_281_167, 20, 3)
    rows = {}
    if smoke:
        torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
    for flag in ("false", "true"):
        cfg = load_config(os.path.join(ROOT, "configs", "npid_imagenet_r50.yaml"), over + [f"model.compile={flag}"])
        t0 = time.perf_counter()
        r = step_time.time_case(f"npid compile={flag}", cfg, n, env, steps=steps, warmup=warmup)
        r["wall_s_with_warmup"] = time.perf_counter() - t0
        rows[flag] = r
    ratio = rows["true"]["images_per_s"] / rows["false"]["images_per_s"]
    res = {"eager": rows["false"], "compiled": rows["true"], "ratio": ratio,
           "backend": "eager (smoke)" if smoke else "inductor"}
    md = (f"# torch.compile on {device_name()}: NPID {rows['true']['arch']}, batch {rows['true']['batch']}\n\n"
          f"eager {rows['false']['images_per_s']:.0f} img/s, compiled {rows['true']['images_per_s']:.0f} img/s "
          f"(ratio {ratio:.3f}); compile + warm-up wall {rows['true']['wall_s_with_warmup']:.0f} s\n")
    return write(out, "compile", res, md)


# --------------------------------------------------------------------------- 6. learning at scale


def raw_pixel_knn(src: str, limit_train: int, limit_val: int, k: int, sigma: float) -> dict:
    """Weighted kNN (the same protocol as the trained network's) on raw pixels."""
    from fastinst.core.knn import knn_classify
    from loaders.prepare import _find_idx, read_idx

    def load(prefix, limit):
        x = read_idx(_find_idx(src, f"{prefix}-images-idx3-ubyte")).reshape(-1, 784)
        y = read_idx(_find_idx(src, f"{prefix}-labels-idx1-ubyte"))
        x, y = (x[:limit], y[:limit]) if limit else (x, y)
        return torch.from_numpy(x.astype("float32") / 255.0), torch.from_numpy(y.astype("int64"))

    xt, yt = load("train", limit_train)
    xv, yv = load("t10k", limit_val)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = knn_classify(xv.to(dev), yv.to(dev), xt.to(dev), yt.to(dev), 10, k=k, sigma=sigma)
    return {"top1": r["top1"], "top5": r["top5"]}


def part_fmnist(out: str, smoke: bool, data: str) -> dict:
    """NPID on all 60k Fashion-MNIST training images for about 3 minutes; weighted kNN on the 10k
    test images against raw pixels and the random-init network, all in this run."""
    from fastinst.train import engine
    from fastinst.config import load_config
    from loaders.prepare import fmnist_to_zip

    src = os.path.join(data, "fmnist")
    zips = os.path.join(out, "fmnist_zip")
    limits = (512, 256) if smoke else (0, 0)
    t0 = time.perf_counter()
    fmnist_to_zip(zips, src=src, limit_train=limits[0], limit_val=limits[1], workers=os.cpu_count() or 1)
    prep_s = time.perf_counter() - t0
    base = os.path.join(ROOT, "configs", "npid_fmnist.yaml")
    over = [f"data.path={zips}", "train.resume=none"] + (
        ["model.width=0.25", "loader.batch_size=32", "loader.backend=torch", "loader.num_workers=1"] if smoke else
        ["model.width=1", "loader.batch_size=256", "train.lr=0.03", "train.lr_batch=128", "loader.num_workers=4"])
    budget = 15.0 if smoke else 95.0  # seconds of training (the part's limit in run.sh: 150 s)
    probe = engine.train(load_config(base, over + ["train.max_steps=12" if smoke else "train.max_steps=60",
                                                   "train.log_every=4" if smoke else "train.log_every=20",
                                                   "train.eval_every=0", "eval.at_start=false"]),
                         os.path.join(out, "fmnist_probe"), resume="none")
    with open(os.path.join(out, "fmnist_probe", "metrics.jsonl")) as f:
        ips = statistics.median(r["images_per_s"] for r in map(json.loads, f) if r["kind"] == "train")
    epochs = max(1, int(budget * ips / len(probe.source)))
    cfg = load_config(base, over + [f"train.epochs={epochs}", f"train.eval_every={epochs}", "eval.at_start=true",
                                    "train.log_every=100"])
    t0 = time.perf_counter()
    engine.train(cfg, os.path.join(out, "fmnist_run"), resume="none")
    train_s = time.perf_counter() - t0
    with open(os.path.join(out, "fmnist_run", "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["kind"] == "eval"]
    init, final = evals[0], evals[-1]
    pixels = raw_pixel_knn(src, *limits, k=cfg.eval.knn_k, sigma=cfg.eval.knn_sigma)
    res = {"train_images": len(probe.source), "epochs": epochs, "probe_images_per_s": ips, "prepare_s": prep_s,
           "train_s": train_s, "knn": {"raw_pixels": pixels["top1"], "random_init": init["knn_top1"],
                                       "trained": final["knn_top1"]},
           "trained_minus_pixels": final["knn_top1"] - pixels["top1"],
           "trained_minus_init": final["knn_top1"] - init["knn_top1"]}
    md = (f"# NPID on Fashion-MNIST ({len(probe.source)} train images) on {device_name()}\n\n"
          f"{epochs} epochs in {train_s:.0f} s; weighted kNN top-1 (k {cfg.eval.knn_k}, sigma {cfg.eval.knn_sigma}) "
          f"on the test images: raw pixels {pixels['top1']:.2f}, random init {init['knn_top1']:.2f}, trained "
          f"{final['knn_top1']:.2f}\n")
    return write(out, "fmnist", res, md)


# --------------------------------------------------------------------------- summary


def summary(out: str) -> dict:
    parts = {}
    for p in PARTS:
        path = os.path.join(out, f"{p}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts[p] = json.load(f)
    figures = {}
    if "loader" in parts:
        best = parts["loader"].get("SimCLR 2x224: best DALI")
        if best:
            figures["loader SimCLR 2x224 images/s (best DALI)"] = best["images_per_s"]
            figures["loader SimCLR 2x224: best DALI / torchvision"] = best["over_torchvision"]
        cmc = parts["loader"].get("CMC 1x224 Lab: best DALI")
        if cmc:
            figures["loader CMC 1x224 Lab images/s (best DALI)"] = cmc["images_per_s"]
    if "step_time" in parts:
        st = parts["step_time"]["step_time"]
        npid = next((c for c in st["cases"] if c["name"] == "npid_imagenet_r50"), None)
        if npid:
            figures["NPID R50 AMP channels-last images/s (synthetic)"] = npid["images_per_s"]
        cmc = next((c for c in st["cases"] if c["name"] == "cmc_imagenet_r50v1_lab"), None)
        if cmc:
            figures["CMC R50v1 (2 trunks) images/s (synthetic)"] = cmc["images_per_s"]
        for k, v in st["ratios"].items():
            if k.startswith("npid_imagenet_r50: bank + loss share"):
                figures["NPID bank + loss share of the step"] = v
            if k.startswith("pic_imagenet_r50: K=") and " at N=" in k:
                figures["PIC sampled: step at N=10M / at N=1.28M"] = v
    if "end_to_end" in parts:
        figures["end to end / synthetic step (NPID R50)"] = parts["end_to_end"]["ratio"]
    if "compile" in parts:
        figures["NPID R50 step: torch.compile / eager images/s"] = parts["compile"]["ratio"]
    if "fmnist" in parts:
        figures["FMNIST NPID kNN top-1 - raw-pixel kNN top-1"] = parts["fmnist"]["trained_minus_pixels"]
    rows = []
    for name, value in figures.items():
        goal, op = GOALS[name]
        met = None if goal is None else {">=": value >= goal, "<=": value <= goal, ">": value > goal}[op]
        rows.append({"figure": name, "value": value, "goal": f"{op} {goal}" if op else "-", "met": met})
    dev = next((p["device"] for p in parts.values()), device_name())
    smoke = any(p.get("smoke") for p in parts.values())
    res = {"device": dev, "smoke": smoke, "parts_done": list(parts), "parts_missing": [p for p in PARTS if p not in parts],
           "figures": rows}
    if "gpu_tests" in parts:
        g = parts["gpu_tests"]
        res["gpu_tests"] = {k: g[k] for k in ("passed", "failures", "errors", "skipped")}
    md = [f"# GPU suite on {dev}" + (" (SMOKE RUN: CPU, toy sizes; not measurements)" if smoke else ""), "",
          f"parts done: {', '.join(parts) or 'none'}"
          + (f"; missing: {', '.join(res['parts_missing'])}" if res["parts_missing"] else ""), "",
          "| figure | measured | goal | met |", "|---|---|---|---|"]
    md += [f"| {r['figure']} | {r['value']:.4g} | {r['goal']} | "
           f"{'-' if r['met'] is None else 'yes' if r['met'] else 'NO'} |" for r in rows]
    if "gpu_tests" in res:
        t = res["gpu_tests"]
        md += ["", f"GPU tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                   f"{t['skipped']} skipped"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the same entry points")
    ap.add_argument("--data", default=os.path.join(ROOT, "gpu_carry", "data"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.summary:
        summary(args.out)
        return 0
    if not args.part:
        ap.error("--part or --summary")
    global SMOKE
    SMOKE = args.smoke
    data = smoke_data(args.out) if args.smoke else args.data
    torch.backends.cudnn.benchmark = True
    globals()[f"part_{args.part}"](args.out, args.smoke, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
