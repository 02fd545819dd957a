"""PIC, MoCo v2 and SimCLR through the same engine as NPID (CPU, tiny JPEGs, ResNet-18 small
stem at 16 / 12 px), the method-protocol hooks, and the engine's freedom from method names."""
import ast
import json
import math
import os

import pytest
import torch

from datagen import make_colour_train_val
from descent import assert_one_step_descends, trained_params
from fastinst.train import engine
from fastinst.config import ConfigError, load_config
from fastinst.methods import available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "loader.backend=torch", "loader.num_workers=1", "loader.batch_size=8", "loader.channels_last=false",
    "aug.crops=[{count: 2, size: 16, scale: [0.2, 1.0]}]", "aug.eval_resize=16", "aug.eval_crop=16",
    "aug.blur_p=0", "model.arch=resnet18", "model.stem=small", "model.head=mlp", "model.hidden_dim=64",
    "train.epochs=1", "train.lr=0.03", "train.lr_batch=8", "train.milestones=[]", "train.log_every=1",
    "train.eval_every=0", "train.schedule=cosine",
]
MULTICROP = "aug.crops=[{count: 1, size: 16, scale: [0.14, 1.0]}, {count: 2, size: 12, scale: [0.08, 0.14]}]"


def tiny_cfg(data, *over):
    return load_config(None, TINY + [f"data.path={data}"] + list(over))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_train_val(str(tmp_path_factory.mktemp("colours")))


def metrics(out, kind="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("over", [
    ["method.name=npid", "method.npid.K=8"],  # NCE over 8 noise rows
    ["method.name=npid", "method.npid.K=0", "method.npid.loss=softmax"],  # full softmax over the bank
    ["method.name=pic", MULTICROP],  # full softmax, multi-crop (small crops: detached weight)
    ["method.name=pic", MULTICROP, "method.pic.negatives=8", "method.pic.sampling=uniform"],
    ["method.name=moco", "method.moco.K=32"],
    ["method.name=simclr", "method.simclr.T=0.2", "train.optimizer=lars", "train.weight_decay=1.0e-6"],
], ids=["npid-nce", "npid-softmax", "pic", "pic-sampled", "moco", "simclr-lars"])
def test_method_trains_through_engine(colours, tmp_path, over):
    """Each method through the engine: finite losses and a kNN record, every parameter its
    optimisers own moved, and one engine step descends the method's loss (tests/descent.py:
    first-order descent on a fixed batch, which a wrong sign, a detached parameter group or an
    unstepped optimiser breaks; a 4-step loss curve with moving targets could not show it)."""
    cfg = tiny_cfg(colours, "train.eval_every=1", *over)
    init = assert_one_step_descends(cfg, str(tmp_path / "descent"))
    out = str(tmp_path / "run")
    tr = engine.train(cfg, out)
    losses = [r["loss"] for r in metrics(out)]
    assert tr.step == 4 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    ev = metrics(out, "eval")
    assert len(ev) == 1 and 0 <= ev[0]["knn_top1"] <= ev[0]["knn_top5"] <= 100
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    trained = trained_params(tr)
    assert len(trained) == len(init) and all(p.shape == q.shape for p, q in zip(trained, init))
    still = [i for i, (p, q) in enumerate(zip(trained, init)) if torch.equal(p.detach(), q)]
    assert not still, f"parameters the optimisers own that never moved: {still}"


def test_pic_classifier_out_of_ddp_with_own_optimizer(colours, tmp_path):
    tr = engine.train(tiny_cfg(colours, "method.name=pic", MULTICROP, "train.max_steps=2"), str(tmp_path / "r"))
    w = tr.method.classifier.weight
    assert all(w is not p for p in tr.model.parameters())  # not in the model (nor in DDP)
    assert [type(o).__name__ for o in tr.optimizers.values()] == ["SGD", "LazySGD"]
    assert tr.optimizers["classifier"].steps == 2 and tr.optimizers["classifier"].param_groups[0]["lr"] > 0
    feats, labels = tr.method.train_features()
    assert feats.shape == (32, 128) and labels.shape == (32,)


