"""``launch.py svm`` (fastinst/eval/svm.py): the SVM protocol against a direct scikit-learn run
written here, reproducible low-shot draws, and the command end to end with its random-init
baseline, feature cache and plot."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.model_selection import StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402

from fastinst.eval import svm  # noqa: E402
from test_linear import TINY, colours  # noqa: E402,F401  (the fixture)

COSTS = (0.01, 0.1, 1.0, 10.0)


def blobs(n_per_class: int, seed: int):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(3, 20)) * 0.35  # overlapping classes: accuracy depends on the cost
    x = np.concatenate([c + g.normal(size=(n_per_class, 20)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(3), n_per_class)
    return {"feats": x, "labels": y, "index": np.arange(len(y))}


def test_cost_choice_and_accuracy_match_a_direct_sklearn_run():
    train, val = blobs(30, 0), blobs(10, 1)
    got = svm.svm_accuracy(train, val, COSTS, seed=0)
    # the protocol, spelled out with scikit-learn: rows / (|row| + 1e-5), 3-fold stratified CV
    # accuracy over the grid, the best cost refit on all train rows, accuracy on val
    xt = train["feats"] / (np.linalg.norm(train["feats"], axis=1, keepdims=True) + 1e-5)
    xv = val["feats"] / (np.linalg.norm(val["feats"], axis=1, keepdims=True) + 1e-5)
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    make = lambda c: LinearSVC(C=c, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4, max_iter=2000)  # noqa
    scores = [cross_val_score(make(c), xt, train["labels"], cv=cv, scoring="accuracy").mean() for c in COSTS]
    best = COSTS[int(np.argmax(scores))]
    acc = 100.0 * (make(best).fit(xt, train["labels"]).predict(xv) == val["labels"]).mean()
    assert got["cost"] == best and got["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert got["cv_accuracy"] == pytest.approx(max(scores))
    assert len(set(np.round(scores, 6))) > 1  # the grid matters on this data: a real choice


def test_low_shot_draws_are_reproducible_and_per_class():
    labels = np.repeat(np.arange(4), 25)
    a = svm.low_shot_draw(labels, 8, seed=3, draw=1)
    assert np.array_equal(a, svm.low_shot_draw(labels, 8, seed=3, draw=1))
    assert np.bincount(labels[a], minlength=4).tolist() == [8, 8, 8, 8]
    assert not np.array_equal(a, svm.low_shot_draw(labels, 8, seed=3, draw=2))
    assert not np.array_equal(a, svm.low_shot_draw(labels, 8, seed=4, draw=1))
    assert np.bincount(labels[svm.low_shot_draw(labels, 40, 0, 0)]).tolist() == [25] * 4  # capped per class


def test_low_shot_picks_the_cost_by_the_mean_over_draws():
    train, val = blobs(20, 2), blobs(10, 3)
    (got,) = svm.low_shot(train, val, [2], 3, COSTS, seed=5)
    xt, xv = svm.normalise(train["feats"]), svm.normalise(val["feats"])
    acc = np.array([[100.0 * (LinearSVC(C=c, dual=True, tol=1e-4, max_iter=2000).fit(xt[r], train["labels"][r]).predict(xv)
                              == val["labels"]).mean() for r in (svm.low_shot_draw(train["labels"], 2, 5, d)
                                                                  for d in range(3))] for c in COSTS])
    best = int(np.argmax(acc.mean(1)))
    assert got["cost"] == COSTS[best] and got["draws"] == pytest.approx(acc[best].tolist())
    assert got["mean"] == pytest.approx(acc[best].mean()) and got["std"] == pytest.approx(acc[best].std())


def test_launch_svm_with_random_init_baseline(colours, tmp_path, capsys):  # noqa: F811
    import launch
    from fastinst.config import save_config
    from fastinst.config import load_config

    data, ckpt = colours
    cfg = str(tmp_path / "c.yaml")
    save_config(load_config(None, TINY + [f"data.path={data}", "svm.costs=[0.1, 1.0, 10.0]", "svm.low_shot=[1, 2, 4]",
                                          "svm.draws=2"]), cfg)
    out = str(tmp_path / "svm")
    assert launch.main(["svm", "--config", cfg, "--checkpoint", ckpt, "--out", out, "--baseline", "random"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    res = json.loads(printed[-1])
    tr, base = res["trained"], res["random_init"]
    assert tr["dims"] == 512 * 2 * 2 and tr["train_n"] == 32 and tr["val_n"] == 16  # feat5 of resnet18, 2x2
    assert [r["k"] for r in tr["low_shot"]] == [1, 2, 4] and all(len(r["draws"]) == 2 for r in tr["low_shot"])
    assert 0 <= base["svm"]["accuracy"] <= 100 and printed[-2].startswith("plot: ")
    assert os.path.isfile(os.path.join(out, "low_shot.png")) and os.path.isfile(os.path.join(out, "svm.json"))
    stamp = os.path.getmtime(os.path.join(out, "features_train.npz"))
    assert launch.main(["svm", "--config", cfg, "--checkpoint", ckpt, "--out", out]) == 0  # cached features
    assert os.path.getmtime(os.path.join(out, "features_train.npz")) == stamp
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trained"]["svm"] == tr["svm"]


# --------------------------------------------------------------------------- multi-label (VOC-style)


def _multilabel_zip(root, n_train=30, n_val=12):
    """Photo crops whose map lines list two labels: the source photo's and (its index % 3) + 12."""
    from loaders.prepare import photo_crops

    photo_crops(root, n=n_train, val=n_val, short_side=(40, 56), seed=4)
    for split in ("train", "val"):
        path = os.path.join(root, f"{split}_map.txt")
        lines = [ln.rstrip("\n").split("\t") for ln in open(path) if ln.strip()]
        with open(path, "w") as f:
            f.writelines(f"{name}\t{lab},{int(lab) % 3 + 12}\n" for name, lab in lines)
    return root


