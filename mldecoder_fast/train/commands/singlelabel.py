"""``mldecoder-fast train singlelabel``: the ImageNet A2 recipe for any class count (docs/large_scale.md),
on ImageFolder or list files, on one process or under torchrun (DDP).

Outputs in ``--out``: ``log.csv`` (one row per epoch), ``log.json`` (configuration, epochs, every
step's loss and learning rate), ``summary.json``, ``last.pth`` (every epoch, and every
``--save-every`` steps) and ``best.pth``. The log reports global images/s and peak memory (CUDA
allocated memory on GPU; the process's peak resident set size on CPU), the max over ranks.

Resume (``--resume last.pth``) continues exactly where the checkpoint was written, mid-epoch
included. On a different number of processes the per-process batch is chosen to keep the global
batch (unless ``--batch-size`` is given), the data order continues exactly, and the ranks'
generators are reseeded (dropout and mixup draws then differ from the uninterrupted run).
"""
from __future__ import annotations

import argparse
import os
import sys

from ...cli.types import SEED, float_range, int_range
from ..amp import AMP_CHOICES
from ..singlelabel import A2_DEFAULTS
from .common import load_on_every_rank, model_description, run_recipe


def register(recipes) -> None:
    p = recipes.add_parser(
        "singlelabel", help="single-label training (the ImageNet A2 recipe, any class count, torchrun)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Single-label training of a timm backbone with an ML-Decoder head: the "
                    "ImageNet A2 recipe for any class count (ImageNet-1K, ImageNet-21K), on one "
                    "process or under torchrun --nproc_per_node=N (DDP: nccl on GPU, gloo on CPU). "
                    "--batch-size is per process.")
    d = p.add_argument_group("data (--data, or --train-list with --val-list)")
    d.add_argument("--data", help="ImageFolder root with train/<class>/ and val/<class>/")
    d.add_argument("--train-list", help="list file of 'path class_index' lines for training")
    d.add_argument("--val-list", help="list file for validation")
    d.add_argument("--images-root", help="root of the list files' relative paths (default: each list's folder)")
    d.add_argument("--num-classes", type=int_range(1), help="class count of list files")
    d.add_argument("--classes", help="class names, one per line (gives the class count of list files)")
    d.add_argument("--no-file-check", action="store_true",
                   help="do not check that every image exists before training (ImageNet-21K: saves minutes)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=A2_DEFAULTS["model"], help="timm model name")
    m.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument (JSON value)")
    m.add_argument("--head", choices=["fast", "reference"], default="fast",
                   help="MLDecoderFast or the reference MLDecoder")
    m.add_argument("--backend", default="auto", help="MLDecoderFast backend")
    m.add_argument("--num-of-groups", type=int_range(1, also=(-1,)), default=-1, help="queries K (-1: 100)")
    m.add_argument("--decoder-embedding", type=int_range(1), default=768)
    m.add_argument("--drop-path", type=float_range(ge=0, lt=1), default=A2_DEFAULTS["drop_path"],
                   help="backbone drop-path rate (0: not passed to the model)")
    t = p.add_argument_group("recipe")
    t.add_argument("--epochs", type=int_range(1), default=A2_DEFAULTS["epochs"])
    t.add_argument("--batch-size", type=int_range(1), default=None,
                   help=f"per process (default {A2_DEFAULTS['batch_size']}; on --resume: the "
                        "checkpoint's global batch / processes)")
    t.add_argument("--lr", type=float_range(gt=0), default=A2_DEFAULTS["lr"],
                   help="peak learning rate (not scaled by batch)")
    t.add_argument("--opt", default=A2_DEFAULTS["opt"], help="timm optimizer: lamb, adamw, ...")
    t.add_argument("--weight-decay", type=float_range(ge=0), default=A2_DEFAULTS["weight_decay"])
    t.add_argument("--warmup-epochs", type=float_range(ge=0), default=A2_DEFAULTS["warmup_epochs"])
    t.add_argument("--warmup-lr", type=float_range(ge=0), default=A2_DEFAULTS["warmup_lr"])
    t.add_argument("--min-lr", type=float_range(ge=0), default=A2_DEFAULTS["min_lr"])
    t.add_argument("--loss", choices=["bce", "ce"], default=A2_DEFAULTS["loss"],
                   help="binary cross-entropy with target threshold, or softmax cross-entropy")
    t.add_argument("--bce-target-thresh", type=float_range(le=1), default=A2_DEFAULTS["bce_target_thresh"],
                   help="BCE targets above it become 1, the rest 0 (negative: off)")
    t.add_argument("--smoothing", type=float_range(ge=0, lt=1), default=A2_DEFAULTS["smoothing"])
    t.add_argument("--mixup", type=float_range(ge=0), default=A2_DEFAULTS["mixup"], help="mixup alpha (0: off)")
    t.add_argument("--cutmix", type=float_range(ge=0), default=A2_DEFAULTS["cutmix"], help="cutmix alpha (0: off)")
    t.add_argument("--aa", default=A2_DEFAULTS["aa"], help="timm RandAugment policy ('none': off)")
    t.add_argument("--aug-repeats", type=int_range(1), default=A2_DEFAULTS["aug_repeats"],
                   help="repeated augmentation (timm RepeatAugSampler); 1: off")
    t.add_argument("--image-size", type=int_range(1), default=A2_DEFAULTS["image_size"])
    t.add_argument("--interpolation", default=A2_DEFAULTS["interpolation"])
    t.add_argument("--crop-pct", type=float_range(gt=0), default=A2_DEFAULTS["crop_pct"], help="validation crop")
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="auto: fp16 autocast + GradScaler on CUDA, off on CPU")
    t.add_argument("--clip-grad", type=float_range(ge=0), default=0.0,
                   help="max gradient norm (0: off; LAMB clips at 1 itself)")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int_range(0), default=A2_DEFAULTS["workers"],
                   help="data-loader workers per process")
    r.add_argument("--seed", type=SEED, default=0)
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available); "
                   "under torchrun each process takes GPU LOCAL_RANK")
    r.add_argument("--val-batch-size", type=int_range(0), default=0,
                   help="0: --batch-size")
    r.add_argument("--val-every", type=int_range(1), default=1, help="validate every N epochs")
    r.add_argument("--max-steps", type=int_range(0), default=0,
                   help="stop after N optimizer steps in all, schedule unchanged (0: full schedule)")
    r.add_argument("--save-every", type=int_range(0), default=0, help="also checkpoint every N steps")
    r.add_argument("--log-every", type=int_range(1), default=20, help="steps between loss reductions/log lines")
    r.add_argument("--out", default="runs/singlelabel", help="output folder")
    r.add_argument("--resume", help="continue exactly from a last.pth of this run")
    r.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=run)


