"""Small real datasets written into tmp dirs for the loader tests."""
import io
import os
import zipfile

import numpy as np
from PIL import Image

from loaders.prepare import photo_crops, write_zip_layout


def colour_of(i: int):
    """A distinct colour per index (steps of 50 survive JPEG and resampling)."""
    return (30 + 50 * (i % 4), 30 + 50 * ((i // 4) % 4), 30 + 50 * ((i // 16) % 4))


def index_of_colour(rgb) -> int:
    r, g, b = (int(round((c - 30) / 50.0)) for c in rgb)
    return r + 4 * g + 16 * b


def jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def colour_items(n: int, size=(40, 32), classes: int = 3):
    for i in range(n):
        arr = np.empty((size[1], size[0], 3), dtype=np.uint8)
        arr[:] = colour_of(i)
        yield f"c{i % classes}/img_{i:04d}.jpg", jpeg_bytes(arr), i % classes


def make_colour_zip(root: str, n: int = 24, split: str = "train", **kw) -> str:
    write_zip_layout(root, split, colour_items(n, **kw))
    return root


def channel_items(n: int, size=(20, 20)):
    """Constant-colour images whose class is the dominant channel (i % 3 at 200, the other two
    channels at 40-100): 3 classes separated by a wide margin in RGB, and so in the pooled
    features of a (random) ResNet, unlike ``colour_items`` whose labels are unrelated to the
    colour."""
    for i in range(n):
        c = i % 3
        rgb = [40 + 30 * ((i // 3) % 3), 40 + 30 * ((i // 9) % 3)]
        rgb.insert(c, 200)
        arr = np.empty((size[1], size[0], 3), dtype=np.uint8)
        arr[:] = rgb
        yield f"c{c}/img_{i:04d}.jpg", jpeg_bytes(arr), c


def make_colour_train_val(root: str, n_train: int = 32, n_val: int = 16, size=(20, 20)) -> str:
    """A tiny train + val pair in the zip layout (the trainer tests' dataset)."""
    make_colour_zip(root, n=n_train, size=size)
    make_colour_zip(root, n=n_val, split="val", size=size)
    return root


def make_colour_folder(root: str, n: int = 24, split: str = "train", **kw) -> str:
    for rel, data, _ in colour_items(n, **kw):
        p = os.path.join(root, split, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return root


def make_photo_zip(root: str, n: int = 32, val: int = 0) -> str:
    """Real photographs (Debian mate-backgrounds) cut into small JPEGs."""
    photo_crops(root, n=n, val=val, short_side=(64, 96), seed=1)
    return root


def rewrite_member(root: str, split: str, member: str, data: bytes) -> None:
    """Replace one member of <split>.zip (rewriting the archive)."""
    zp = os.path.join(root, f"{split}.zip")
    with zipfile.ZipFile(zp) as zf:
        items = [(zi, zf.read(zi)) for zi in zf.infolist()]
    with zipfile.ZipFile(zp + ".new", "w") as zf:
        for zi, d in items:
            zf.writestr(zi, data if zi.filename == member else d)
    os.replace(zp + ".new", zp)
    idx = zp + ".fastinst-index.npz"
    if os.path.exists(idx):
        os.remove(idx)
