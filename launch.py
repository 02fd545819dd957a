"""fastinst command line.

    python launch.py prepare fmnist --out data/fmnist
    python launch.py prepare imagenet --src /path/to/imagenet --out data/imagenet-zip
    python launch.py prepare photos --out data/photos --n 2000
    python launch.py profile --config configs/profile_simclr.yaml --out runs/profile data.path=data/photos
    torchrun --nproc_per_node=8 launch.py profile --config configs/profile_simclr.yaml --out runs/profile
    python launch.py train --config configs/npid_fmnist.yaml --out runs/npid_fmnist
    python launch.py train --config configs/npid_fmnist.yaml --out runs/npid_fmnist --resume auto train.epochs=20
    torchrun --nproc_per_node=8 launch.py train --config configs/npid_imagenet_r50.yaml --out runs/npid_r50 \
        data.path=data/imagenet-zip
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
        launch.py train --config configs/npid_imagenet_r50.yaml --out runs/npid_r50 data.path=data/imagenet-zip
    python launch.py eval --config configs/npid_fmnist.yaml --checkpoint runs/npid_fmnist/checkpoints/ckpt_000002340
    python launch.py linear --config configs/npid_fmnist.yaml --checkpoint runs/npid_fmnist --out runs/npid_fmnist/linear
    torchrun --nproc_per_node=8 launch.py linear --config configs/npid_imagenet_r50.yaml \
        --checkpoint runs/npid_r50/checkpoints/ckpt_000100000 --out runs/npid_r50/linear loader.batch_size=32
    python launch.py linear --config configs/npid_fmnist.yaml --checkpoint runs/npid_fmnist --out runs/eval/stages \
        --stages 1,2,3,4,5
    python launch.py svm --config configs/npid_fmnist.yaml --checkpoint runs/npid_fmnist --out runs/eval/svm \
        --baseline random
    python launch.py export --checkpoint runs/npid_r50 --out runs/npid_r50/resnet50_backbone.pth

Settings after the options are dotted config overrides (``key.sub=value``). Under torchrun
the process reads RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR from its environment only.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _load_config(path, overrides):
    """The config of ``path`` with ``overrides``, the registered methods' sections included."""
    import fastinst.methods  # noqa: F401  (registers the methods' config sections)
    from fastinst.config import load_config

    return load_config(path, overrides)


def _cmd_prepare(args) -> int:
    from loaders import prepare

    if args.what == "fmnist":
        prepare.fmnist_to_zip(args.out, src=args.src or prepare.FMNIST_DIR, limit_train=args.limit,
                              limit_val=args.limit_val)
    elif args.what == "imagenet":
        if not args.src:
            raise SystemExit("prepare imagenet needs --src (a folder with train/<synset>/ and val/<synset>/)")
        prepare.imagenet_to_zip(args.src, args.out, classes=args.classes)
    elif args.what == "photos":
        prepare.photo_crops(args.out, n=args.n, src=args.src or prepare.PHOTO_DIR, seed=args.seed, val=args.val,
                            folder=args.folder)
    return 0


def _cmd_profile(args) -> int:
    from fastinst.core.runtime import DistEnv
    from loaders.profile import run_profile

    cfg = _load_config(args.config, args.overrides)
    env = DistEnv.from_env()
    out = args.out if env.world == 1 else os.path.join(args.out, f"rank{env.rank}")
    run_profile(cfg, out, env)
    return 0


def _cmd_train(args) -> int:
    from fastinst.train.engine import train
    from fastinst.core.runtime import main_guard

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = _load_config(args.config, overrides)
    main_guard(train, cfg, args.out)
    if int(os.environ.get("RANK", 0)) == 0:
        _print_knn_summary(os.path.join(args.out, "metrics.jsonl"))
    return 0