def test_multilabel_maps_parse_and_bad_labels_are_named(tmp_path):
    from loaders.sources import DataError, open_source

    root = _multilabel_zip(str(tmp_path / "ml"))
    src = open_source(root, "train")
    raw = [ln.rstrip("\n").split("\t") for ln in open(os.path.join(root, "train_map.txt"))]
    assert [s.tolist() for s in src.label_sets] == [[int(v) for v in lab.split(",")] for _, lab in raw]
    assert src.labels.tolist() == [int(lab.split(",")[0]) for _, lab in raw]  # loaders read the first
    path = os.path.join(root, "val_map.txt")
    first = open(path).readline().split("\t")[0]
    with open(path, "a") as f:
        f.write(f"{first}\t2 7,-1\n")
    with pytest.raises(DataError, match=r"val_map\.txt:13 .*: label -1 out of range"):
        open_source(root, "val")


def test_multilabel_map_matches_a_direct_sklearn_run():
    from sklearn.metrics import average_precision_score

    g = np.random.default_rng(7)
    n, d, c = 60, 12, 3
    x = g.normal(size=(n + 30, d)).astype(np.float32)
    targets = np.where(x[:, :c] + 0.8 * g.normal(size=(n + 30, c)) > 0.3, 1, -1)
    train = {"feats": x[:n], "targets": targets[:n], "labels": np.zeros(n, int), "index": np.arange(n)}
    val = {"feats": x[n:], "targets": targets[n:], "labels": np.zeros(30, int), "index": np.arange(30)}
    got = svm.svm_map(train, val, COSTS, seed=0)
    xt = train["feats"] / (np.linalg.norm(train["feats"], axis=1, keepdims=True) + 1e-5)
    xv = val["feats"] / (np.linalg.norm(val["feats"], axis=1, keepdims=True) + 1e-5)
    aps = []
    for k in range(c):
        make = lambda C: LinearSVC(C=C, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4,  # noqa: E731
                                   max_iter=2000, class_weight={1: 2, -1: 1})
        cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
        s = [cross_val_score(make(C), xt, targets[:n, k], cv=cv, scoring="average_precision").mean() for C in COSTS]
        best = COSTS[int(np.argmax(s))]
        assert got["per_class"][k]["cost"] == best
        aps.append(average_precision_score(targets[n:, k] == 1, make(best).fit(xt, targets[:n, k]).decision_function(xv)))
    assert got["map"] == pytest.approx(100 * np.mean(aps), abs=1e-9)


def test_launch_svm_on_a_multilabel_split(tmp_path, capsys):
    import launch
    from fastinst.config import load_config, save_config

    root = _multilabel_zip(str(tmp_path / "ml"))
    cfg = str(tmp_path / "c.yaml")
    save_config(load_config(None, TINY + [f"data.path={root}", "svm.costs=[0.1, 1.0]", "svm.low_shot=[1, 2]",
                                          "svm.draws=2", "svm.feature=avgpool"]), cfg)
    assert launch.main(["svm", "--config", cfg, "--checkpoint", "random", "--out", str(tmp_path / "svm")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    res = json.loads(printed[-1])["trained"]
    assert res["multi_label"] and 0 <= res["svm"]["map"] <= 100 and res["dims"] == 512
    kept, skipped = res["svm"]["per_class"], res["svm"]["skipped"]
    assert len(kept) + len(skipped) == 15 and {12, 13, 14} <= {p["class"] for p in kept}  # the shared labels
    assert all(s["train_positives"] < 3 or s["val_positives"] == 0 for s in skipped)  # rare photo labels
    assert [r["k"] for r in res["low_shot"]] == [1, 2]
    assert any(ln.startswith("svm: mAP ") for ln in printed)
