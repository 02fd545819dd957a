"""``launch.py export --format torchvision|detectron2|mmdet|timm``: every format maps back to the
trunk's tensors (detectron2's names undone by an inverse written here), timm loads its export
strictly and computes the same pooled features, and a two-trunk method exports each trunk."""
from __future__ import annotations

import os
import pickle
import re

import pytest
import torch

from datagen import make_colour_train_val, make_photo_zip
from fastinst.train import engine
from fastinst.config import load_config
from fastinst.eval.export import FORMATS, export_backbone
from fastinst.core.model import EmbeddingNet
from test_engine import TINY

R18 = ["model.arch=resnet18", "model.stem=imagenet", "model.width=1", "aug.crops=[{count: 1, size: 32, scale: [0.2, 1]}]",
       "aug.eval_resize=32", "aug.eval_crop=32", "train.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = make_colour_train_val(str(root / "data"))
    out = str(root / "run")
    engine.train(load_config(None, TINY + [f"data.path={data}"] + R18), out)
    return out


def from_detectron2(key: str) -> str:
    """detectron2's ResNet name -> torchvision's (the inverse of its convert-torchvision-to-d2)."""
    key = key.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    key = re.sub(r"conv(\d)\.norm\.", r"bn\1.", key)
    key = re.sub(r"res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    return key[len("stem."):] if key.startswith("stem.") else key


def test_every_format_maps_back_to_the_trunk(run, tmp_path):
    ref = torch.load(export_backbone(run, str(tmp_path / "tv.pth"))["file"])
    assert len(ref) > 100 and not any(k.startswith("fc.") for k in ref)
    for fmt in FORMATS:
        info = export_backbone(run, str(tmp_path / f"out_{fmt}"), fmt=fmt)
        path = info["file"]
        if fmt == "detectron2":
            with open(path, "rb") as f:
                obj = pickle.load(f)
            assert obj["__author__"] == "fastinst" and obj["matching_heuristics"] is True
            assert "stem.conv1.weight" in obj["model"] and "res2.0.conv1.norm.running_mean" in obj["model"]
            assert "res3.0.shortcut.norm.weight" in obj["model"]
            back = {from_detectron2(k): torch.from_numpy(v) for k, v in obj["model"].items()}
        elif fmt == "mmdet":
            back = torch.load(path)["state_dict"]
        else:
            back = torch.load(path)
        assert set(back) == set(ref), (fmt, sorted(set(back) ^ set(ref))[:5])
        assert all(torch.equal(back[k], ref[k]) for k in ref), fmt
    with pytest.raises(ValueError, match=r"export format 'onnx': choose one of"):
        export_backbone(run, str(tmp_path / "x"), fmt="onnx")


def test_timm_loads_the_export_and_computes_the_same_features(run, tmp_path):
    timm = pytest.importorskip("timm")
    sd = torch.load(export_backbone(run, str(tmp_path / "timm.pth"), fmt="timm")["file"])
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(sd, strict=True)
    mine = EmbeddingNet("resnet18")
    mine.backbone.load_state_dict(sd, strict=True)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), mine.eval().backbone_features(x), rtol=1e-5, atol=1e-5)


def test_two_trunk_method_exports_each_trunk_in_each_format(tmp_path):
    data = make_photo_zip(str(tmp_path / "photos"), n=16, val=8)
    out = str(tmp_path / "cmc")
    engine.train(load_config(None, TINY + [f"data.path={data}", "method.name=cmc", "aug.colorspace=ycbcr",
                                           "method.cmc.K=4"] + R18), out)
    info = export_backbone(out, str(tmp_path / "exp" / "cmc"), fmt="detectron2")
    files = {t["name"]: t["file"] for t in info["trunks"]}
    assert set(files) == {"l", "ab"} and all(f.endswith(f".{n}.pkl") for n, f in files.items())
    for name, channels in (("l", 1), ("ab", 2)):
        with open(files[name], "rb") as f:
            assert pickle.load(f)["model"]["stem.conv1.weight"].shape[1] == channels
    assert os.path.isfile(files["l"]) and info["format"] == "detectron2"
