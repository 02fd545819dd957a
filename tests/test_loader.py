"""Both backends on small real JPEGs: views, index exactness, resume, caches, bad input."""
import os

import pytest
import torch

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import load_config
from fastinst.core.runtime import DistEnv
from loaders import build_loader
from loaders.sources import DataError
from tests.datagen import index_of_colour, make_colour_zip, make_photo_zip, rewrite_member

BACKENDS = ["dali", "torch"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cfg_for(root, *extra):
    return load_config(None, [f"data.path={root}", "loader.batch_size=8", "loader.num_threads=2",
                              "loader.num_workers=1", "loader.device=cpu", *extra])


def collect(loader, limit=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if limit is not None and i + 1 >= limit:
            break
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_zip(str(tmp_path_factory.mktemp("photos")), n=32, val=10)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_zip(str(tmp_path_factory.mktemp("colours")), n=24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_simclr_views_shapes_ranges_and_difference(photos, backend):
    cfg = cfg_for(photos, f"loader.backend={backend}", "aug.crops=[{count: 2, size: 64}]")
    loader = build_loader(cfg, "train")
    batches = collect(loader)
    loader.close()
    assert len(batches) == len(loader) == 32 // 8
    lo = min((0 - m) / s for m, s in zip(MEAN, STD)) - 1e-3
    hi = max((1 - m) / s for m, s in zip(MEAN, STD)) + 1e-3
    seen, same = [], 0
    for b in batches:
        assert len(b["views"]) == 2
        for v in b["views"]:
            assert v.shape == (8, 3, 64, 64) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert lo <= float(v.min()) and float(v.max()) <= hi  # normalised pixel range
            assert float(v.std()) > 0.05
        assert b["index"].dtype == torch.int64 and b["label"].dtype == torch.int64
        # two views of one image are different crops (but where SimCLR's jitter saturates both
        # views of a near-white photo to white: index 13 with the DALI backend's draws)
        diff = (b["views"][0] - b["views"][1]).abs().flatten(1).mean(1)
        same += int((diff <= 1e-3).sum())
        seen += b["index"].tolist()
    assert same <= 1
    assert sorted(seen) == list(range(32))  # one epoch = every image once


@pytest.mark.parametrize("backend", BACKENDS)
def test_multicrop_fp16_and_chw(photos, backend):
    cfg = cfg_for(photos, f"loader.backend={backend}", "loader.fp16=true", "loader.channels_last=false",
                  "aug.crops=[{count: 1, size: 48, scale: [0.14, 1.0]}, {count: 3, size: 24, scale: [0.08, 0.14]}]",
                  "aug.solarize_p=0.5")
    loader = build_loader(cfg, "train")
    b = collect(loader, 1)[0]
    loader.close()
    assert [tuple(v.shape) for v in b["views"]] == [(8, 3, 48, 48)] + [(8, 3, 24, 24)] * 3
    assert all(v.dtype == torch.float16 and v.is_contiguous() for v in b["views"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_matches_image_it_came_from(colours, backend):
    """Each image has its own colour; the colour of every view must decode to its index,
    and the label must be the map line's label."""
    cfg = cfg_for(colours, f"loader.backend={backend}", "aug.crops=[{count: 2, size: 16}]", "aug.jitter_p=0",
                  "aug.grey_p=0", "aug.mean=[0, 0, 0]", "aug.std=[0.00392156862745098, 0.00392156862745098, 0.00392156862745098]")
    lines = open(os.path.join(colours, "train_map.txt")).read().splitlines()
    loader = build_loader(cfg, "train")
    for b in collect(loader):
        for view in b["views"]:
            rgb = view.float().mean(dim=(2, 3))  # (B, 3) back in 0..255 units
            for k, i in enumerate(b["index"].tolist()):
                assert index_of_colour(rgb[k].tolist()) == i
                assert int(lines[i].split("\t")[1]) == b["label"][k].item()
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_covers_shard_in_order(photos, backend):
    cfg = cfg_for(photos, f"loader.backend={backend}", "aug.eval_resize=40", "aug.eval_crop=32")
    seen = []
    for r in range(3):
        loader = build_loader(cfg, "val", env=DistEnv(r, 3, r, 3))
        for b in loader:
            assert b["views"][0].shape[1:] == (3, 32, 32)
            seen += b["index"].tolist()
        loader.close()
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_at_same_position(photos, backend):
    cfg = cfg_for(photos, f"loader.backend={backend}", "aug.crops=[{count: 1, size: 16}]", "loader.batch_size=4")
    ranks = DistEnv(1, 2, 1, 2)
    full = build_loader(cfg, "train", env=ranks)
    ref = [b["index"].tolist() for b in collect(full)] + [b["index"].tolist() for b in collect(full)]
    full.close()
    first = build_loader(cfg, "train", env=ranks)
    part = [b["index"].tolist() for b in collect(first, 3)]
    state = first.state_dict()
    first.close()
    assert state["epoch"] == 0 and state["next_batch"] == 3
    resumed = build_loader(cfg, "train", env=ranks)
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for b in collect(resumed)] + [b["index"].tolist() for b in collect(resumed)]
    resumed.close()
    assert part + rest == ref
    # both backends' augmentations are a function of (seed, epoch, index, view): bitwise equal
    a = build_loader(cfg, "train", env=ranks)
    va = collect(a)[3]["views"][0]
    a.close()
    b = build_loader(cfg, "train", env=ranks)
    b.load_state_dict({**state, "next_batch": 3})
    assert torch.equal(collect(b, 1)[0]["views"][0], va)
    b.close()


def test_resume_at_another_world_size_needs_the_same_global_batch(photos, tmp_path):
    cfg = cfg_for(photos, "loader.backend=torch", "loader.batch_size=4")
    saved = build_loader(cfg, "train", env=DistEnv(0, 2, 0, 2))  # 32 images: 4 global batches of 8
    saved.load_state_dict({**saved.state_dict(), "next_batch": 3})
    state = saved.state_dict()
    one = build_loader(cfg_for(photos, "loader.backend=torch", "loader.batch_size=8"), "train", env=DistEnv(0, 1, 0, 1))
    one.load_state_dict(state)  # same global batch 8: the 4th global batch is next
    assert (one.epoch, one.next_batch) == (0, 3)
    other = build_loader(cfg, "train", env=DistEnv(0, 1, 0, 1))  # global batch 4
    with pytest.raises(ValueError, match=r"global batch is 4 x 2 ranks = 8 but this run has 4 x 1 = 4.*"
                                         r"loader\.batch_size=8"):
        other.load_state_dict(state)
    part = cfg_for(photos, "loader.backend=torch", "loader.batch_size=4", "data.cache=part",
                   f"data.cache_dir={tmp_path}")
    state = build_loader(part, "train", env=DistEnv(0, 2, 0, 2)).state_dict()
    with pytest.raises(ValueError, match="data.cache=part.*resume with 2 ranks"):
        build_loader(part, "train", env=DistEnv(0, 4, 0, 4)).load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_part_cache_loader_reads_only_owned_rows(photos, tmp_path, backend):
    cfg = cfg_for(photos, f"loader.backend={backend}", "data.cache=part", f"data.cache_dir={tmp_path}",
                  "aug.crops=[{count: 1, size: 16}]", "loader.batch_size=4")
    loader = build_loader(cfg, "train", env=DistEnv(1, 3, 1, 3))
    idx = [i for b in collect(loader) for i in b["index"].tolist()]
    loader.close()
    assert len(idx) == (32 // 3) // 4 * 4 and all(i % 3 == 1 for i in idx)


def test_sliding_window_loader_epoch_is_one_window(photos):
    cfg = cfg_for(photos, "loader.backend=torch", "sampler.kind=sliding_window", "sampler.window=16",
                  "sampler.stride=8", "aug.crops=[{count: 1, size: 16}]")
    loader = build_loader(cfg, "train")
    w0 = [i for b in collect(loader) for i in b["index"].tolist()]
    w1 = [i for b in collect(loader) for i in b["index"].tolist()]
    assert len(w0) == len(w1) == 16 and len(set(w0) & set(w1)) == 8


# ---------------------------------------------------------------- bad input through the loaders


def _damaged(tmp_path, kind):
    root = make_colour_zip(str(tmp_path / kind), n=16, size=(64, 48))
    name = "c2/img_0005.jpg"
    from loaders.sources import open_source

    good = bytes(open_source(root, "train").read(5))
    if kind == "truncated":
        data = good[: len(good) * 2 // 3]
    else:  # intact markers, garbage header tables: only a real decode notices
        arr = bytearray(good)
        sos = good.find(b"\xff\xda")
        for k in range(4, sos - 2):
            if arr[k] != 0xFF:
                arr[k] = (arr[k] * 7 + 13) % 255
        data = bytes(arr)
    rewrite_member(root, "train", name, data)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_bad_jpeg_raises_naming_file(tmp_path, backend, kind):
    root = _damaged(tmp_path, kind)
    cfg = cfg_for(root, f"loader.backend={backend}", "aug.crops=[{count: 1, size: 16}]")
    loader = build_loader(cfg, "train")
    with pytest.raises(DataError, match=r"img_0005\.jpg"):
        collect(loader)
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_bad_jpeg_skipped_and_counted(tmp_path, backend, kind):
    root = _damaged(tmp_path, kind)
    cfg = cfg_for(root, f"loader.backend={backend}", "data.on_error=skip", "aug.crops=[{count: 1, size: 16}]")
    loader = build_loader(cfg, "train")
    idx = [i for b in collect(loader) for i in b["index"].tolist()]
    loader.close()
    assert sorted(idx) == [i for i in range(16) if i != 5]  # nothing else lost, nothing repeated
    assert list(loader.skipped) == [5] and "img_0005.jpg" in loader.skipped[5]
    assert loader.state_dict()["skipped"] == {5: loader.skipped[5]}


@pytest.mark.gpu
def test_gpu_mixed_decode_pipeline(photos):
    cfg = load_config(None, [f"data.path={photos}", "loader.batch_size=8", "loader.device=gpu",
                             "aug.crops=[{count: 2, size: 64}]"])
    loader = build_loader(cfg, "train")
    batches = collect(loader)
    loader.close()
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(32))
    v = batches[0]["views"][0]
    assert v.is_cuda and v.shape == (8, 3, 64, 64) and v.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(v).all()