def test_pic_resume_reproduces_uninterrupted_run(colours, tmp_path):
    """LazySGD state (momentum, per-row step counters, lr history), the classifier shard and the
    recent-negatives FIFO are checkpointed: save -> load -> the same losses and weights.
    Unit-norm initial rows (init_std = 1/sqrt(128)): with PIC's 0.01 and a batch of 8 a row's
    step is larger than the row itself, and the rounding of the (exact) lazy catch-up done at
    the interrupted run's extra checkpoint grows to 1e-3 in a few steps."""
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    over = ["method.name=pic", MULTICROP, "method.pic.negatives=6", "method.pic.sampling=recent",
            "method.pic.init_std=0.0884", "train.epochs=2", "train.warmup_epochs=0.5"]
    straight = engine.train(tiny_cfg(colours, *over), a)
    engine.train(tiny_cfg(colours, *over, "train.max_steps=3"), b)  # stops mid-epoch
    resumed = engine.train(tiny_cfg(colours, *over), b, resume="auto")
    assert resumed.step == straight.step == 8
    assert [r["loss"] for r in metrics(b)] == pytest.approx([r["loss"] for r in metrics(a)], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(resumed.method.classifier.weight, straight.method.classifier.weight)
    torch.testing.assert_close(resumed.method.recent, straight.method.recent)
    sa, sb = straight.optimizers["classifier"], resumed.optimizers["classifier"]
    assert sa._tree.lrs == pytest.approx(sb._tree.lrs)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over", [
    ["method.name=moco", "method.moco.K=16", "method.moco.m=0.9"],
    ["method.name=simclr", "method.simclr.T=0.2", "train.optimizer=lars", "train.weight_decay=1.0e-6"],
], ids=["moco", "simclr-lars"])
def test_moco_simclr_resume_reproduces_uninterrupted_run(colours, tmp_path, over):
    """Stopped mid-epoch and resumed == uninterrupted, as for NPID and PIC: MoCo's key encoder,
    queue (and its pointer) and BN-shuffle seeds, SimCLR's LARS momentum, the model, the loader
    position and the per-step lr all come back from the checkpoint."""
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    over = over + ["train.epochs=2", "train.warmup_epochs=0.5"]
    straight = engine.train(tiny_cfg(colours, *over), a)
    first = engine.train(tiny_cfg(colours, *over, "train.max_steps=3"), b)  # stops mid-epoch 1
    assert first.step == 3 and (first.loader.epoch, first.loader.next_batch) == (0, 3)
    resumed = engine.train(tiny_cfg(colours, *over), b, resume="auto")
    assert resumed.step == straight.step == 8
    la, lb = ([(r["step"], r["loss"], r["lr"]) for r in metrics(d)] for d in (a, b))
    assert [s for s, _, _ in lb] == list(range(1, 9))
    assert [v for x in lb for v in x[1:]] == pytest.approx([v for x in la for v in x[1:]], rel=1e-5, abs=1e-6)
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    ms, mr = straight.method.state_dict(), resumed.method.state_dict()
    assert set(ms) == set(mr)
    for k in ms:  # MoCo: key encoder and queue; SimCLR: nothing
        torch.testing.assert_close(mr[k], ms[k], rtol=1e-5, atol=1e-6)
    for oa, ob in zip(straight.optimizers.values(), resumed.optimizers.values()):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert set(sa) == set(sb) and sa
        for i in sa:
            for k in sa[i]:
                torch.testing.assert_close(sb[i][k], sa[i][k], rtol=1e-5, atol=1e-6)


def test_sliding_window_rescales_epochs(colours, tmp_path):
    """PIC counts epochs as passes over the data: with window 16 of N = 32 one loader epoch is
    half a pass, so 1 epoch = 2 windows (PIC main_pretrain.py: epochs * N / window)."""
    cfg = tiny_cfg(colours, "method.name=pic", "sampler.kind=sliding_window", "sampler.window=16",
                   "sampler.stride=8", "train.epochs=1", "train.warmup_epochs=0.5", "train.max_steps=0")
    tr = engine.train(cfg, str(tmp_path / "r"))
    assert tr.epoch_scale == 2.0 and tr.loader_epochs == 2 and len(tr.loader) == 2 and tr.step == 4
    lrs = [r["lr"] for r in metrics(str(tmp_path / "r"))]
    assert lrs[:2] == pytest.approx([0.015, 0.03])  # warm-up 0.5 pass = 1 window = 2 steps


