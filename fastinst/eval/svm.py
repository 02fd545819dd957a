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
- multi-label data (VOC-style maps, several labels per line): one binary LinearSVC per class
  with VOC's class weights {+1: 2, -1: 1}, its cost chosen by 3-fold CV average precision on
  the train features; reported: mAP over the classes on the val split (scikit-learn's
  non-interpolated average precision);
- low-shot: k in ``svm.low_shot`` samples per class from the train features, ``svm.draws``
  fixed draws (seeded by (seed, k, draw)); multi-label: per class k positives and (C - 1) k
  negatives (MMSelfSup's sampling); for each k the cost whose mean val accuracy (mAP) over
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

from ..config import Config, to_dict
from ..core.runtime import DistEnv, derive_seed, init_distributed, log0
from ..train.checkpoint import _atomic_write


def _svc(cost: float, voc_weights: bool = False):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4, max_iter=2000,
                     class_weight={1: 2, -1: 1} if voc_weights else None)


def label_matrix(label_sets, index: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, C] +1 / -1 targets of the samples ``index`` from their label lists."""
    y = -np.ones((len(index), num_classes), dtype=np.int64)
    for row, i in enumerate(index):
        y[row, label_sets[int(i)]] = 1
    return y


def _ap(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y == 1, score))


def svm_map(train: Dict[str, np.ndarray], val: Dict[str, np.ndarray], costs, seed: int = 0) -> Dict:
    """Multi-label: per class, the cost by 3-fold CV AP, then AP on val; mAP in percent.
    ``train["targets"]`` / ``val["targets"]``: [N, C] +1 / -1."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    xt, xv = normalise(train["feats"]), normalise(val["feats"])
    per, skipped = [], []
    for c in range(train["targets"].shape[1]):
        yt = train["targets"][:, c]
        n_pos, n_val = int((yt == 1).sum()), int((val["targets"][:, c] == 1).sum())
        if n_pos < 3 or n_val < 1:  # no 3-fold CV, or no AP, is possible: left out of the mAP
            skipped.append({"class": c, "train_positives": n_pos, "val_positives": n_val})
            continue
        cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
        scores = [float(cross_val_score(_svc(k, True), xt, yt, cv=cv, scoring="average_precision").mean())
                  for k in costs]
        best = float(costs[int(np.argmax(scores))])
        ap = _ap(val["targets"][:, c], _svc(best, True).fit(xt, yt).decision_function(xv))
        per.append({"class": c, "cost": best, "cv_ap": max(scores), "ap": ap})
    if not per:
        raise ValueError("svm: no class has >= 3 train positives and a val positive: no mAP to report")
    return {"map": 100.0 * float(np.mean([p["ap"] for p in per])), "per_class": per, "skipped": skipped}


