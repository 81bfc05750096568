"""``mldecoder-fast train multilabel``: the ML-Decoder MS-COCO recipe (docs/training.md) on COCO
json, CSV or the no-download demo, on one process or under torchrun (DDP)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ...cli.types import SEED, float_range, int_range
from ..amp import AMP_CHOICES
from .common import model_description, run_recipe


def register(recipes) -> None:
    from ..multilabel import COCO_DEFAULTS
    p = recipes.add_parser(
        "multilabel", help="multi-label training (the ML-Decoder MS-COCO recipe)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Multi-label training with the ML-Decoder MS-COCO recipe: Asymmetric Loss, "
                    "Adam with decoupled weight decay, OneCycleLR, mixed precision on GPU, model "
                    "EMA, mAP of the model and its EMA after every epoch; under torchrun "
                    "--nproc_per_node=N too (DDP, --batch-size per process). Defaults (None below) "
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
                   help="decoupled (AdamW, the paper recipe) or l2 (Adam + L2, as the official train.py)")
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
    t.add_argument("--log-every", type=int_range(1), default=20,
                   help="steps between loss reductions/log lines")
    t.add_argument("--out", default=None, help="output folder (default runs/multilabel or runs/demo)")
    t.add_argument("--resume", help="continue exactly from a last.pth/best.pth of this run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-plot", action="store_true", help="no curves.png")
    p.set_defaults(func=run)


def _settings(args) -> dict:
    from ..demo import DEMO_DEFAULTS
    from ..multilabel import COCO_DEFAULTS
    s = dict(DEMO_DEFAULTS if args.demo else COCO_DEFAULTS)
    for key in list(s):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    return s


def _datasets(args, s, mean, std):
    """(train_set, val_set, class_names) for the chosen data source."""
    from ..datasets import MultiLabelDataset
    from ..formats.coco import find_coco, load_coco
    from ..formats.label_csv import load_csv
    from ..transforms import build_transforms
    if args.demo:
        from ..synthetic.digits import demo_datasets
        train, val = demo_datasets(s["train_size"], s["val_size"], s["image_size"], mean, std,
                                   seed=args.seed, grid=s["grid"])
        return train, val, train.class_names
    sources = [bool(args.data), bool(args.train_json or args.val_json), bool(args.train_csv or args.val_csv)]
    if sum(sources) != 1:
        raise SystemExit("give the data one way: --data, --train-json/--val-json (+ --train-images/"
                         "--val-images), --train-csv/--val-csv, or --demo")
    kw = dict(image_size=s["image_size"], mean=mean, std=std)
    t_train = build_transforms(train=True, randaugment=not args.no_randaugment, cutout=args.cutout, **kw)
    t_val = build_transforms(train=False, **kw)
    if args.data and os.path.isfile(args.data):
        tr, names = load_csv(args.data, args.images_root, split="train", allow_empty=args.allow_empty_labels)
        va, _ = load_csv(args.data, args.images_root, names, split="val", allow_empty=True)
    elif args.data or args.train_json:
        if args.data:
            (ti, tj), (vi, vj) = find_coco(args.data)
        else:
            if not (args.train_json and args.val_json and args.train_images and args.val_images):
                raise SystemExit("--train-json needs --train-images, --val-json and --val-images")
            ti, tj, vi, vj = args.train_images, args.train_json, args.val_images, args.val_json
        tr, names = load_coco(ti, tj)
        va, _ = load_coco(vi, vj, class_names=names)
    else:
        if not (args.train_csv and args.val_csv):
            raise SystemExit("--train-csv needs --val-csv")
        tr, names = load_csv(args.train_csv, args.images_root, allow_empty=args.allow_empty_labels)
        va, _ = load_csv(args.val_csv, args.images_root, names, allow_empty=args.allow_empty_labels)
    return MultiLabelDataset(tr, names, t_train), MultiLabelDataset(va, names, t_val), names


def run(args) -> int:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return run_recipe(args, _run)


def _run(args, info) -> int:
    from ..demo import compare_heads
    heads = ["fast", "reference"] if args.head == "both" else [args.head]
    base = args.out or ("runs/demo" if args.demo else "runs/multilabel")
    results = {head: train_once(args, head, os.path.join(base, head) if len(heads) > 1 else base, info)
               for head in heads}
    if len(heads) > 1 and info.is_main:
        compare_heads(results, base)
    return 0


def train_once(args, head: str, out: str, info) -> dict:
    """One run of the recipe with ``head``; returns its summary (with the trainer under "trainer")."""
    try:
        import timm
        from timm.data import resolve_data_config, resolve_model_data_config
    except ImportError:
        raise SystemExit("training needs timm: pip install 'mldecoder-fast[timm]'") from None
    from ..models import build_model, init_from_checkpoint, parse_model_kwargs
    from ..multilabel import MultiLabelTrainer, TrainConfig
    from ..seeding import rank_seed, seed_everything
    s = _settings(args)
    seed_everything(args.seed)
    model_kwargs = parse_model_kwargs(args.model_arg)
    if not timm.is_model(s["model"]):
        raise SystemExit(f"unknown timm model {s['model']!r} (see timm.list_models())")
    # The class list decides the head's size, so read the data first, normalised as the backbone's
    # pretrained configuration says (which needs no model).
    probe = timm.get_pretrained_cfg(s["model"])
    dc = resolve_data_config(pretrained_cfg=probe.to_dict() if probe is not None else None)
    mean, std = tuple(dc["mean"]), tuple(dc["std"])
    train_set, val_set, class_names = _datasets(args, s, mean, std)
    seed_everything(args.seed)
    model = build_model(s["model"], len(class_names), head=head, num_of_groups=s["num_of_groups"],
                        decoder_embedding=s["decoder_embedding"], pretrained=args.pretrained,
                        model_kwargs=model_kwargs, backend=args.backend)
    dc = resolve_model_data_config(model)
    if (tuple(dc["mean"]), tuple(dc["std"])) != (mean, std):
        print(f"note: normalisation {mean}/{std} differs from the model's {dc}", file=sys.stderr)
    if args.init_checkpoint:
        init_from_checkpoint(model, args.init_checkpoint, class_names, trust_pickle=args.trust_pickle)
    if info.distributed:  # one process keeps the generators as building the model left them
        seed_everything(rank_seed(args.seed, info.rank))
    model_args = {"model": s["model"], "num_classes": len(class_names), "head": head,
                  "num_of_groups": s["num_of_groups"], "decoder_embedding": s["decoder_embedding"],
                  "model_kwargs": model_kwargs, "image_size": s["image_size"],
                  "mean": list(mean), "std": list(std), "demo": bool(args.demo)}
    cfg = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                      weight_decay=s["weight_decay"], weight_decay_mode=args.weight_decay_mode,
                      pct_start=args.pct_start, ema_decay=s["ema_decay"], ema_warmup=s["ema_warmup"],
                      amp=args.amp, gamma_neg=args.gamma_neg, gamma_pos=args.gamma_pos, clip=args.clip,
                      workers=s["workers"], seed=args.seed, log_every=args.log_every,
                      max_steps_per_epoch=args.max_steps_per_epoch, out_dir=out,
                      progress=not args.no_progress and sys.stderr.isatty(), plot=not args.no_plot)
    trainer = MultiLabelTrainer(model, train_set, val_set, class_names, cfg, model_args, info=info)
    n_params = sum(p.numel() for p in model.parameters())
    trainer.log(f"{model_description(s['model'], head)}: {n_params / 1e6:.2f}M parameters, "
                f"{len(class_names)} classes, {len(train_set)} training / {len(val_set)} validation "
                f"images, {trainer.steps_per_epoch} steps per epoch on {trainer.device}"
                + (f" x {info.world_size} processes" if info.distributed else ""))
    if args.resume:
        trainer.resume(args.resume)
    summary = trainer.fit()
    if args.demo and info.is_main:
        summary["examples"] = val_set.save_examples(os.path.join(out, "examples"))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    trainer.log(f"best mAP {summary['best_mAP']:.2f} ({summary['best'].get('which')}, epoch "
                f"{summary['best'].get('epoch')}); chance {summary['chance_mAP']:.1f}; training "
                f"{summary['wall_s']:.0f} s ({summary['last'].get('images_per_s', 0):.1f} images/s in "
                f"the last epoch); outputs in {out}")
    if args.demo:
        trainer.log(f"try: mldecoder-fast predict --checkpoint {os.path.join(out, 'best.pth')} "
                    f"{os.path.join(out, 'examples', '*.png')}")
    return {**summary, "trainer": trainer}