def test_moco_queue_divisibility_checked_at_startup(colours, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.moco\.K.*K=20.*global batch 8"):
        engine.train(tiny_cfg(colours, "method.name=moco", "method.moco.K=20"), str(tmp_path / "r"))
    assert not os.path.exists(os.path.join(tmp_path, "r", "metrics.jsonl"))  # nothing ran


def test_moco_key_encoder_and_queue_move(colours, tmp_path):
    tr = engine.train(tiny_cfg(colours, "method.name=moco", "method.moco.K=16", "method.moco.m=0.5",
                               "train.max_steps=2"), str(tmp_path / "r"))
    m = tr.method
    assert int(m.queue.ptr) == 0  # 2 enqueues of 8 keys into 16 rows: wrapped once
    key = dict(m.key_encoder.named_parameters())
    q = dict(tr.model.named_parameters())
    assert not any(p.requires_grad for p in key.values())
    assert any(not torch.equal(key[n], q[n]) for n in q)  # an EMA, not a copy
    assert "key_encoder.head.fc2.weight" in m.state_dict() and "queue.queue" in m.state_dict()


@pytest.mark.parametrize("over, match", [
    (["method.name=moco", "aug.crops=[{count: 1, size: 16}]"], r"'aug\.crops'.*exactly 2 views"),
    (["method.name=simclr", MULTICROP], r"'aug\.crops'.*exactly 2 views"),
    (["method.name=moco", "model.sync_bn=true"], r"'method\.moco\.shuffle_bn'"),
    (["method.pic.T=0"], r"'method\.pic\.T'"),
    (["method.moco.m=1.0"], r"'method\.moco\.m'"),
    (["method.simclr.T=-1"], r"'method\.simclr\.T'"),
    (["train.optimizer=adam"], r"'train\.optimizer'"),
])
def test_method_config_errors_name_the_key(colours, over, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(colours, *over)


def test_pic_negatives_must_be_below_n(colours, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.pic\.negatives.*N=32"):
        engine.train(tiny_cfg(colours, "method.name=pic", "method.pic.negatives=32"), str(tmp_path / "r"))


def _package_modules():
    """Every Python module of the trainer: fastinst/ (recursively), loaders/ and launch.py."""
    files = [os.path.join(ROOT, "launch.py")]
    for pkg in ("fastinst", "loaders"):
        for d, _, names in os.walk(os.path.join(ROOT, pkg)):
            files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return sorted(files)


def method_name_branches(path, classes, root=ROOT):
    """Places in one module's source that pick behaviour by which method runs: a string literal
    equal to a method's name or class name, a test that reads ``method.name``, and
    isinstance/issubclass/type(...) checks against a method class or hasattr/getattr probes of
    a method object. ``classes`` maps each registered name to its class name. A method's own
    module may name itself (its ``@register`` line, its class in annotations), and a
    dataclass field may default to a name (a choice, not a branch). A method's own module is
    ``fastinst/methods/<name>.py`` or any module of its folder ``fastinst/methods/<name>/``."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    with open(path) as f:
        tree = ast.parse(f.read(), filename=rel)
    own = set()
    parts = rel.split("/")
    if parts[:2] == ["fastinst", "methods"] and len(parts) > 2:  # methods/<name>.py or methods/<name>/*.py
        me = parts[2] if len(parts) > 3 else os.path.splitext(parts[2])[0]
        own = {me, classes.get(me)}
    banned = (set(classes) | set(classes.values())) - own
    defaults = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                for n in n.body if isinstance(n, ast.AnnAssign) and n.value is not None}
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in banned \
                and id(node) not in defaults:
            found.append(f"{where}: literal {node.value!r}")
        if isinstance(node, (ast.Compare, ast.If, ast.IfExp, ast.While, ast.Match, ast.Assert)):
            src = ast.unparse(getattr(node, "test", None) or getattr(node, "subject", None) or node)
            if "method.name" in src:
                found.append(f"{where}: branch on {src}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [ast.unparse(a) for a in node.args]
            types_named = args[1].replace("(", " ").replace(")", " ").replace(",", " ").split() if len(args) == 2 else []
            if node.func.id in ("isinstance", "issubclass") and set(types_named) & set(classes.values()):
                found.append(f"{where}: {ast.unparse(node)}")
            if node.func.id == "type" and args and "method" in args[0]:
                found.append(f"{where}: {ast.unparse(node)}")
            if node.func.id in ("hasattr", "getattr") and args and "method" in args[0].lower():
                found.append(f"{where}: {ast.unparse(node)}")
    return found


def test_package_never_branches_on_method_names():
    """DESIGN.md: 'the engine never branches on a method's name'. Scanned: every module of
    fastinst/, loaders/ and launch.py, the config package included; the registry is the one list of
    names (a method's config check lives on its class: ``Method.check_config``)."""
    from fastinst.methods import method_class

    names = available()
    assert {"npid", "pic", "moco", "simclr"} <= set(names)
    classes = {n: method_class(n).__name__ for n in names}
    files = _package_modules()
    rels = {os.path.relpath(f, ROOT).replace(os.sep, "/") for f in files}
    assert len(files) > 20 and {"fastinst/config/tree.py", "fastinst/methods/registry.py",
                                "fastinst/train/engine.py", "fastinst/methods/pic/classifier.py"} <= rels
    found = [hit for f in files for hit in method_name_branches(f, classes)]
    assert not found, "\n".join(found)


def test_method_name_scan_finds_each_kind_of_branch(tmp_path):
    """The scanner itself: each construct it must catch, written into a module, is reported."""
    classes = {"npid": "NPID", "moco": "MoCo"}
    bad = {
        "literal": "if cfg.method.kind == 'moco':\n    pass\n",
        "name": "x = 1 if cfg.method.name else 2\n",
        "isinstance": "ok = isinstance(m, (int, NPID))\n",
        "hasattr": "ok = hasattr(self.method, 'bank')\n",
        "getattr": "q = getattr(tr.method, 'queue', None)\n",
        "type": "t = type(method)\n",
        "dict": "views = {'moco': 2}.get(name)\n",
        "class name": "if type(m).__name__ == 'NPID':\n    pass\n",
    }
    for kind, src in bad.items():
        p = tmp_path / "fastinst" / f"{kind}.py"
        p.parent.mkdir(exist_ok=True)
        p.write_text(src)
        assert method_name_branches(str(p), classes, str(tmp_path)), kind
    default = tmp_path / "fastinst" / "default.py"
    default.write_text("class MethodConfig:\n    name: str = 'npid'\n")
    assert method_name_branches(str(default), classes, str(tmp_path)) == []
    own = tmp_path / "fastinst" / "methods" / "moco.py"
    own.parent.mkdir()
    own.write_text("@register('moco')\nclass MoCo:\n    def f(self) -> 'MoCo': pass\n")
    assert method_name_branches(str(own), classes, str(tmp_path)) == []  # a method may name itself
    own.write_text("@register('moco')\nclass MoCo:\n    kind = 'npid'\n")
    assert len(method_name_branches(str(own), classes, str(tmp_path))) == 1  # but not another method
    folder = tmp_path / "fastinst" / "methods" / "moco" / "keys.py"
    folder.parent.mkdir()
    folder.write_text("class KeyQueue:\n    owner = 'MoCo'\n")
    assert method_name_branches(str(folder), classes, str(tmp_path)) == []  # a method's folder names itself
    folder.write_text("class KeyQueue:\n    owner = 'npid'\n")
    assert len(method_name_branches(str(folder), classes, str(tmp_path))) == 1  # but not another method


def test_shipped_configs_match_the_seeds():
    pic = load_config(os.path.join(ROOT, "configs", "pic_imagenet_r50.yaml"))
    assert (pic.method.name, pic.method.pic.T, pic.model.head) == ("pic", 0.2, "mlp_nobn")
    for name in ("pic", "instdisc", "mocov2", "simclr"):  # bl0/PIC's resnet.py and --mlp-head
        m = load_config(os.path.join(ROOT, "configs", f"{name}_imagenet_r50.yaml")).model
        assert (m.head, m.zero_init_residual) == ("mlp_nobn", True), name
    assert (pic.sampler.kind, pic.sampler.window, pic.sampler.stride, pic.sampler.reshuffle) == (
        "sliding_window", 131072, 16384, True)
    assert [(c.count, c.size, c.scale) for c in pic.aug.crops] == [(1, 160, (0.14, 1.0)), (3, 96, (0.08, 0.14))]
    assert (pic.train.epochs, pic.train.warmup_epochs, pic.train.schedule, pic.train.lr) == (200, 5, "cosine", 0.03)
    moco = load_config(os.path.join(ROOT, "configs", "mocov2_imagenet_r50.yaml")).method.moco
    assert (moco.K, moco.m, moco.T) == (65536, 0.999, 0.2)
    sim = load_config(os.path.join(ROOT, "configs", "simclr_imagenet_r50.yaml"))
    assert (sim.method.simclr.T, sim.train.optimizer, sim.train.lr, sim.train.weight_decay) == (0.1, "lars", 0.3, 1e-6)
    fs = load_config(os.path.join(ROOT, "configs", "npid_imagenet_fullsoftmax_r50.yaml")).method.npid
    assert (fs.K, fs.loss) == (0, "softmax")
    inst = load_config(os.path.join(ROOT, "configs", "instdisc_imagenet_r50.yaml")).method.npid
    assert (inst.K, inst.T, inst.momentum, inst.loss) == (65536, 0.07, 0.5, "softmax")
