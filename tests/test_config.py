import dataclasses
import glob
import os

import pytest

import fastinst.methods  # noqa: F401  (registers the methods' config sections, as launch.py does)
from fastinst.config import ConfigError, load_config, save_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The key numbers of every shipped recipe, from the seed each follows (the FMNIST demos: the
# numbers README.md reports them with). A config added to configs/ must be added here.
_NPID_AUG = {"aug.crops": [(1, 224, (0.2, 1.0))], "aug.jitter": (0.4, 0.4, 0.4, 0.4), "aug.jitter_p": 1.0,
             "aug.grey_p": 0.2, "aug.blur_p": 0.0}  # lemniscate main.py transforms
_SIMCLR_AUG = {"aug.jitter": (0.8, 0.8, 0.8, 0.2), "aug.jitter_p": 0.8, "aug.grey_p": 0.2, "aug.blur_p": 0.5,
               "aug.blur_sigma": (0.1, 2.0)}  # SimCLR appendix A / PIC --aug SimCLR
_IMAGENET_EVAL = {"aug.eval_resize": 256, "aug.eval_crop": 224, "eval.knn_k": 200, "eval.knn_sigma": 0.07}
_PIC_REPO_MODEL = {"model.arch": "resnet50", "model.head": "mlp_nobn", "model.zero_init_residual": True}
_FMNIST = {"aug.crops": None, "model.arch": "resnet18", "aug.eval_crop": 28, "eval.knn_k": 200,
           "eval.knn_sigma": 0.1, "eval.features": "recompute", "eval.at_start": True}
RECIPES = {
    # lemniscate.pytorch ImageNet: NCE, K 4096, T 0.07, m 0.5, lr 0.03, batch 256, 200 epochs, x0.1 at 120/160.
    "npid_imagenet_r50.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, "method.name": "npid", "model.arch": "resnet50", "model.embed_dim": 128,
        "method.npid.K": 4096, "method.npid.T": 0.07, "method.npid.momentum": 0.5, "method.npid.loss": "nce",
        "train.lr": 0.03, "train.lr_batch": 256, "train.epochs": 200, "train.schedule": "step",
        "train.milestones": (120, 160), "train.gamma": 0.1, "train.weight_decay": 1e-4, "train.momentum": 0.9},
    "npid_imagenet_r18.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, "method.name": "npid", "model.arch": "resnet18", "method.npid.K": 4096,
        "method.npid.T": 0.07, "method.npid.momentum": 0.5, "method.npid.loss": "nce", "train.lr": 0.03,
        "train.lr_batch": 256, "train.epochs": 200, "train.milestones": (120, 160), "train.weight_decay": 1e-4},
    # NPID's full-softmax variant (K = 0: all N rows; MMSelfSup's NPID softmax protocol at full size).
    "npid_imagenet_fullsoftmax_r50.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, "method.name": "npid", "model.arch": "resnet50", "method.npid.K": 0,
        "method.npid.loss": "softmax", "method.npid.T": 0.07, "method.npid.momentum": 0.5, "train.lr": 0.03,
        "train.epochs": 200, "train.milestones": (120, 160), "train.weight_decay": 1e-4},
    # MMSelfSup npid_resnet50_8xb32-steplr-200e_in1k.py: SyncBN, 65536 negatives, softmax-CE, T 0.07, m 0.5,
    # batch 32 x 8 GPUs, SGD lr 0.03 / 0.9 / 1e-4, 200 epochs, x0.1 at 120 and 160.
    "npid_mmselfsup_imagenet_r50.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, "method.name": "npid", "model.arch": "resnet50", "model.embed_dim": 128,
        "model.head": "linear", "model.sync_bn": True, "model.zero_init_residual": False, "method.npid.K": 65536,
        "method.npid.loss": "softmax", "method.npid.T": 0.07, "method.npid.momentum": 0.5,
        "method.npid.negatives": "per_sample", "loader.batch_size": 32, "train.lr": 0.03, "train.lr_batch": 256,
        "train.momentum": 0.9, "train.weight_decay": 1e-4, "train.epochs": 200, "train.schedule": "step",
        "train.milestones": (120, 160), "train.gamma": 0.1},
    # bl0/PIC scripts/InstDisc.sh: softmax over 65536 sampled rows, cosine with 5 warm-up epochs.
    "instdisc_imagenet_r50.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, **_PIC_REPO_MODEL, "method.name": "npid", "method.npid.K": 65536,
        "method.npid.T": 0.07, "method.npid.momentum": 0.5, "method.npid.loss": "softmax",
        "train.schedule": "cosine", "train.warmup_epochs": 5, "train.epochs": 200, "train.lr": 0.03},
    # bl0/PIC scripts/PIC.sh: T 0.2, window 131072 / stride 16384, 1x160 + 3x96 multi-crop, cosine.
    "pic_imagenet_r50.yaml": {
        **_SIMCLR_AUG, **_IMAGENET_EVAL, **_PIC_REPO_MODEL, "method.name": "pic", "method.pic.T": 0.2,
        "method.pic.negatives": 0, "sampler.kind": "sliding_window", "sampler.window": 131072,
        "sampler.stride": 16384, "sampler.reshuffle": True,
        "aug.crops": [(1, 160, (0.14, 1.0)), (3, 96, (0.08, 0.14))], "train.epochs": 200, "train.lr": 0.03,
        "train.lr_batch": 256, "train.schedule": "cosine", "train.warmup_epochs": 5, "train.weight_decay": 1e-4},
    # MoCo v2: K 65536, m 0.999, T 0.2, MLP head, crop (0.2, 1), jitter 0.4/0.4/0.4/0.1 p 0.8, blur 0.5.
    "mocov2_imagenet_r50.yaml": {
        **_IMAGENET_EVAL, **_PIC_REPO_MODEL, "method.name": "moco", "method.moco.K": 65536, "method.moco.m": 0.999,
        "method.moco.T": 0.2, "aug.crops": [(2, 224, (0.2, 1.0))], "aug.jitter": (0.4, 0.4, 0.4, 0.1),
        "aug.jitter_p": 0.8, "aug.grey_p": 0.2, "aug.blur_p": 0.5, "train.lr": 0.03, "train.lr_batch": 256,
        "train.epochs": 200, "train.schedule": "cosine", "train.weight_decay": 1e-4},
    # SimCLR: NT-Xent T 0.1 (PIC's SimCLR.sh), LARS lr 0.3 per 256, wd 1e-6, crop (0.08, 1).
    "simclr_imagenet_r50.yaml": {
        **_SIMCLR_AUG, **_IMAGENET_EVAL, **_PIC_REPO_MODEL, "method.name": "simclr", "method.simclr.T": 0.1,
        "aug.crops": [(2, 224, (0.08, 1.0))], "train.optimizer": "lars", "train.lr": 0.3, "train.lr_batch": 256,
        "train.weight_decay": 1e-6, "train.schedule": "cosine", "train.epochs": 200},
    # Loader benchmarks: SimCLR's 2x224 views and PIC's multi-crop, batch 64 (README Profiling).
    "profile_simclr.yaml": {**_SIMCLR_AUG, "aug.crops": [(2, 224, (0.08, 1.0))], "loader.batch_size": 64,
                            "profile.backends": ("dali", "torch")},
    "profile_multicrop.yaml": {"aug.crops": [(1, 160, (0.14, 1.0)), (3, 96, (0.08, 0.14))],
                               "loader.batch_size": 64},
    # The Fashion-MNIST demos (README 'Methods' table: images, epochs, batch).
    "simclr_fmnist.yaml": {**_FMNIST, "aug.crops": [(2, 28, (0.3, 1.0))], "data.path": "data/fmnist_10k",
                           "method.name": "simclr", "method.simclr.T": 0.2, "train.epochs": 10,
                           "loader.batch_size": 32, "model.head": "mlp"},
    "mocov2_fmnist.yaml": {**_FMNIST, "aug.crops": [(2, 28, (0.3, 1.0))], "data.path": "data/fmnist_10k",
                           "method.name": "moco", "method.moco.K": 4096, "method.moco.m": 0.99,
                           "method.moco.T": 0.2, "train.epochs": 10, "loader.batch_size": 32, "model.head": "mlp"},
    "pic_fmnist.yaml": {**_FMNIST, "aug.crops": [(1, 28, (0.3, 1.0)), (2, 16, (0.1, 0.3))],
                        "data.path": "data/fmnist_2k", "method.name": "pic", "method.pic.T": 0.2,
                        "sampler.kind": "sliding_window", "sampler.window": 512, "sampler.stride": 128,
                        "sampler.reshuffle": True, "train.epochs": 50, "loader.batch_size": 32,
                        "model.head": "mlp_nobn"},
    # HobbitLong/CMC train_CMC.py + LinearProbing.py: two trunks, K 4096 shared by both directions, T 0.07,
    # m 0.5, lr 0.03, 240 epochs x0.1 at 120/160/200; crop (0.08, 1) + flip only; probe lr 30, x0.2 at 30/40/50.
    **{f"cmc_imagenet_{v}_{space}.yaml": {
        **_IMAGENET_EVAL, "method.name": "cmc", "model.arch": "resnet50", "model.width": width,
        "aug.colorspace": space, "aug.crops": [(1, 224, (0.08, 1.0))], "aug.jitter_p": 0.0, "aug.grey_p": 0.0,
        "aug.blur_p": 0.0, "method.cmc.K": 4096, "method.cmc.T": 0.07, "method.cmc.momentum": 0.5,
        "method.cmc.loss": "nce", "method.cmc.negatives": "per_sample", "train.lr": 0.03, "train.lr_batch": 256,
        "train.epochs": 240, "train.schedule": "step", "train.milestones": (120, 160, 200), "train.gamma": 0.1,
        "train.weight_decay": 1e-4, "train.momentum": 0.9, "linear.epochs": 60, "linear.lr": 30.0,
        "linear.milestones": (30, 40, 50), "linear.gamma": 0.2, "linear.schedule": "step"}
       for v, space, width in (("r50v1", "lab", 0.5), ("r50v2", "ycbcr", 1.0))},
    # The CMC README's ImageNet-100 row: YCbCr, 2 x ResNet50-half, softmax-CE, K 4096 (75.8% top-1).
    "cmc_imagenet100_r50v1_ycbcr.yaml": {
        **_IMAGENET_EVAL, "method.name": "cmc", "model.arch": "resnet50", "model.width": 0.5,
        "aug.colorspace": "ycbcr", "data.classes": "configs/imagenet100.txt", "method.cmc.K": 4096,
        "method.cmc.T": 0.07, "method.cmc.loss": "softmax", "train.epochs": 240, "train.lr": 0.03,
        "train.milestones": (120, 160, 200), "linear.lr": 30.0, "linear.milestones": (30, 40, 50)},
    # ... with the image mixture's IM defaults (szq0214/CMC_with_Image_Mixture train_CMC.py --IM).
    "cmc_imagenet100_r50v1_ycbcr_im.yaml": {
        **_IMAGENET_EVAL, "method.name": "cmc", "model.arch": "resnet50", "model.width": 0.5,
        "aug.colorspace": "ycbcr", "method.cmc.K": 4096, "aug.mix.kind": "im", "aug.mix.g_alpha": 1.0,
        "aug.mix.g_num": 2, "aug.mix.g_prob": 0.1, "aug.mix.r_beta": 1.0, "aug.mix.r_prob": 0.1, "aug.mix.r_num": 2,
        "aug.mix.r_pixel_decay": 1.0, "train.epochs": 240},
    # CMC's split AlexNet (HobbitLong/CMC train_CMC.py defaults; LinearProbing.py --layer 5).
    "cmc_imagenet_alexnet_lab.yaml": {
        **_IMAGENET_EVAL, "method.name": "cmc", "model.arch": "alexnet_half", "aug.colorspace": "lab",
        "aug.crops": [(1, 224, (0.2, 1.0))], "method.cmc.K": 16384, "method.cmc.T": 0.07, "method.cmc.momentum": 0.5,
        "train.epochs": 240, "train.lr": 0.03, "train.milestones": (120, 160, 200), "linear.stages": (5,),
        "linear.lr": 0.1, "linear.milestones": (30, 40, 50), "linear.gamma": 0.2},
    # The CMC demo on real colour photographs (README 'Methods' table).
    "cmc_photos.yaml": {"method.name": "cmc", "aug.colorspace": "lab", "model.arch": "resnet18", "model.width": 0.25,
                        "aug.crops": [(1, 64, (0.08, 1.0))], "data.path": "data/photos", "method.cmc.K": 0,
                        "method.cmc.loss": "softmax", "method.cmc.T": 0.1, "train.epochs": 12,
                        "loader.batch_size": 32, "eval.at_start": True},
    # ISL (ZiweiWangTHU/ISL imagenet_main.py): 4 rounds x 100 epochs, full softmax T 0.07, m 0.5, GAN Adam 1e-4
    # (budget 200), mining tau 0.3, R 0.3, top-10, per 0.5; lr 0.03 / 256, wd 1e-4; final kNN k 200, sigma T.
    "isl_imagenet_r50.yaml": {
        **_NPID_AUG, **_IMAGENET_EVAL, "method.name": "isl", "model.arch": "resnet50", "method.isl.T": 0.07,
        "method.isl.momentum": 0.5, "method.isl.rounds": 4, "train.epochs": 100, "method.isl.gan_lr": 1e-4,
        "method.isl.gan_epochs": 200, "method.isl.mine_epochs": 200, "method.isl.tau": 0.3, "method.isl.R": 0.3,
        "method.isl.topk": 10, "method.isl.per": 0.5, "method.isl.negatives": 4096, "method.isl.kl_weight": 0.5,
        "train.lr": 0.03, "train.lr_batch": 256, "loader.batch_size": 256, "train.weight_decay": 1e-4,
        "eval.features": "recompute"},
    # ISL small sets (small_main.py): 4 rounds x 200 epochs, T 0.1, tau 0.5, R 0.6, batch 128, wd 5e-4, no flip.
    "isl_cifar_alexnet.yaml": {
        "method.name": "isl", "model.arch": "alexnet", "model.stem": "small", "aug.crops": [(1, 32, (0.2, 1.0))],
        "method.isl.T": 0.1, "method.isl.rounds": 4, "train.epochs": 200, "train.lr": 0.03, "train.lr_batch": 128,
        "train.weight_decay": 5e-4},
    "isl_cifar_r18.yaml": {
        "method.name": "isl", "model.arch": "resnet18", "model.stem": "small", "aug.crops": [(1, 32, (0.2, 1.0))],
        "aug.flip_p": 0.0, "aug.jitter": (0.4,) * 4, "aug.grey_p": 0.2, "method.isl.T": 0.1, "method.isl.rounds": 4,
        "train.epochs": 200, "method.isl.tau": 0.5, "method.isl.R": 0.6, "method.isl.topk": 10,
        "method.isl.gan_lr": 1e-4, "method.isl.negatives": 4096, "train.lr": 0.03, "train.lr_batch": 128,
        "loader.batch_size": 128, "train.weight_decay": 5e-4, "eval.knn_k": 200, "eval.knn_sigma": 0.1,
        "eval.features": "recompute"},
    # The ISL demo (README 'Methods' table): the small-set values, 2 shortened rounds.
    "isl_fmnist.yaml": {**_FMNIST, "aug.crops": [(1, 28, (0.3, 1.0))], "data.path": "data/fmnist_10k",
                        "method.name": "isl", "method.isl.T": 0.1, "method.isl.rounds": 2, "method.isl.tau": 0.5,
                        "method.isl.R": 0.6, "aug.flip_p": 0.0, "model.width": 0.25, "train.epochs": 6,
                        "loader.batch_size": 32, "train.schedule": "cosine"},
    # The README's main job: sized to finish in minutes on 2 cores (README 'Set-up').
    "npid_fmnist.yaml": {**_FMNIST, "aug.crops": [(1, 28, (0.3, 1.0))], "data.path": "data/fmnist_10k",
                         "method.name": "npid", "method.npid.K": 0, "method.npid.loss": "softmax",
                         "method.npid.T": 0.1, "method.npid.momentum": 0.5, "model.width": 0.25,
                         "model.stem": "imagenet", "train.epochs": 8, "loader.batch_size": 32,
                         "train.eval_every": 4, "model.head": "linear", "train.schedule": "cosine"},
}


