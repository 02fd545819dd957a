"""``launch.py prepare``: build datasets in PIC's zip layout.

* ``imagenet``: an ImageNet folder tree (``train/<synset>/*.JPEG``, ``val/<synset>/*``) ->
  ``train.zip`` + ``train_map.txt`` (same for val). Members are STORED (JPEG does not deflate)
  so the loader reads them as zero-copy mmap slices.
* ``fmnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files in
  /usr/share/datasets/fashion-mnist) -> the same layout with one JPEG per image: the embedded
  demo dataset (60k train / 10k val, 10 classes).
* ``photos``: ImageNet-sized JPEGs cut at random from real photographs (e.g. Debian's
  ``mate-backgrounds``): the decode benchmark and test data, labelled by source photograph.

Every archive is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import time
import zipfile
from typing import Iterable, Optional, Tuple

import numpy as np

from .sources import log

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
PHOTO_DIR = "/usr/share/backgrounds/mate/nature"


def write_zip_layout(out_dir: str, split: str, items: Iterable[Tuple[str, bytes, int]], total: Optional[int] = None) -> int:
    """Write ``<split>.zip`` and ``<split>_map.txt`` from (relpath, bytes, label) items."""
    os.makedirs(out_dir, exist_ok=True)
    zpath = os.path.join(out_dir, f"{split}.zip")
    mpath = os.path.join(out_dir, f"{split}_map.txt")
    tmpz, tmpm = zpath + ".tmp", mpath + ".tmp"
    n, t0, last = 0, time.time(), time.time()
    with zipfile.ZipFile(tmpz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
            open(tmpm, "w", encoding="utf-8") as mf:
        for rel, data, label in items:
            if "\t" in rel or "\n" in rel:
                raise ValueError(f"member name {rel!r} contains a tab or newline; rename it")
            zf.writestr(zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0)), data)
            mf.write(f"{rel}\t{label}\n")
            n += 1
            if time.time() - last > 5:
                last = time.time()
                log(f"{split}: {n}{'/' + str(total) if total else ''} images ({n / (last - t0):.0f}/s)")
    os.replace(tmpz, zpath)
    os.replace(tmpm, mpath)
    log(f"wrote {zpath} ({n} images, {os.path.getsize(zpath) / 2**20:.1f} MiB) and {mpath}")
    return n


# --------------------------------------------------------------------------- ImageNet tree


def imagenet_to_zip(src: str, out_dir: str, splits=("train", "val"), classes: str = "") -> dict:
    """An ImageNet folder tree in PIC's zip layout; ``classes``: a class-list file (data.classes)
    keeping only those synsets, relabelled 0..C-1 in sorted order (ImageNet-100)."""
    from .sources import DataError, FolderSource, SubsetSource, read_class_list

    counts = {}
    for split in splits:
        root = os.path.join(src, split)
        if not os.path.isdir(root):
            raise DataError(f"{root}: not found; expected an ImageNet folder tree with {split}/<synset>/<images>")
        fs = FolderSource(root)
        if classes:
            fs = SubsetSource(fs, read_class_list(classes), classes)

        def items(fs=fs):
            for i, rel in enumerate(fs.names):
                yield rel.replace(os.sep, "/"), bytes(fs.read(i)), int(fs.labels[i])

        counts[split] = write_zip_layout(out_dir, split, items(), total=len(fs))
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(fs.classes) + "\n")
    return counts


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX type 0x{dtype_code:02x} unsupported (expected unsigned byte)")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX payload has {arr.size} bytes, header says {dims}")
    return arr.reshape(dims)


def _find_idx(src: str, stem: str) -> str:
    for cand in (f"{stem}.gz", stem):
        p = os.path.join(src, cand)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{os.path.join(src, stem)}[.gz] not found: install the Debian package "
                            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


def _jpeg_gray(args) -> bytes:
    """JPEG bytes of one grey image (a pool worker's job: module level so it pickles)."""
    from PIL import Image

    arr, quality = args
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def fmnist_to_zip(out_dir: str, src: str = FMNIST_DIR, limit_train: int = 0, limit_val: int = 0,
                  quality: int = 95, workers: int = 1) -> dict:
    """Fashion-MNIST's IDX files as JPEGs in the zip layout (train = the 60k training images,
    val = the 10k test images); ``workers`` processes encode in parallel, in order."""
    counts = {}
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
    try:
        for split, prefix, limit in (("train", "train", limit_train), ("val", "t10k", limit_val)):
            images = read_idx(_find_idx(src, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28) uint8
            labels = read_idx(_find_idx(src, f"{prefix}-labels-idx1-ubyte"))  # (N,) uint8
            if limit:
                images, labels = images[:limit], labels[:limit]
            jobs = ((images[i], quality) for i in range(len(images)))
            encoded = pool.imap(_jpeg_gray, jobs, chunksize=256) if pool else map(_jpeg_gray, jobs)

            def items(encoded=encoded, labels=labels):
                for i, data in enumerate(encoded):
                    y = int(labels[i])
                    yield f"{FMNIST_CLASSES[y]}/{i:05d}.jpg", data, y

            counts[split] = write_zip_layout(out_dir, split, items(), total=len(images))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(FMNIST_CLASSES) + "\n")
    return counts


# --------------------------------------------------------------------------- photo crops


def photo_crops(out_dir: str, n: int = 2000, src: str = PHOTO_DIR, seed: int = 0, quality: int = 90,
                split: str = "train", val: int = 0, folder: bool = False, short_side=(300, 500)) -> dict:
    """ImageNet-sized crops (short side ~ 300-500 px, aspect 3:4-4:3, like ImageNet's ~400x350
    average) cut at random from real photographs; label = source photograph."""
    from PIL import Image

    paths = sorted(glob.glob(os.path.join(src, "*.jpg")) + glob.glob(os.path.join(src, "*.JPEG")))
    if not paths:
        raise FileNotFoundError(f"no JPEG photographs in {src}: apt-get install mate-backgrounds, or pass --src")
    photos = [Image.open(p).convert("RGB") for p in paths]
    rng = np.random.default_rng(seed)

    def items(count, offset):
        for k in range(count):
            label = int(rng.integers(len(photos)))
            im = photos[label]
            short = int(rng.integers(short_side[0], short_side[1] + 1))
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
            # take a region up to 2x larger and downscale it, so crops are not all 1:1 pixels
            zoom = float(rng.uniform(1.0, 2.0))
            cw, ch = min(im.width, int(w * zoom)), min(im.height, int(h * zoom))
            x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
            crop = im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=quality)
            name = os.path.splitext(os.path.basename(paths[label]))[0].lower()
            yield f"{name}/{name}_{offset + k:06d}.JPEG", buf.getvalue(), label

    counts = {}
    for sp, count, offset in ((split, n, 0), ("val", val, n)):
        if count <= 0:
            continue
        if folder:
            for rel, data, _ in items(count, offset):
                p = os.path.join(out_dir, sp, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(data)
            counts[sp] = count
        else:
            counts[sp] = write_zip_layout(out_dir, sp, items(count, offset), total=count)
    return counts
