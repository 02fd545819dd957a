"""What every source shares: the `Source` interface, `DataError` (bad input, naming the file),
the cheap structural check of encoded bytes, the label range check, a full PIL decode (what
names a sample the fast decoders could not read) and the 'part' ownership rule. The sources
themselves are loaders/zip_source.py and loaders/sources.py.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import numpy as np


class DataError(RuntimeError):
    """Bad input data. The message names the file (and map line where there is one)."""


def log(msg: str) -> None:
    print(f"[fastinst] {msg}", file=sys.stderr, flush=True)


def check_encoded(buf, where: str) -> None:
    """Cheap structural check of an encoded image; raises DataError naming ``where``.

    Catches empty files, non-image bytes and truncated JPEG/PNG files (the usual damage of an
    interrupted copy) without decoding. Entropy-coded JPEG data stuffs every 0xFF with 0x00, so
    an end-of-image marker FFD9 near the end can only be a real marker: a file without one in
    its last 4 KiB is truncated (trailing bytes after EOI, which some ImageNet files have, pass).
    """
    n = len(buf)
    if n < 8:
        raise DataError(f"{where}: empty or too short to be an image ({n} bytes)")
    head = bytes(buf[:8])
    if head[:2] == b"\xff\xd8":
        tail = bytes(buf[max(0, n - 4096):])
        if b"\xff\xd9" not in tail:
            raise DataError(f"{where}: truncated JPEG (no end-of-image marker)")
        return
    if head == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in bytes(buf[max(0, n - 64):]):
            raise DataError(f"{where}: truncated PNG (no IEND chunk)")
        return
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF"):
        return
    if head[:2] in (b"P5", b"P6"):
        return
    raise DataError(f"{where}: not an image file (starts with bytes {head[:4].hex()})")


class Source:
    """Common interface: ``len``, ``labels``, ``names``, ``read(i)`` and ``describe(i)``.
    ``label_sets``: every label of each sample for multi-label (VOC-style) maps, else None;
    ``labels`` then holds each sample's first label (what loaders, kNN and probes read)."""

    labels: np.ndarray  # (N,) int64
    names: List[str]
    origin: str
    label_sets: Optional[List[np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def read(self, i: int) -> np.ndarray:  # (bytes,) uint8
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"{self.origin}:{self.names[i]}"

    def read_checked(self, i: int) -> np.ndarray:
        try:
            buf = self.read(i)
        except DataError:
            raise
        except Exception as e:  # an I/O or inflate error becomes a DataError naming the file
            raise DataError(f"{self.describe(i)}: cannot read ({type(e).__name__}: {e})") from e
        check_encoded(buf, self.describe(i))
        return buf

    def nbytes(self, i: int) -> int:
        return len(self.read(i))


def check_labels(labels: np.ndarray, where: Sequence[str], num_classes: int, on_error: str,
                  keep: np.ndarray, sets: Optional[List[np.ndarray]] = None) -> None:
    """Labels outside [0, num_classes) (or < 0): raise naming the line, or leave the sample out.
    ``sets``: every label of each multi-label line, all of them checked."""
    if sets is None:
        values, owner = labels, np.arange(len(labels))
    else:
        values = np.concatenate(sets)
        owner = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    bad = (values < 0) | ((values >= num_classes) if num_classes > 0 else False)
    for i in np.flatnonzero(bad):
        j = owner[i]
        if not keep[j]:
            continue  # already left out (or reported for an earlier label of its line)
        msg = f"{where[j]}: label {values[i]} out of range"
        msg += f" [0, {num_classes})" if num_classes > 0 else " (labels must be >= 0)"
        if on_error == "raise":
            raise DataError(msg + "; fix the label or set data.num_classes")
        log("skipping " + msg)
        keep[j] = False


def owned_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Rows rank ``rank`` owns under the PIC 'part' convention: i % world == rank."""
    return np.arange(rank, n, world, dtype=np.int64)


def PIL_decode_check(buf, where: str):
    """Decode ``buf`` fully with PIL (strict about truncation); DataError naming ``where``."""
    import io

    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(memoryview(buf))) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