def _print_knn_summary(path: str) -> None:
    """The run's kNN results in one place: random init (if evaluated) and the last evaluation."""
    import json

    if not os.path.isfile(path):
        return
    with open(path) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    init = [r for r in evals if r.get("init")]
    trained = [r for r in evals if not r.get("init")]
    if trained:
        r = trained[-1]
        line = f"kNN top-1 {r['knn_top1']:.2f}% (top-5 {r['knn_top5']:.2f}%) after epoch {r['epoch']}"
        if init:
            line += f"; random-init network: top-1 {init[-1]['knn_top1']:.2f}%"
        print(line)


def _cmd_eval(args) -> int:
    import json

    from fastinst.train.engine import evaluate_checkpoint
    from fastinst.core.runtime import main_guard

    cfg = _load_config(args.config, args.overrides)
    res = main_guard(evaluate_checkpoint, cfg, args.checkpoint)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res))
    return 0


def _cmd_linear(args) -> int:
    import json

    from fastinst.core.runtime import main_guard
    from fastinst.eval.linear import linear_probe

    overrides = list(args.overrides) + ([f"linear.resume={args.resume}"] if args.resume else [])
    overrides += [f"linear.stages=[{args.stages}]"] if args.stages else []
    cfg = _load_config(args.config, overrides)
    res = main_guard(linear_probe, cfg, args.checkpoint, args.out)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"linear probe: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% after epoch {res['epoch']:g} "
              f"(best top-1 {res['best_top1']:.2f}%)")
        if "heads" in res:
            print("| head | top-1 | top-5 |\n|---|---|---|\n" + "\n".join(
                f"| {n} | {h['top1']:.2f} | {h['top5']:.2f} |" for n, h in res["heads"].items()))
        print(json.dumps(res))
    return 0