def _model_kwargs(args) -> dict:
    from ..models import parse_model_kwargs
    out = parse_model_kwargs(args.model_arg)
    if args.drop_path and "drop_path_rate" not in out:
        out["drop_path_rate"] = args.drop_path
    return out


def load_tables(args, check_files: bool):
    """(train SampleTable, val SampleTable or None, class names) from the arguments."""
    from ..formats.common import DataError
    from ..formats.image_lists import read_class_names, read_list_file, scan_image_folder
    if bool(args.data) == bool(args.train_list):
        raise DataError("give the data one way: --data DIR (ImageFolder) or --train-list FILE "
                        "--val-list FILE (with --num-classes N or --classes FILE)")
    if args.data:
        train, names = scan_image_folder(os.path.join(args.data, "train"))
        val_dir = os.path.join(args.data, "val")
        val = scan_image_folder(val_dir, names)[0] if os.path.isdir(val_dir) else None
    else:
        if args.classes:
            names = read_class_names(args.classes)
            if args.num_classes is not None and args.num_classes != len(names):
                raise DataError(f"--num-classes {args.num_classes} but {args.classes} lists "
                                f"{len(names)} classes")
        elif args.num_classes is not None:
            names = [str(i) for i in range(args.num_classes)]
        else:
            raise DataError("a list file needs the class count: --num-classes N or --classes FILE")
        train = read_list_file(args.train_list, len(names), args.images_root)
        val = read_list_file(args.val_list, len(names), args.images_root) if args.val_list else None
    if check_files:
        train.check_files()
        if val is not None:
            val.check_files()
    return train, val, names


