"""data.classes=FILE (ImageNet-100 and other class subsets): only the listed classes, relabelled
0..C-1 in sorted order, in the zip and folder layouts and in ``prepare imagenet``."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import load_config
from fastinst.core.runtime import DistEnv
from loaders import build_source
from loaders.prepare import imagenet_to_zip, photo_crops
from loaders.sources import DataError, open_source


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    zipped, folder = str(root / "zip"), str(root / "folder")
    for out, as_folder in ((zipped, False), (folder, True)):
        photo_crops(out, n=60, val=12, short_side=(40, 56), seed=2, folder=as_folder)
    return zipped, folder


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_subset_keeps_the_listed_classes_relabelled_in_sorted_order(layouts, tmp_path, layout):
    path = layouts[0] if layout == "zip" else layouts[1]
    full = open_source(path, "train")
    present = sorted({n.split("/")[0] for n in full.names})
    assert len(present) >= 4
    pick = [present[3], present[0], present[2]]  # listed out of order, with a comment and a blank line
    lst = _write(tmp_path / "subset.txt", f"{pick[0]}  # a comment", "", pick[1], pick[2])
    sub = open_source(path, "train", classes=lst)
    want = [i for i, n in enumerate(full.names) if n.split("/")[0] in pick]  # brute force, in order
    assert [sub.names[j] for j in range(len(sub))] == [full.names[i] for i in want]
    relabel = {c: k for k, c in enumerate(sorted(pick))}
    assert sub.labels.tolist() == [relabel[full.names[i].split("/")[0]] for i in want]
    assert sub.num_classes == 3
    for j in (0, len(sub) - 1):
        assert np.array_equal(sub.read(j), full.read(want[j])) and sub.describe(j) == full.describe(want[j])
    cfg = load_config(None, [f"data.path={path}", f"data.classes={lst}"])
    assert len(build_source(cfg, "train", DistEnv())) == len(sub)


def test_bad_lists_are_named(layouts, tmp_path):
    path = layouts[0]
    with pytest.raises(DataError, match=r"nothere\.txt: class list not found \(config key data\.classes\)"):
        open_source(path, "train", classes=str(tmp_path / "nothere.txt"))
    with pytest.raises(DataError, match=r"empty\.txt: class list is empty"):
        open_source(path, "train", classes=_write(tmp_path / "empty.txt", "# only a comment"))
    with pytest.raises(DataError, match=r"missing\.txt: 1 listed class\(es\) have no samples in train\.zip: "
                                        r"\['n99999999'\]"):
        open_source(path, "train", classes=_write(tmp_path / "missing.txt", "n99999999"))
    with pytest.raises(DataError, match=r"twice\.txt: classes listed twice"):
        open_source(path, "train", classes=_write(tmp_path / "twice.txt", "a", "a"))


def test_prepare_imagenet_keeps_the_subset(layouts, tmp_path):
    folder = layouts[1]
    full = open_source(folder, "train")
    present = sorted({n.split("/")[0] for n in full.names})
    lst = _write(tmp_path / "two.txt", present[1], present[0])
    out = str(tmp_path / "zipped")
    counts = imagenet_to_zip(folder, out, classes=lst)
    got = open_source(out, "train")
    want = [i for i, n in enumerate(full.names) if n.split("/")[0] in present[:2]]
    assert counts["train"] == len(got) == len(want)
    assert got.labels.tolist() == [present[:2].index(full.names[i].split("/")[0]) for i in want]
    assert open(os.path.join(out, "classes.txt")).read().split() == present[:2]
