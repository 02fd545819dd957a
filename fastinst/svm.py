"""Linear SVMs and low-shot SVMs on frozen features (``launch.py svm``), the protocol of
MMSelfSup's VOC07 SVM benchmark (tools/benchmarks/classification/svm_voc07), with
scikit-learn's liblinear ``LinearSVC`` as the solver:

- features: extracted once (every rank its shard of the eval loader, gathered), cached on
  disk with their labels and indices (``features_<split>.npz``, reused while the checkpoint,
  its step and the feature spec are the same); ``svm.feature`` = ``feat5`` (MMSelfSup's
  default: the last stage pooled to 2x2, flattened) or ``avgpool`` (the global pool); rows
  L2-normalised (x / (|x| + 1e-5));
- SVMs: squared hinge, L2 penalty, dual, tol 1e-4, max_iter 2000, over the cost grid
  ``svm.costs`` (MMSelfSup's 1, 10, 100 and 0.5^4 ... 0.5^19);
- single-label data: one multi-class one-vs-rest LinearSVC, its cost chosen by 3-fold
  stratified cross-validation accuracy on the train features, then refit on all of them and
  scored on the val split (accuracy);
- low-shot: k in ``svm.low_shot`` samples per class from the train features, ``svm.draws``
  fixed draws (seeded by (seed, k, draw)); for each k the cost whose mean val accuracy over
  the draws is best (MMSelfSup selects it on the test set in the same way), reported with
  the mean and std over the draws.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, to_dict
from .runtime import DistEnv, derive_seed, init_distributed, log0




def _svc(cost: float):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4, max_iter=2000)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


# --------------------------------------------------------------------------- features


@torch.no_grad()
def extract(cfg: Config, checkpoint: str, split: str, env: DistEnv, out_dir: str) -> Dict[str, np.ndarray]:
    """{feats [N, F] float32, labels [N], index [N]} of ``split`` (cached in ``out_dir``)."""
    from loaders import build_loader

    from .linear import STAGE_POOL, build_frozen_backbone
    from .model import autocast_context
    from .build import resolve_amp

    backbone, path, step = build_frozen_backbone(cfg, checkpoint, env)
    spec = {"checkpoint": os.path.realpath(path), "step": step, "feature": cfg.svm.feature, "split": split,
            "data": to_dict(cfg)["data"], "aug": to_dict(cfg)["aug"], "model": to_dict(cfg)["model"], "seed": cfg.seed}
    tag = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    cache = os.path.join(out_dir, f"features_{split}.npz")
    if os.path.isfile(cache):
        z = np.load(cache)
        if str(z["tag"]) == tag:
            log0(env, f"svm: features of {split} from {cache}")
            return {k: z[k] for k in ("feats", "labels", "index")}
    loader = build_loader(cfg, split, mode="eval", env=env)
    amp = resolve_amp(cfg, env.device)
    feats, labels, index = [], [], []
    try:
        for batch in loader:
            x = batch["views"][0].to(env.device, non_blocking=True)
            with autocast_context(env.device.type, amp):
                if cfg.svm.feature == "avgpool":
                    f = backbone.backbone_features(x).float()
                else:
                    k = int(cfg.svm.feature[-1])
                    f = F.adaptive_avg_pool2d(backbone.stage_maps(x, (k,))[k].float(), STAGE_POOL[k]).flatten(1)
            feats.append(f.cpu())
            labels.append(batch["label"].cpu())
            index.append(batch["index"].cpu())
    finally:
        loader.close()
    out = {"feats": torch.cat(feats), "labels": torch.cat(labels), "index": torch.cat(index)}
    if env.world > 1:
        out = {k: _gather_rows(v, env) for k, v in out.items()}
    order = torch.argsort(out["index"])
    res = {k: v[order].numpy() for k, v in out.items()}
    if env.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, tag=np.array(tag), **res)
        os.replace(tmp, cache)
        log0(env, f"svm: {len(res['labels'])} {split} features of {res['feats'].shape[1]} dims -> {cache}")
    return res


def _gather_rows(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's rows concatenated (shards differ by at most one row: padded to the max)."""
    import torch.distributed as dist

    n = torch.tensor([x.shape[0]], device=env.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = torch.zeros((m,) + tuple(x.shape[1:]), dtype=x.dtype, device=env.device)
    pad[:x.shape[0]] = x.to(env.device)
    parts = [torch.zeros_like(pad) for _ in range(env.world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:int(s.item())].cpu() for p, s in zip(parts, sizes)])


# --------------------------------------------------------------------------- the SVMs