def _get(cfg, dotted):
    v = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v


def test_every_shipped_config_has_its_key_numbers_listed():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert shipped == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_config_loads_with_its_recipe(name):
    cfg = load_config(os.path.join(ROOT, "configs", name))
    for key, want in RECIPES[name].items():
        if key == "aug.crops":
            if want is not None:
                assert [(c.count, c.size, c.scale) for c in cfg.aug.crops] == want, name
            continue
        got = _get(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), f"{name}: {key}={got}, the recipe says {want}"
        else:
            assert got == want, f"{name}: {key}={got!r}, the recipe says {want!r}"


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
    with pytest.raises(dataclasses.FrozenInstanceError, match="batch_size"):
        cfg.loader.batch_size = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match="crops"):
        cfg.aug.crops = ()
    save_config(cfg, str(tmp_path / "saved.yaml"))
    again = load_config(str(tmp_path / "saved.yaml"))
    assert to_dict(again) == to_dict(cfg) and again == cfg


def test_yaml_booleans_read_back_as_the_words_they_were(tmp_path):
    """YAML 1.1 reads `off` as false: a string option takes the word back (model.amp=off)."""
    assert load_config(None, ["model.amp=off"]).model.amp == "off"
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  amp: off\n")
    assert load_config(str(p)).model.amp == "off"
    with pytest.raises(ConfigError, match=r"'model\.head': must be one of .*got True"):
        load_config(None, ["model.head=yes"])  # no such word among the options: still an error