def _cmd_svm(args) -> int:
    import json

    from fastinst.core.runtime import main_guard
    from fastinst.eval.svm import plot_low_shot, run_svm

    cfg = _load_config(args.config, args.overrides)
    res = main_guard(run_svm, cfg, args.checkpoint, args.out)
    base = None
    if args.baseline == "random":  # the same protocol on the untrained encoder
        base = main_guard(run_svm, cfg, "random", os.path.join(args.out, "random_init"))
    elif args.baseline:
        raise SystemExit(f"svm --baseline {args.baseline!r}: the only baseline is 'random'")
    if int(os.environ.get("RANK", 0)) == 0:
        what = "mAP" if res["multi_label"] else "accuracy"
        print(f"svm: {what} {res['svm']['accuracy']:.2f}% (C={res['svm']['cost']:g}"
              f"{', median over classes' if res['multi_label'] else ''}, {res['feature']}, {res['dims']} dims)"
              + (f"; random init {base['svm']['accuracy']:.2f}%" if base else ""))
        if res["low_shot"]:
            curves = {"trained": res["low_shot"], **({"random init": base["low_shot"]} if base else {})}
            print("| k | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves))
            for i, r in enumerate(res["low_shot"]):
                print(f"| {r['k']} | " + " | ".join(f"{c[i]['mean']:.2f} ± {c[i]['std']:.2f}" for c in curves.values())
                      + " |")
            print("plot:", plot_low_shot(curves, os.path.join(args.out, "low_shot.png")))
        print(json.dumps({"trained": res, **({"random_init": base} if base else {})}))
    return 0


def _cmd_export(args) -> int:
    import json

    from fastinst.eval.export import export_backbone

    if args.overrides and not args.config:
        raise SystemExit("export: config overrides need --config (the architecture comes from the checkpoint)")
    cfg = _load_config(args.config, args.overrides) if args.config else None
    if int(os.environ.get("RANK", 0)) == 0:  # one writer under torchrun
        print(json.dumps(export_backbone(args.checkpoint, args.out, cfg, fmt=args.format or "torchvision")))
    return 0


def _record(fn):
    """torch.distributed.elastic's ``@record``: a failing rank's traceback goes to the error file
    torchrun names (TORCHELASTIC_ERROR_FILE) and into torchrun's failure summary."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:
        return fn
    return record(fn)


@_record
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("prepare", help="build a dataset in the zip layout")
    pp.add_argument("what", choices=["fmnist", "imagenet", "photos"])
    pp.add_argument("--out", required=True, help="output directory (gets <split>.zip + <split>_map.txt)")
    pp.add_argument("--src", default=None, help="input: IDX dir (fmnist), ImageNet tree, or photo dir")
    pp.add_argument("--limit", type=int, default=0, help="fmnist: keep the first N train images (0 = all)")
    pp.add_argument("--limit-val", type=int, default=0, help="fmnist: keep the first N val images (0 = all)")
    pp.add_argument("--n", type=int, default=2000, help="photos: number of train images")
    pp.add_argument("--val", type=int, default=0, help="photos: number of val images")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--folder", action="store_true", help="photos: write the ImageNet folder layout instead")
    pp.add_argument("--classes", default="", help="imagenet: a class-list file (synsets, one per line): keep only those "
                    "classes, relabelled 0..C-1 in sorted order (ImageNet-100)")
    pp.set_defaults(func=_cmd_prepare)

    def command(name: str, func, help: str, **args):
        """A subcommand taking --config, the options in ``args`` (name -> (required, help)) and
        trailing key.sub=value overrides."""
        c = sub.add_parser(name, help=help)
        config_help = args.pop("config", None)
        c.add_argument("--config", required=config_help is None, default=None, help=config_help)
        for opt, (required, text) in args.items():
            c.add_argument(f"--{opt}", required=required, default=None, help=text)
        c.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
        c.set_defaults(func=func)

    command("profile", _cmd_profile, "loader-only throughput, DALI vs torchvision side by side",
            out=(True, "run directory (gets profile.json and config.yaml)"))
    command("train", _cmd_train, "self-supervised training (every rank under torchrun)",
            out=(True, "run directory (config.yaml, metrics.jsonl, checkpoints/)"),
            resume=(False, "auto (newest complete checkpoint in OUT/checkpoints), none, or a checkpoint "
                           "directory; default: train.resume from the config (auto)"))
    command("eval", _cmd_eval, "weighted kNN accuracy of a checkpoint (same world size as its save)",
            checkpoint=(True, "a ckpt_* directory with a COMPLETE marker"))
    command("linear", _cmd_linear, "linear probe on the frozen backbone of a checkpoint (PIC main_linear.py)",
            checkpoint=(True, "a ckpt_* directory with a COMPLETE marker, or a run directory (its newest "
                              "checkpoint); any world size"),
            out=(True, "probe directory (config.yaml, metrics.jsonl, checkpoints/)"),
            resume=(False, "auto, none or a probe checkpoint; default: linear.resume (auto)"),
            stages=(False, "e.g. 1,2,3,4,5: one head per ResNet stage (MMSelfSup's multi-head benchmark; "
                           "linear.stages) instead of one on the pooled features"))
    command("svm", _cmd_svm, "linear SVM and low-shot SVMs on frozen features (MMSelfSup's VOC07 protocol, "
            "scikit-learn LinearSVC)",
            checkpoint=(True, "a ckpt_* directory or a run directory (its newest), or 'random' (the untrained "
                              "encoder)"),
            out=(True, "directory: cached features_<split>.npz, svm.json, low_shot.png"),
            baseline=(False, "'random': also the untrained encoder (OUT/random_init), a second curve in the plot"))
    command("export", _cmd_export, "write a checkpoint's backbone(s) for torchvision, detectron2, mmdet or timm",
            config="optional: check model.arch / model.stem / model.width against the checkpoint's own config "
                   "(overrides need it)",
            checkpoint=(True, "a ckpt_* directory or a run directory (its newest)"),
            out=(True, "output file (torchvision: strict=False load misses only fc.*; several trunks: one file "
                       "each, OUT's stem + .<trunk>)"),
            format=(False, "torchvision (default), detectron2 (.pkl), mmdet ({'state_dict': ...}) or timm"))

    # Overrides may also follow options given after them (``--out D k=v --resume auto k2=v2``).
    args, extra = p.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from fastinst.config import ConfigError
    from fastinst.train.checkpoint import CheckpointError
    from loaders.sources import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from fastinst.train.trainer import NonFiniteLossError

        if not isinstance(e, NonFiniteLossError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
