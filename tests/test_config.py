import glob
import os

import pytest

from fastinst.config import ConfigError, load_config, save_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.aug.num_views >= 1


def test_overrides_typed():
    cfg = load_config(None, ["loader.batch_size=32", "aug.crops=[{count: 1, size: 160}, {count: 3, size: 96}]",
                             "data.cache=part", "aug.blur_sigma=[0.2, 1.5]"])
    assert cfg.loader.batch_size == 32 and cfg.data.cache == "part"
    assert [(c.count, c.size) for c in cfg.aug.crops] == [(1, 160), (3, 96)]
    assert cfg.aug.num_views == 4 and cfg.aug.blur_sigma == (0.2, 1.5)


@pytest.mark.parametrize("override, match", [
    ("loader.batchsize=3", r"unknown config key 'loader\.batchsize'.*valid keys: .*batch_size"),
    ("loader.batch_size=abc", r"'loader\.batch_size': expected an integer"),
    ("loader.batch_size=0", r"'loader\.batch_size': must be >= 1"),
    ("data.cache=some", r"'data\.cache': must be one of \['none', 'part', 'full'\]"),
    ("aug.crops=[{count: 2, size: 224, scale: [0.5, 0.2]}]", r"'aug\.crops\[\]\.scale'"),
    ("aug.grey_p=1.5", r"'aug\.grey_p': is a probability"),
    ("aug.jitter=[0.4, 0.4]", r"'aug\.jitter': expected 4 values"),
    ("sampler.kind=sliding_window", r"'sampler\.window': must be >= loader\.batch_size"),
    ("nonsense=1", r"unknown config key 'nonsense'"),
])
def test_bad_config_names_the_key(override, match):
    extra = ["sampler.window=16", "sampler.stride=8"] if "sliding" in override else []
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override] + extra)


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loader:\n  backend: dali\n  threads: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'loader\.threads'"):
        load_config(str(p))


def test_frozen_and_roundtrip(tmp_path):
    cfg = load_config(None, ["aug.crops=[{count: 2, size: 64}]"])
    with pytest.raises(Exception):
        cfg.loader.batch_size = 3
    save_config(cfg, str(tmp_path / "saved.yaml"))
    again = load_config(str(tmp_path / "saved.yaml"))
    assert to_dict(again) == to_dict(cfg) and again == cfg