def normalise(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


# --------------------------------------------------------------------------- features


@torch.no_grad()
def extract(cfg: Config, checkpoint: str, split: str, env: DistEnv, out_dir: str) -> Dict[str, np.ndarray]:
    """{feats [N, F] float32, labels [N], index [N]} of ``split`` (cached in ``out_dir``)."""
    from loaders import build_loader

    from ..train.build import resolve_amp
    from ..train.evaluation import gather_rows
    from .frozen import build_frozen_backbone, frozen_features

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
            f = frozen_features(backbone, x, [cfg.svm.feature], amp)[cfg.svm.feature].flatten(1)  # [B, F]
            feats.append(f.cpu())
            labels.append(batch["label"].cpu())
            index.append(batch["index"].cpu())
    finally:
        loader.close()
    out = {"feats": torch.cat(feats), "labels": torch.cat(labels), "index": torch.cat(index)}
    if env.world > 1:
        out = {k: gather_rows(v.to(env.device), env.world).cpu() for k, v in out.items()}
    order = torch.argsort(out["index"])
    res = {k: v[order].numpy() for k, v in out.items()}
    if env.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write(cache, lambda f: np.savez(f, tag=np.array(tag), **res))
        log0(env, f"svm: {len(res['labels'])} {split} features of {res['feats'].shape[1]} dims -> {cache}")
    return res


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


def low_shot_multilabel_draw(targets: np.ndarray, c: int, k: int, seed: int, draw: int) -> np.ndarray:
    """Class c's low-shot rows: k of its positives and (C - 1) k of its negatives (MMSelfSup's
    VOC sampling), sorted; a pure function of (targets, c, k, seed, draw)."""
    rng = np.random.default_rng(derive_seed(seed, "low-shot-multilabel", c, k, draw))
    pos, neg = np.flatnonzero(targets[:, c] == 1), np.flatnonzero(targets[:, c] != 1)
    n_neg = min(len(neg), (targets.shape[1] - 1) * k)
    return np.sort(np.concatenate([rng.choice(pos, size=min(k, len(pos)), replace=False),
                                   rng.choice(neg, size=n_neg, replace=False)]))


def _low_shot_score(xt, xv, train, val, k: int, seed: int, draw: int, cost: float, classes=()) -> float:
    """Val accuracy (single-label) or mAP (multi-label) of one draw at one cost, in percent."""
    if "targets" not in train:
        rows = low_shot_draw(train["labels"], k, seed, draw)
        clf = _svc(cost).fit(xt[rows], train["labels"][rows])
        return 100.0 * float((clf.predict(xv) == val["labels"]).mean())
    aps = []
    for c in classes:
        rows = low_shot_multilabel_draw(train["targets"], c, k, seed, draw)
        clf = _svc(cost, True).fit(xt[rows], train["targets"][rows, c])
        aps.append(_ap(val["targets"][:, c], clf.decision_function(xv)))
    return 100.0 * float(np.mean(aps))


def low_shot(train: Dict[str, np.ndarray], val: Dict[str, np.ndarray], ks, draws: int, costs,
             seed: int = 0, classes=()) -> List[Dict]:
    """``classes``: the multi-label classes scored (those the full protocol kept)."""
    xt, xv = normalise(train["feats"]), normalise(val["feats"])
    out = []
    for k in ks:
        acc = np.zeros((len(costs), draws))
        for d in range(draws):
            for i, c in enumerate(costs):
                acc[i, d] = _low_shot_score(xt, xv, train, val, k, seed, d, c, classes)
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
    env = env or init_distributed(cfg.dist.timeout_minutes)
    s = cfg.svm
    train = extract(cfg, checkpoint, cfg.data.train_split, env, out_dir)
    val = extract(cfg, checkpoint, cfg.data.val_split, env, out_dir)
    if env.rank != 0:
        return {}
    from loaders.sources import open_source

    d = cfg.data  # the labels only: no RAM cache is built for them
    srcs = {sp: open_source(d.path, sp, on_error=d.on_error, num_classes=d.num_classes, classes=d.classes)
            for sp in (d.train_split, d.val_split)}
    multi = any(src.label_sets is not None for src in srcs.values())
    if multi:  # VOC-style: every label of each sample, as +1 / -1 targets
        n_cls = d.num_classes or 1 + max(int(lab.max()) for src in srcs.values() if src.label_sets
                                         for lab in src.label_sets)
        for split, part in ((d.train_split, train), (d.val_split, val)):
            src = srcs[split]
            label_sets = src.label_sets or [np.array([int(y)]) for y in src.labels]
            part["targets"] = label_matrix(label_sets, part["index"], n_cls)
    costs = tuple(s.costs)
    res = {"checkpoint": checkpoint, "feature": s.feature, "train_n": int(len(train["labels"])),
           "val_n": int(len(val["labels"])), "dims": int(train["feats"].shape[1]), "multi_label": multi}
    if multi:
        res["svm"] = svm_map(train, val, costs, seed=cfg.seed)
        res["svm"]["accuracy"] = res["svm"]["map"]  # the headline figure: mAP for multi-label data
        res["svm"]["cost"] = float(np.median([p["cost"] for p in res["svm"]["per_class"]]))
        log0(env, f"svm: mAP {res['svm']['map']:.2f}% over {len(res['svm']['per_class'])} classes "
                  "(a cost per class by 3-fold CV AP)")
    else:
        res["svm"] = svm_accuracy(train, val, costs, seed=cfg.seed)
        log0(env, f"svm: accuracy {res['svm']['accuracy']:.2f}% at C={res['svm']['cost']:g} "
                  f"(3-fold CV {100 * res['svm']['cv_accuracy']:.2f}%)")
    kept = [p["class"] for p in res["svm"].get("per_class", [])]
    res["low_shot"] = low_shot(train, val, s.low_shot, s.draws, costs, seed=cfg.seed, classes=kept) if s.low_shot else []
    for r in res["low_shot"]:
        log0(env, f"svm: low-shot k={r['k']}: {r['mean']:.2f} +- {r['std']:.2f}% (C={r['cost']:g})")
    _atomic_write(os.path.join(out_dir, "svm.json"), lambda f: f.write(json.dumps(res, indent=2).encode()))
    return res
