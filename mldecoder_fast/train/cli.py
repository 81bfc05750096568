"""``mldecoder-fast train RECIPE ...``: the training subcommands.

``register(subparsers)`` adds ``train`` with one sub-subcommand per recipe. ``multilabel`` lives
here; other recipes are modules listed in ``RECIPES``, each with its own ``register(subparsers)``
adding its parser to the ``train`` subparsers (a module that is not there yet is skipped).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

RECIPES = {
    "singlelabel": "mldecoder_fast.train.singlelabel",
    "zsl": "mldecoder_fast.train.zsl",
}

# The MS-COCO recipe of the paper (SPEC "Reproduction recipes"); --demo has its own (demo.py).
COCO_DEFAULTS = dict(model="tresnet_l", image_size=448, epochs=40, batch_size=56, lr=1e-4,
                     weight_decay=1e-4, ema_decay=0.9997, ema_warmup=False, decoder_embedding=768,
                     num_of_groups=-1, workers=8)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a timm backbone with an ML-Decoder head",
                                   description="Train a timm backbone with an ML-Decoder head.")
    recipes = parser.add_subparsers(dest="recipe", metavar="RECIPE")
    parser.set_defaults(func=lambda args: _no_recipe(parser))
    register_multilabel(recipes)
    for name, module in RECIPES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # that recipe is not part of this install
            _unavailable(recipes, name, exc)
            continue
        except ImportError as exc:
            _unavailable(recipes, name, exc)
            continue
        mod.register(recipes)


def _no_recipe(parser) -> int:
    parser.print_help()
    return 1


def _unavailable(recipes, name, exc) -> None:
    p = recipes.add_parser(name, help=f"(unavailable: {exc})")
    p.set_defaults(func=lambda args: print(f"train {name} is unavailable: {exc}", file=sys.stderr) or 2)


def register_multilabel(recipes) -> None:
    from .._cli_types import SEED, float_range, int_range
    from .amp import AMP_CHOICES
    p = recipes.add_parser(
        "multilabel", help="multi-label training (the ML-Decoder MS-COCO recipe)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Multi-label training with the ML-Decoder MS-COCO recipe: Asymmetric Loss, "
                    "Adam with decoupled weight decay, OneCycleLR, mixed precision on GPU, model "
                    "EMA, mAP of the model and its EMA after every epoch. Defaults (None below) "
                    f"are the paper's: {COCO_DEFAULTS}; with --demo, the demo's.")
    data = p.add_argument_group("data (one of them)")
    data.add_argument("--data", help="a COCO folder (annotations/instances_{train,val}2014.json, "
                      "train2014/, val2014/; or 2017), or a CSV with a split column")
    data.add_argument("--train-json", help="COCO instances json of the training set")
    data.add_argument("--train-images", help="image folder of --train-json")
    data.add_argument("--val-json", help="COCO instances json of the validation set")
    data.add_argument("--val-images", help="image folder of --val-json")
    data.add_argument("--train-csv", help="CSV of path,labels for training")
    data.add_argument("--val-csv", help="CSV of path,labels for validation")
    data.add_argument("--images-root", help="root of relative CSV paths (default: the CSV's folder)")
    data.add_argument("--allow-empty-labels", action="store_true",
                      help="train on CSV rows with no label (all-negative) instead of failing")
    data.add_argument("--demo", action="store_true",
                      help="no download: digit mosaics from scikit-learn, small backbone, CPU-sized")
    data.add_argument("--train-size", type=int_range(1), default=None, help="demo: training mosaics")
    data.add_argument("--val-size", type=int_range(1), default=None, help="demo: held-out mosaics")
    data.add_argument("--grid", type=int_range(1), default=None, help="demo: mosaics of grid x grid cells")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="timm model name")
    m.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument (JSON value), e.g. drop_path_rate=0.1")
    m.add_argument("--init-checkpoint", help="initial weights from a checkpoint (not its training state)")
    m.add_argument("--trust-pickle", action="store_true",
                   help="read an --init-checkpoint that needs full unpickling (it can run any code: "
                        "only for a file from a source you trust); without it such a file is refused")
    m.add_argument("--head", choices=["fast", "reference", "both"], default="fast",
                   help="MLDecoderFast, the reference MLDecoder, or both one after the other (same "
                        "seed) with a comparison")
    m.add_argument("--backend", default="auto", help="MLDecoderFast backend")
    m.add_argument("--num-of-groups", type=int_range(1, also=(-1,)), default=None,
                   help="queries K (-1: 100)")
    m.add_argument("--decoder-embedding", type=int_range(1), default=None)

    t = p.add_argument_group("training")
    t.add_argument("--image-size", type=int_range(1), default=None)
    t.add_argument("--batch-size", type=int_range(1), default=None)
    t.add_argument("--epochs", type=int_range(1), default=None)
    t.add_argument("--lr", type=float_range(gt=0), default=None, help="peak (OneCycle max) learning rate")
    t.add_argument("--weight-decay", type=float_range(ge=0), default=None)
    t.add_argument("--weight-decay-mode", choices=["decoupled", "l2"], default="decoupled",
                   help="decoupled (AdamW, the SPEC recipe) or l2 (Adam + L2, as the official train.py)")
    t.add_argument("--pct-start", type=float_range(ge=0, lt=1), default=0.2)
    t.add_argument("--ema-decay", type=float_range(ge=0, le=1), default=None)
    t.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay min(decay, (1+t)/(10+t)) at update t (recipe: off; demo: on)")
    t.add_argument("--gamma-neg", type=float_range(ge=0), default=4)
    t.add_argument("--gamma-pos", type=float_range(ge=0), default=0)
    t.add_argument("--clip", type=float_range(ge=0, lt=1), default=0.05)
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="auto: fp16 autocast + GradScaler on CUDA, off on CPU")
    t.add_argument("--no-randaugment", action="store_true")
    t.add_argument("--cutout", type=float_range(ge=0, le=1), default=0.5, help="cutout size factor (0: off)")
    t.add_argument("--workers", type=int_range(0), default=None)
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    t.add_argument("--threads", type=int_range(1), default=None,
                   help="CPU threads for torch (default: torch's; 1 is faster on a busy machine)")
    t.add_argument("--max-steps-per-epoch", type=int_range(0), default=0, help="0: whole epochs")
    t.add_argument("--out", default=None, help="output folder (default runs/multilabel or runs/demo)")
    t.add_argument("--resume", help="continue exactly from a last.pth/best.pth of this run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-plot", action="store_true", help="no curves.png")
    p.set_defaults(func=run_multilabel)


def _settings(args) -> dict:
    from .demo import DEMO_DEFAULTS
    base = DEMO_DEFAULTS if args.demo else COCO_DEFAULTS
    s = {k: v for k, v in base.items()}
    for key in list(s):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    return s


def _model_kwargs(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _datasets(args, s, mean, std):
    """(train_set, val_set, class_names) for the chosen data source."""
    from . import data as D
    if args.demo:
        from .demo import demo_datasets
        train, val = demo_datasets(s["train_size"], s["val_size"], s["image_size"], mean, std,
                                   seed=args.seed, grid=s["grid"])
        return train, val, train.class_names
    sources = [bool(args.data), bool(args.train_json or args.val_json), bool(args.train_csv or args.val_csv)]
    if sum(sources) != 1:
        raise SystemExit("give the data one way: --data, --train-json/--val-json (+ --train-images/"
                         "--val-images), --train-csv/--val-csv, or --demo")
    kw_train = dict(image_size=s["image_size"], mean=mean, std=std)
    t_train = D.build_transforms(train=True, randaugment=not args.no_randaugment, cutout=args.cutout, **kw_train)
    t_val = D.build_transforms(train=False, **kw_train)
    if args.data and os.path.isfile(args.data):
        tr, names = D.load_csv(args.data, args.images_root, split="train", allow_empty=args.allow_empty_labels)
        va, _ = D.load_csv(args.data, args.images_root, names, split="val", allow_empty=True)
    elif args.data or args.train_json:
        if args.data:
            (ti, tj), (vi, vj) = D.find_coco(args.data)
        else:
            if not (args.train_json and args.val_json and args.train_images and args.val_images):
                raise SystemExit("--train-json needs --train-images, --val-json and --val-images")
            ti, tj, vi, vj = args.train_images, args.train_json, args.val_images, args.val_json
        tr, names = D.load_coco(ti, tj)
        va, _ = D.load_coco(vi, vj, class_names=names)
    else:
        if not (args.train_csv and args.val_csv):
            raise SystemExit("--train-csv needs --val-csv")
        tr, names = D.load_csv(args.train_csv, args.images_root, allow_empty=args.allow_empty_labels)
        va, _ = D.load_csv(args.val_csv, args.images_root, names, allow_empty=args.allow_empty_labels)
    return D.MultiLabelDataset(tr, names, t_train), D.MultiLabelDataset(va, names, t_val), names


def run_multilabel(args) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        heads = ["fast", "reference"] if args.head == "both" else [args.head]
        results = {}
        for head in heads:
            out = args.out or ("runs/demo" if args.demo else "runs/multilabel")
            if len(heads) > 1:
                out = os.path.join(out, head)
            results[head] = train_once(args, head, out)
        if len(heads) > 1:
            _compare(results, os.path.dirname(out))
        return 0
    except (DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train_once(args, head: str, out: str) -> dict:
    from .multilabel import (MultiLabelTrainer, TrainConfig, build_model, data_config,
                             init_from_checkpoint, seed_everything)
    s = _settings(args)
    seed_everything(args.seed)
    model_kwargs = _model_kwargs(args.model_arg)
    # The class list decides the head's size, so read the data first (with the backbone's
    # normalisation, which only needs the model's config).
    try:
        import timm
    except ImportError:
        raise SystemExit("training needs timm: pip install 'mldecoder-fast[timm]'") from None
    if not timm.is_model(s["model"]):
        raise SystemExit(f"unknown timm model {s['model']!r} (see timm.list_models())")
    probe_cfg = timm.get_pretrained_cfg(s["model"])
    mean = tuple(getattr(probe_cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(probe_cfg, "std", None) or (0.229, 0.224, 0.225))
    train_set, val_set, class_names = _datasets(args, s, mean, std)
    seed_everything(args.seed)
    model = build_model(s["model"], len(class_names), head=head, num_of_groups=s["num_of_groups"],
                        decoder_embedding=s["decoder_embedding"], pretrained=args.pretrained,
                        model_kwargs=model_kwargs, backend=args.backend)
    dc = data_config(model)
    if tuple(dc["mean"]) != mean or tuple(dc["std"]) != std:
        print(f"note: normalisation {mean}/{std} differs from the model's {dc}", file=sys.stderr)
    if args.init_checkpoint:
        init_from_checkpoint(model, args.init_checkpoint, class_names, trust_pickle=args.trust_pickle)
    model_args = {"model": s["model"], "num_classes": len(class_names), "head": head,
                  "num_of_groups": s["num_of_groups"], "decoder_embedding": s["decoder_embedding"],
                  "model_kwargs": model_kwargs, "image_size": s["image_size"],
                  "mean": list(mean), "std": list(std), "demo": bool(args.demo)}
    cfg = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                      weight_decay=s["weight_decay"], weight_decay_mode=args.weight_decay_mode,
                      pct_start=args.pct_start, ema_decay=s["ema_decay"], ema_warmup=s["ema_warmup"], amp=args.amp,
                      gamma_neg=args.gamma_neg, gamma_pos=args.gamma_pos, clip=args.clip,
                      workers=s["workers"], seed=args.seed,
                      max_steps_per_epoch=args.max_steps_per_epoch, out_dir=out,
                      progress=not args.no_progress and sys.stderr.isatty(), plot=not args.no_plot)
    trainer = MultiLabelTrainer(model, train_set, val_set, class_names, cfg, model_args,
                                device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{s['model']} + {'MLDecoderFast' if head == 'fast' else 'MLDecoder (reference)'}: "
          f"{n_params / 1e6:.2f}M parameters, {len(class_names)} classes, {len(train_set)} training / "
          f"{len(val_set)} validation images, {trainer.steps_per_epoch} steps per epoch on {trainer.device}")
    if args.resume:
        trainer.resume(args.resume)
    summary = trainer.fit()
    summary["head"] = head
    summary["chance_mAP"] = summary["last"].get("mAP_chance")
    if args.demo and trainer.val_set is not None:
        summary["examples"] = val_set.save_examples(os.path.join(out, "examples"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["trainer"] = trainer
    print(f"best mAP {summary['best_mAP']:.2f} ({summary['best'].get('which')}, epoch "
          f"{summary['best'].get('epoch')}); chance {summary['chance_mAP']:.1f}; training "
          f"{summary['wall_s']:.0f} s ({summary['last'].get('images_per_s', 0):.1f} images/s in the last epoch); "
          f"outputs in {out}")
    if args.demo:
        print(f"try: mldecoder-fast predict --checkpoint {os.path.join(out, 'best.pth')} "
              f"{os.path.join(out, 'examples', '*.png')}")
    return summary


def _compare(results: dict, out: str) -> None:
    """Fast vs reference after ``--head both``: mAP, training time, and per-step timings taken in
    turns on the same batch (the training times alone are at the mercy of the machine's load)."""
    import torch

    from .demo import time_training_steps
    f, r = results["fast"], results["reference"]
    trainer = f["trainer"]
    x, _ = next(iter(torch.utils.data.DataLoader(trainer.val_set, batch_size=trainer.cfg.batch_size)))
    t = time_training_steps({"fast": f["trainer"].model, "reference": r["trainer"].model},
                            x.to(trainer.device), amp_dtype=trainer.amp_dtype)
    print("\nhead        best mAP   last mAP   last EMA   train s   step ms (fwd+bwd)   head ms (fwd+bwd)")
    for name, s in (("fast", f), ("reference", r)):
        print(f"{name:10s} {s['best_mAP']:9.2f} {s['last']['mAP']:10.2f} {s['last']['mAP_ema']:10.2f} "
              f"{s['wall_s']:9.1f} {t[name]['model_ms']:19.1f} {t[name]['head_ms']:19.1f}")
    report = {"best_mAP": {k: v["best_mAP"] for k, v in results.items()},
              "best_mAP_difference": f["best_mAP"] - r["best_mAP"],
              "train_s": {k: v["wall_s"] for k, v in results.items()}, "step_timing_ms": t,
              "step_speedup": t["reference"]["model_ms"] / t["fast"]["model_ms"],
              "head_speedup": t["reference"]["head_ms"] / t["fast"]["head_ms"]}
    print(f"best mAP difference (fast - reference): {report['best_mAP_difference']:+.2f}; "
          f"training step {report['step_speedup']:.2f}x and head {report['head_speedup']:.2f}x faster "
          f"with MLDecoderFast (median of turns on one batch of {x.shape[0]})")
    with open(os.path.join(out, "comparison.json"), "w") as fh:
        json.dump(report, fh, indent=1)