def choose_cost(x: np.ndarray, y: np.ndarray, costs, folds: int = 3, seed: int = 0) -> Dict[str, object]:
    """The cost with the best mean ``folds``-fold stratified CV accuracy (the first on ties)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [float(cross_val_score(_svc(c), x, y, cv=cv, scoring="accuracy").mean()) for c in costs]
    best = int(np.argmax(scores))
    return {"cost": float(costs[best]), "cv_accuracy": scores[best], "cv": dict(zip(map(float, costs), scores))}


def svm_accuracy(train: Dict[str, np.ndarray], val: Dict[str, np.ndarray], costs, seed: int = 0) -> Dict:
    xt, xv = normalise(train["feats"]), normalise(val["feats"])
    pick = choose_cost(xt, train["labels"], costs, seed=seed)
    clf = _svc(pick["cost"]).fit(xt, train["labels"])
    return {**pick, "accuracy": 100.0 * float((clf.predict(xv) == val["labels"]).mean())}


def low_shot_draw(labels: np.ndarray, k: int, seed: int, draw: int) -> np.ndarray:
    """Row indices of k samples of every class (fewer where a class has fewer), sorted; a pure
    function of (labels, k, seed, draw)."""
    rng = np.random.default_rng(derive_seed(seed, "low-shot", k, draw))
    rows = [rng.choice(np.flatnonzero(labels == c), size=min(k, int((labels == c).sum())), replace=False)
            for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def low_shot(train: Dict[str, np.ndarray], val: Dict[str, np.ndarray], ks, draws: int, costs,
             seed: int = 0) -> List[Dict]:
    xt, xv = normalise(train["feats"]), normalise(val["feats"])
    out = []
    for k in ks:
        acc = np.zeros((len(costs), draws))
        for d in range(draws):
            rows = low_shot_draw(train["labels"], k, seed, d)
            for i, c in enumerate(costs):
                clf = _svc(c).fit(xt[rows], train["labels"][rows])
                acc[i, d] = 100.0 * float((clf.predict(xv) == val["labels"]).mean())
        best = int(np.argmax(acc.mean(1)))
        out.append({"k": int(k), "cost": float(costs[best]), "mean": float(acc[best].mean()),
                    "std": float(acc[best].std()), "draws": acc[best].tolist()})
    return out


def plot_low_shot(curves: Dict[str, List[Dict]], path: str, title: str = "") -> str:
    """PNG: val accuracy (mean over the draws, with +-std bars) against k per class on a log2
    axis, one line per curve (e.g. the trained network and its random init). PIL only."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 400, 60, 150, 30, 45
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ks = sorted({r["k"] for c in curves.values() for r in c})
    lo = min(r["mean"] - r["std"] for c in curves.values() for r in c)
    hi = max(r["mean"] + r["std"] for c in curves.values() for r in c)
    lo, hi = max(0.0, np.floor(lo / 10) * 10), min(100.0, np.ceil(hi / 10) * 10)
    hi = hi if hi > lo else lo + 10

    def xy(k, acc):
        lx = (np.log2(k) - np.log2(ks[0])) / max(np.log2(ks[-1]) - np.log2(ks[0]), 1e-9)
        return left + lx * (w - left - right), top + (1 - (acc - lo) / (hi - lo)) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in ks:
        x, _ = xy(k, lo)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 6, h - bottom + 6), str(k), fill="black")
    for t in np.linspace(lo, hi, 6):
        _, y = xy(ks[0], t)
        d.line([left - 4, y, left, y], fill="black")
        d.text((8, y - 6), f"{t:.0f}%", fill="black")
    d.text((left + 120, h - 18), "k samples per class (log scale)", fill="black")
    d.text((left, 8), title or "low-shot linear SVM: val accuracy", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (name, curve) in enumerate(curves.items()):
        col = colours[i % len(colours)]
        pts = [xy(r["k"], r["mean"]) for r in sorted(curve, key=lambda r: r["k"])]
        d.line(pts, fill=col, width=2)
        for r, (x, y) in zip(sorted(curve, key=lambda r: r["k"]), pts):
            _, y0 = xy(r["k"], r["mean"] - r["std"])
            _, y1 = xy(r["k"], r["mean"] + r["std"])
            d.line([x, y0, x, y1], fill=col)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=col, width=2)
        d.text((w - right + 34, top + 4 + 18 * i), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def run_svm(cfg: Config, checkpoint: str, out_dir: str, env: Optional[DistEnv] = None) -> Dict:
    """``launch.py svm``: features of the train and val splits, the SVM accuracy, the low-shot
    curve; ``svm.json`` in ``out_dir`` (rank 0 fits, the others only extract)."""
    env = env or init_distributed()
    s = cfg.svm
    train = extract(cfg, checkpoint, cfg.data.train_split, env, out_dir)
    val = extract(cfg, checkpoint, cfg.data.val_split, env, out_dir)
    if env.rank != 0:
        return {}
    costs = tuple(s.costs)
    res = {"checkpoint": checkpoint, "feature": s.feature, "train_n": int(len(train["labels"])),
           "val_n": int(len(val["labels"])), "dims": int(train["feats"].shape[1])}
    res["svm"] = svm_accuracy(train, val, costs, seed=cfg.seed)
    log0(env, f"svm: accuracy {res['svm']['accuracy']:.2f}% at C={res['svm']['cost']:g} "
              f"(3-fold CV {100 * res['svm']['cv_accuracy']:.2f}%)")
    res["low_shot"] = low_shot(train, val, s.low_shot, s.draws, costs, seed=cfg.seed) if s.low_shot else []
    for r in res["low_shot"]:
        log0(env, f"svm: low-shot k={r['k']}: {r['mean']:.2f} +- {r['std']:.2f}% (C={r['cost']:g})")
    tmp = os.path.join(out_dir, "svm.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "svm.json"))
    return res
