import os
import zipfile

import numpy as np
import pytest

from loaders.cache import CachedSource
from loaders.sources import DataError, FolderSource, ZipSource, open_source
from tests.datagen import jpeg_bytes, make_colour_folder, make_colour_zip, make_photo_zip, rewrite_member


def test_zip_source_index_matches_map_line(tmp_path):
    root = make_colour_zip(str(tmp_path), n=20)
    src = open_source(root, "train")
    assert isinstance(src, ZipSource) and len(src) == 20
    lines = open(os.path.join(root, "train_map.txt")).read().splitlines()
    with zipfile.ZipFile(os.path.join(root, "train.zip")) as zf:
        for i, line in enumerate(lines):
            rel, label = line.split("\t")
            assert src.names[i] == rel and src.labels[i] == int(label)
            assert bytes(src.read(i)) == zf.read(rel)  # the bytes of that member, exactly
    # stored members are zero-copy views of the mmap, not copies
    assert not src.read(0).flags["OWNDATA"]
    # the offset index is cached beside the zip and reused
    assert os.path.isfile(os.path.join(root, "train.zip.fastinst-index.npz"))
    assert bytes(open_source(root, "train").read(7)) == bytes(src.read(7))


def test_deflated_members_are_inflated(tmp_path):
    data = [jpeg_bytes(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(4)]
    with zipfile.ZipFile(tmp_path / "train.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, d in enumerate(data):
            zf.writestr(f"a/{i}.jpg", d)
    (tmp_path / "train_map.txt").write_text("".join(f"a/{i}.jpg\t0\n" for i in range(4)))
    src = open_source(str(tmp_path), "train")
    assert [bytes(src.read(i)) for i in range(4)] == data


def test_folder_source(tmp_path):
    root = make_colour_folder(str(tmp_path), n=9, classes=3)
    src = open_source(root, "train")
    assert isinstance(src, FolderSource) and len(src) == 9
    assert src.classes == ["c0", "c1", "c2"]
    for i in range(9):
        assert src.labels[i] == int(src.names[i][1])
        with open(os.path.join(root, "train", src.names[i]), "rb") as f:
            assert bytes(src.read(i)) == f.read()


def test_pickled_source_reopens_mmap(tmp_path):
    import pickle

    src = open_source(make_colour_zip(str(tmp_path), n=5), "train")
    src.read(0)
    clone = pickle.loads(pickle.dumps(src))
    assert bytes(clone.read(3)) == bytes(src.read(3))


# ---------------------------------------------------------------- bad input


def test_truncated_jpeg_named(tmp_path):
    root = make_colour_zip(str(tmp_path), n=6)
    src = open_source(root, "train")
    good = bytes(src.read(2))
    rewrite_member(root, "train", src.names[2], good[: len(good) // 2])
    src = open_source(root, "train")
    with pytest.raises(DataError, match=r"img_0002\.jpg.*map line 3.*truncated JPEG"):
        src.read_checked(2)
    src.read_checked(1)


def test_not_an_image_named(tmp_path):
    root = make_colour_zip(str(tmp_path), n=4)
    rewrite_member(root, "train", "c1/img_0001.jpg", b"this is a text file, not a JPEG")
    with pytest.raises(DataError, match=r"img_0001\.jpg.*not an image"):
        open_source(root, "train").read_checked(1)


def test_missing_member_raise_and_skip(tmp_path):
    root = make_colour_zip(str(tmp_path), n=5)
    with open(os.path.join(root, "train_map.txt"), "a") as f:
        f.write("c0/nope.jpg\t0\n")
    with pytest.raises(DataError, match=r"train_map\.txt:6: member 'c0/nope\.jpg' not found"):
        open_source(root, "train")
    src = open_source(root, "train", on_error="skip")
    assert len(src) == 5 and src.skipped == 1 and "c0/nope.jpg" not in src.names


def test_label_out_of_range(tmp_path):
    root = make_colour_zip(str(tmp_path), n=5, classes=3)
    lines = open(os.path.join(root, "train_map.txt")).read().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t7"
    open(os.path.join(root, "train_map.txt"), "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train_map\.txt:4 .*label 7 out of range \[0, 3\)"):
        open_source(root, "train", num_classes=3)
    src = open_source(root, "train", num_classes=3, on_error="skip")
    assert len(src) == 4 and src.skipped == 1
    lines[3] = lines[3].split("\t")[0] + "\t-1"
    open(os.path.join(root, "train_map.txt"), "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="label -1 out of range"):
        open_source(root, "train")


def test_malformed_map_line(tmp_path):
    root = make_colour_zip(str(tmp_path), n=3)
    with open(os.path.join(root, "train_map.txt"), "a") as f:
        f.write("c0/img_0000.jpg 0\n")
    with pytest.raises(DataError, match=r"train_map\.txt:4: expected 'relpath<TAB>label'"):
        open_source(root, "train")


def test_empty_dataset(tmp_path):
    (tmp_path / "train.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "train.zip", "w"):
        pass
    (tmp_path / "train_map.txt").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        open_source(str(tmp_path), "train")
    os.makedirs(tmp_path / "f" / "train" / "cls")
    with pytest.raises(DataError, match="empty dataset"):
        open_source(str(tmp_path / "f"), "train")


def test_not_a_zip(tmp_path):
    (tmp_path / "train.zip").write_bytes(b"definitely not a zip archive" * 10)
    (tmp_path / "train_map.txt").write_text("a.jpg\t0\n")
    with pytest.raises(DataError, match=r"train\.zip: not a readable zip"):
        open_source(str(tmp_path), "train")


def test_missing_layout(tmp_path):
    with pytest.raises(DataError, match="holds neither"):
        open_source(str(tmp_path), "train")
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"), "train")


# ---------------------------------------------------------------- RAM cache


def test_part_cache_holds_only_its_shard(tmp_path):
    root = make_photo_zip(str(tmp_path / "d"), n=20)
    base = open_source(root, "train")
    world, rank = 3, 1
    c = CachedSource(base, "part", rank=rank, world=world, cache_dir=str(tmp_path))
    owned = [i for i in range(20) if i % world == rank]
    assert c.indices.tolist() == owned
    assert os.path.getsize(c.path) == sum(base.nbytes(i) for i in owned)  # nothing else in RAM
    for i in owned:
        assert bytes(c.read(i)) == bytes(base.read(i))
    with pytest.raises(DataError, match="not in this rank's part cache"):
        c.read(0)


def test_full_cache_one_copy_shared_by_local_ranks(tmp_path):
    root = make_colour_zip(str(tmp_path / "d"), n=12)
    base = open_source(root, "train")
    first = CachedSource(base, "full", rank=0, world=2, local_rank=0, cache_dir=str(tmp_path))
    second = CachedSource(base, "full", rank=1, world=2, local_rank=1, cache_dir=str(tmp_path), timeout_s=5)
    assert first.path == second.path  # the same shared-memory file, mapped twice
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".bin")]) == 1
    assert all(bytes(second.read(i)) == bytes(base.read(i)) for i in range(12))


def test_cache_too_big_for_shm_is_a_clear_error(tmp_path, monkeypatch):
    root = make_colour_zip(str(tmp_path / "d"), n=4)
    base = open_source(root, "train")

    class Tiny:
        f_bavail, f_frsize = 1, 1

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny())
    with pytest.raises(DataError, match=r"needs .* only 1\.0 B is free.*shm-size"):
        CachedSource(base, "full", cache_dir=str(tmp_path))