def run(args) -> int:
    return run_recipe(args, _run)


def _run(args, info) -> int:
    from timm.data import resolve_model_data_config

    from ..checkpoint import CheckpointError, load_checkpoint
    from ..datasets import SingleLabelDataset
    from ..models import build_model
    from ..seeding import rank_seed, seed_everything
    from ..singlelabel import SingleLabelConfig, SingleLabelTrainer
    from ..transforms import build_imagenet_transforms
    check = info.is_main and not args.no_file_check
    train_table, val_table, names = load_on_every_rank(lambda: load_tables(args, check_files=check), info)
    batch = args.batch_size
    if batch is None:
        batch = A2_DEFAULTS["batch_size"]
        if args.resume:
            run = (load_checkpoint(args.resume).get("history") or {}).get("run") or {}
            if "global_batch" in run:
                if run["global_batch"] % info.world_size:
                    raise CheckpointError(f"{args.resume}: its global batch {run['global_batch']} does "
                                          f"not split over {info.world_size} processes: pass --batch-size")
                batch = run["global_batch"] // info.world_size
    cfg = SingleLabelConfig(
        epochs=args.epochs, batch_size=batch, lr=args.lr, opt=args.opt, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr, loss=args.loss,
        bce_target_thresh=args.bce_target_thresh if args.bce_target_thresh >= 0 else None,
        smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, aa=args.aa,
        aug_repeats=args.aug_repeats, image_size=args.image_size, interpolation=args.interpolation,
        crop_pct=args.crop_pct, amp=args.amp, clip_grad=args.clip_grad, workers=args.workers,
        seed=args.seed, val_batch_size=args.val_batch_size, val_every=args.val_every,
        max_steps=args.max_steps, save_every=args.save_every, log_every=args.log_every,
        out_dir=args.out, progress=not args.no_progress and sys.stderr.isatty())

    seed_everything(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model_kwargs = _model_kwargs(args)
    model = build_model(args.model, len(names), head=args.head, num_of_groups=args.num_of_groups,
                        decoder_embedding=args.decoder_embedding, pretrained=args.pretrained,
                        model_kwargs=model_kwargs, backend=args.backend)
    dc = resolve_model_data_config(model)
    t_train, t_val = build_imagenet_transforms(cfg.image_size, cfg.aa, cfg.interpolation, cfg.crop_pct,
                                               dc["mean"], dc["std"])
    train_set = SingleLabelDataset(train_table, names, t_train)
    val_set = SingleLabelDataset(val_table, names, t_val) if val_table is not None else None
    model_args = {"model": args.model, "num_classes": len(names), "head": args.head,
                  "num_of_groups": args.num_of_groups, "decoder_embedding": args.decoder_embedding,
                  "model_kwargs": model_kwargs, "image_size": cfg.image_size,
                  "mean": list(dc["mean"]), "std": list(dc["std"]), "recipe": "singlelabel"}
    seed_everything(rank_seed(args.seed, info.rank))
    trainer = SingleLabelTrainer(model, train_set, val_set, names, cfg, model_args, info)
    n_params = sum(p.numel() for p in model.parameters())
    trainer.log(f"{model_description(args.model, args.head)}: "
                f"{n_params / 1e6:.2f}M parameters, {len(names)} classes, {len(train_set)} training / "
                f"{len(val_set) if val_set is not None else 0} validation images; {info.world_size} "
                f"process(es) on {info.device} ({info.backend or 'no process group'}), batch "
                f"{cfg.batch_size} per process = {trainer.global_batch} global, "
                f"{trainer.steps_per_epoch} steps per epoch")
    if args.resume:
        trainer.resume(args.resume)
    s = trainer.fit()
    trainer.log(f"done ({args.head} head" + (f", {s['head_backend']} backend" if s["head_backend"] else "")
                + f"): {s['steps']} steps, loss {s['loss_first']:.5g} -> {s['loss_last']:.5g} (means "
                f"of the first/last {s['loss_window']} steps), {s['images_per_s'] or 0:.1f} img/s, "
                f"peak memory {s['peak_memory_mb']:.0f} MiB per process; outputs in {cfg.out_dir}")
    return 0
