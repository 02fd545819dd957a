"""Image sources: where the encoded bytes of sample ``i`` come from.

Two layouts, detected from ``data.path``:

* PIC's zip layout: ``<split>.zip`` + ``<split>_map.txt`` (``relpath<TAB>label`` per line).
  Members are located once through the central directory (an offset index, cached beside
  the zip as ``<split>.zip.fastinst-index.npz`` when the directory is writable); stored
  members are then zero-copy slices of one read-only mmap, deflated ones are inflated.
  There is no per-sample ``zipfile`` call (PIC's ZipReader opens the archive per read).
  It is loaders/zip_source.py; what every source shares is loaders/source_base.py.
* ImageNet folder layout: ``<split>/<synset>/<image>``; labels follow sorted synset names.

A source is picklable: the mmap / open files are dropped on pickling and reopened lazily, so
DALI's worker processes and torch's DataLoader workers each map the file themselves.

``index`` i always refers to the i-th sample kept (map line i when nothing is skipped);
``describe(i)`` names the file (and map line) for error messages.
"""
from __future__ import annotations

import os
import zlib
from typing import List, Sequence

import numpy as np

from .source_base import (DataError, PIL_decode_check, Source, check_encoded, check_labels, log,  # noqa: F401
                          owned_indices)
from .zip_source import ZipSource

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------- folder


class FolderSource(Source):
    """ImageNet folder layout: ``root/<class>/<image>``; labels follow sorted class names."""

    def __init__(self, root: str, *, on_error: str = "raise", num_classes: int = 0):
        if not os.path.isdir(root):
            raise DataError(f"{root}: split directory not found")
        self.root = root
        self.origin = root
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        names, labels = [], []
        for label, cls in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
                for fn in sorted(files):
                    if fn.lower().endswith(IMG_EXTENSIONS):
                        names.append(os.path.relpath(os.path.join(dirpath, fn), root))
                        labels.append(label)
        if not names:
            raise DataError(f"{root}: empty dataset (no images with extensions {', '.join(IMG_EXTENSIONS)} "
                            "in class subdirectories)")
        labels = np.asarray(labels, dtype=np.int64)
        keep = np.ones(len(names), dtype=bool)
        check_labels(labels, [os.path.join(root, n) for n in names], num_classes, on_error, keep)
        self.classes = classes
        self.skipped = int((~keep).sum())
        self.names = [n for n, k in zip(names, keep) if k]
        self.labels = labels[keep]

    def read(self, i: int) -> np.ndarray:
        return np.fromfile(os.path.join(self.root, self.names[i]), dtype=np.uint8)

    def nbytes(self, i: int) -> int:
        return os.path.getsize(os.path.join(self.root, self.names[i]))

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


# --------------------------------------------------------------------------- class subsets


def read_class_list(path: str) -> List[str]:
    """Class names (ImageNet synsets), one per line (blank lines and '#' comments ignored)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: class list not found (config key data.classes)")
    with open(path, encoding="utf-8") as f:
        names = [ln.split("#")[0].strip() for ln in f]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: class list is empty (config key data.classes)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: classes listed twice: {dup[:5]} (config key data.classes)")
    return names


def class_of(name: str) -> str:
    """A sample's class: the first directory of its path (``<synset>/<file>`` in both layouts)."""
    parts = name.replace(os.sep, "/").split("/", 1)
    return parts[0] if len(parts) == 2 else ""


class SubsetSource(Source):
    """The samples of ``base`` whose class (`class_of`) is in the list, relabelled 0..C-1 in
    sorted class order (what an ImageFolder over the subset would give: CMC's ImageNet-100)."""

    def __init__(self, base: Source, classes: Sequence[str], list_path: str = "data.classes"):
        present = {class_of(n) for n in base.names}
        missing = sorted(set(classes) - present)
        if missing:
            raise DataError(f"{list_path}: {len(missing)} listed class(es) have no samples in {base.origin}: "
                            f"{missing[:5]} (samples are <class>/<file>; config key data.classes)")
        order = {c: i for i, c in enumerate(sorted(classes))}
        self.base = base
        self.index = np.array([i for i, n in enumerate(base.names) if class_of(n) in order], dtype=np.int64)
        self.names = [base.names[i] for i in self.index]
        self.labels = np.array([order[class_of(n)] for n in self.names], dtype=np.int64)
        self.classes = sorted(classes)
        self.origin = base.origin
        for attr in ("zip_path", "root"):  # what the RAM cache keys its files on (with subset_tag)
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self.subset_tag = f"{os.path.abspath(list_path)}:{zlib.crc32(chr(10).join(self.classes).encode())}"

    def read(self, i: int) -> np.ndarray:
        return self.base.read(int(self.index[i]))

    def nbytes(self, i: int) -> int:
        return self.base.nbytes(int(self.index[i]))

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.index[i]))


# --------------------------------------------------------------------------- opening


def detect_layout(path: str, split: str) -> str:
    if os.path.isfile(os.path.join(path, f"{split}.zip")) or os.path.isfile(os.path.join(path, f"{split}_map.txt")):
        return "zip"
    if os.path.isdir(os.path.join(path, split)):
        return "folder"
    if not os.path.isdir(path):
        raise DataError(f"{path}: data.path does not exist")
    raise DataError(f"{path}: holds neither {split}.zip + {split}_map.txt (zip layout) nor a {split}/ "
                    "directory (ImageNet folder layout); run `python launch.py prepare` to make one")


def open_source(path: str, split: str, *, on_error: str = "raise", num_classes: int = 0,
                classes: str = "") -> Source:
    """The split in either layout; ``classes``: a class-list file keeping only those classes."""
    layout = detect_layout(path, split)
    if layout == "zip":
        zp = os.path.join(path, f"{split}.zip")
        if not os.path.isfile(zp):
            raise DataError(f"{zp}: zip file not found (its map {split}_map.txt exists)")
        src: Source = ZipSource(zp, os.path.join(path, f"{split}_map.txt"), on_error=on_error,
                                num_classes=0 if classes else num_classes)
    else:
        src = FolderSource(os.path.join(path, split), on_error=on_error, num_classes=0 if classes else num_classes)
    return SubsetSource(src, read_class_list(classes), classes) if classes else src
