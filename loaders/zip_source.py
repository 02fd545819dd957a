"""PIC's zip layout: ``<split>.zip`` + ``<split>_map.txt`` (``relpath<TAB>label`` per line, or
``relpath<TAB>l1,l2,...`` for a multi-label set). Members are located once through the central
directory (an offset index, cached beside the zip as ``<split>.zip.fastinst-index.npz`` when
the directory is writable); stored members are then zero-copy slices of one read-only mmap,
deflated ones are inflated. There is no per-sample ``zipfile`` call (PIC's ZipReader opens the
archive per read). The archive is only read: nothing in it is ever run.
"""
from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from typing import List

import numpy as np

from .source_base import DataError, Source, check_labels, log

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes, ZIP local file header
_LOCAL_MAGIC = b"PK\x03\x04"


def _parse_labels(text: str, where: str) -> List[int]:
    """'3', or several labels 'l1,l2,...' / 'l1 l2 ...' (a multi-label, VOC-style line)."""
    fields = [t for t in text.replace(",", " ").split() if t]
    try:
        out = [int(t) for t in fields]
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not an integer (or a list of integers)") from None
    if not out:
        raise DataError(f"{where}: no label after the tab")
    return out


def _read_map(map_path: str):
    """(names, first labels, map lines, label lists or None when every line has one label)."""
    names, labels, lines, sets = [], [], [], []
    if not os.path.isfile(map_path):
        raise DataError(f"{map_path}: map file not found (zip layout needs <split>_map.txt)")
    with open(map_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{map_path}:{lineno}: expected 'relpath<TAB>label' (or 'relpath<TAB>l1,l2,...'), "
                                f"got {line!r}")
            got = _parse_labels(parts[1], f"{map_path}:{lineno}")
            names.append(parts[0])
            labels.append(got[0])
            sets.append(got)
            lines.append(lineno)
    multi = any(len(s) > 1 for s in sets)
    return (names, np.asarray(labels, dtype=np.int64), np.asarray(lines, dtype=np.int64),
            [np.asarray(s, dtype=np.int64) for s in sets] if multi else None)


def _member_table(zip_path: str):
    """name -> (header_offset, compress_type, compress_size, file_size) from the central dir."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{zip_path}: not a readable zip file ({e})") from e
    return {zi.filename: (zi.header_offset, zi.compress_type, zi.compress_size, zi.file_size) for zi in infos}


class ZipSource(Source):
    """PIC's zip layout: one archive + a map file. Reads are mmap slices (stored) or inflates."""

    def __init__(self, zip_path: str, map_path: str, *, on_error: str = "raise", num_classes: int = 0):
        self.zip_path, self.map_path = zip_path, map_path
        self.origin = os.path.basename(zip_path)
        names, labels, lines, sets = _read_map(map_path)
        if not names:
            raise DataError(f"{map_path}: empty dataset (no samples listed)")
        offsets, csizes, usizes, methods = self._locate(names, lines, on_error)
        keep = offsets >= 0
        where = [f"{map_path}:{ln} ({n})" for ln, n in zip(lines, names)]
        check_labels(labels, where, num_classes, on_error, keep, sets)
        if not keep.any():
            raise DataError(f"{zip_path}: empty dataset (every sample was skipped)")
        self.skipped = int((~keep).sum())
        self.names = [n for n, k in zip(names, keep) if k]
        self.labels = labels[keep]
        self.label_sets = None if sets is None else [s for s, k in zip(sets, keep) if k]
        self.map_lines = lines[keep]  # 1-based line of each kept sample in the map file
        self.offsets = offsets[keep]  # (N,) int64 byte offset of the member's data
        self.csizes = csizes[keep]
        self.usizes = usizes[keep]
        self.methods = methods[keep]
        self._mm = None

    # -- index ---------------------------------------------------------------------------
    def _locate(self, names, lines, on_error):
        cache = self.zip_path + ".fastinst-index.npz"
        st = os.stat(self.zip_path)
        stamp = np.array([st.st_size, int(st.st_mtime_ns)], dtype=np.int64)
        if os.path.isfile(cache):
            try:
                z = np.load(cache)
                if (z["stamp"] == stamp).all() and z["offsets"].shape[0] == len(names) and \
                        int(z["names_hash"]) == _names_hash(names):
                    offsets = z["offsets"]
                    if (offsets >= 0).all():
                        return offsets, z["csizes"], z["usizes"], z["methods"]
            except Exception:  # a stale or damaged index cache is rebuilt
                pass
        table = _member_table(self.zip_path)
        n = len(names)
        offsets = np.full(n, -1, dtype=np.int64)
        csizes = np.zeros(n, dtype=np.int64)
        usizes = np.zeros(n, dtype=np.int64)
        methods = np.zeros(n, dtype=np.int8)
        with open(self.zip_path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                for i, name in enumerate(names):
                    info = table.get(name)
                    if info is None:
                        msg = f"{self.map_path}:{lines[i]}: member {name!r} not found in {self.zip_path}"
                        if on_error == "raise":
                            raise DataError(msg)
                        log("skipping " + msg)
                        continue
                    hoff, ctype, csize, usize = info
                    if ctype not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                        raise DataError(f"{self.zip_path}: member {name!r} uses compression {ctype}; "
                                        "only stored or deflated members are supported")
                    magic, *_rest = _LOCAL_HEADER.unpack_from(mm, hoff)
                    if magic != _LOCAL_MAGIC:
                        raise DataError(f"{self.zip_path}: bad local header for member {name!r}")
                    name_len, extra_len = _rest[-2], _rest[-1]
                    offsets[i] = hoff + _LOCAL_HEADER.size + name_len + extra_len
                    csizes[i], usizes[i], methods[i] = csize, usize, ctype
            finally:
                mm.close()
        try:  # best effort: a read-only dataset directory just means no cached index
            tmp = cache + f".tmp{os.getpid()}.npz"
            np.savez(tmp, stamp=stamp, offsets=offsets, csizes=csizes, usizes=usizes, methods=methods,
                     names_hash=np.int64(_names_hash(names)))
            os.replace(tmp, cache)
        except OSError:
            pass
        return offsets, csizes, usizes, methods

    # -- reads ---------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def _map(self):
        if self._mm is None:
            with open(self.zip_path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def read(self, i: int) -> np.ndarray:
        mm = self._map()
        off, csize = int(self.offsets[i]), int(self.csizes[i])
        if off + csize > len(mm):
            raise DataError(f"{self.describe(i)}: member data runs past the end of the zip (truncated archive?)")
        if self.methods[i] == zipfile.ZIP_STORED:
            return np.frombuffer(mm, dtype=np.uint8, count=csize, offset=off)  # zero-copy view
        raw = zlib.decompress(mm[off:off + csize], -15)  # raw deflate stream, no zlib header
        return np.frombuffer(raw, dtype=np.uint8)

    def nbytes(self, i: int) -> int:
        return int(self.usizes[i])

    def describe(self, i: int) -> str:
        return f"{self.zip_path}:{self.names[i]} (map line {self.map_lines[i]})"


def _names_hash(names) -> int:
    h = zlib.crc32("\n".join(names).encode())
    return int(h)
