"""Image sources: where the encoded bytes of sample ``i`` come from.

Two layouts, detected from ``data.path``:

* PIC's zip layout: ``<split>.zip`` + ``<split>_map.txt`` (``relpath<TAB>label`` per line).
  Members are located once through the central directory (an offset index, cached beside
  the zip as ``<split>.zip.fastinst-index.npz`` when the directory is writable); stored
  members are then zero-copy slices of one read-only mmap, deflated ones are inflated.
  There is no per-sample ``zipfile`` call (PIC's ZipReader opens the archive per read).
* ImageNet folder layout: ``<split>/<synset>/<image>``; labels follow sorted synset names.

A source is picklable: the mmap / open files are dropped on pickling and reopened lazily, so
DALI's worker processes and torch's DataLoader workers each map the file themselves.

``index`` i always refers to the i-th sample kept (map line i when nothing is skipped);
``describe(i)`` names the file (and map line) for error messages.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import zipfile
import zlib
from typing import List, Optional, Sequence

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes, ZIP local file header
_LOCAL_MAGIC = b"PK\x03\x04"


class DataError(RuntimeError):
    """Bad input data. The message names the file (and map line where there is one)."""


def log(msg: str) -> None:
    print(f"[fastinst] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checks


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


# --------------------------------------------------------------------------- base


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


def _check_labels(labels: np.ndarray, where: Sequence[str], num_classes: int, on_error: str,
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


# --------------------------------------------------------------------------- zip


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
        _check_labels(labels, where, num_classes, on_error, keep, sets)
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
        _check_labels(labels, [os.path.join(root, n) for n in names], num_classes, on_error, keep)
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
