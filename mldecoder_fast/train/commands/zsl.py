"""``mldecoder-fast train zsl``: the NUS-WIDE zero-shot recipe (docs/large_scale.md) on the official
files, on one process or under torchrun (DDP); ``--make-miniature DIR`` writes a miniature data
set in those formats and exits."""
from __future__ import annotations

import argparse
import sys

from ...cli.types import SEED, float_range, int_range
from ..amp import AMP_CHOICES
from ..formats.nus_wide import CSV_NAME, SPLIT_NAME, WORDVEC_NAME
from ..zsl import ZSL_DEFAULTS
from .common import load_on_every_rank, model_description, run_recipe


def register(recipes) -> None:
    p = recipes.add_parser(
        "zsl", help="zero-shot training with word queries (the NUS-WIDE recipe)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Zero-shot multi-label training on the official NUS-WIDE ZSL files (data.csv, "
                    "benchmark_81_v0.json, wordvec_array.pth): seen word vectors as queries in "
                    "training, unseen (ZSL) and all (GZSL) in evaluation, with query augmentation. "
                    "Runs under torchrun too.")
    d = p.add_argument_group("data")
    d.add_argument("--data", help=f"folder with {CSV_NAME}, {SPLIT_NAME}, {WORDVEC_NAME}")
    d.add_argument("--images-root", help="root of data.csv's image paths (default: --data)")
    d.add_argument("--make-miniature", metavar="DIR", help="write a miniature dataset in these formats to DIR and exit")
    d.add_argument("--no-file-check", action="store_true", help="do not check every image exists first")
    d.add_argument("--trust-pickle", action="store_true",
                   help="read a word-vector file that needs full unpickling (it can run any code: "
                        "only for a file from a source you trust); without it such a file is refused")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=ZSL_DEFAULTS["model"])
    m.add_argument("--pretrained", action="store_true")
    m.add_argument("--head", choices=["fast", "reference"], default="fast")
    m.add_argument("--backend", default="auto")
    m.add_argument("--decoder-embedding", type=int_range(1), default=ZSL_DEFAULTS["decoder_embedding"])
    t = p.add_argument_group("recipe")
    t.add_argument("--image-size", type=int_range(1), default=ZSL_DEFAULTS["image_size"])
    t.add_argument("--epochs", type=int_range(1), default=ZSL_DEFAULTS["epochs"])
    t.add_argument("--batch-size", type=int_range(1), default=ZSL_DEFAULTS["batch_size"], help="per process")
    t.add_argument("--lr", type=float_range(gt=0), default=ZSL_DEFAULTS["lr"])
    t.add_argument("--weight-decay", type=float_range(ge=0), default=ZSL_DEFAULTS["weight_decay"])
    t.add_argument("--weight-decay-mode", choices=["l2", "decoupled"], default=ZSL_DEFAULTS["weight_decay_mode"])
    t.add_argument("--pct-start", type=float_range(ge=0, lt=1), default=ZSL_DEFAULTS["pct_start"])
    t.add_argument("--ema-decay", type=float_range(ge=0, le=1), default=ZSL_DEFAULTS["ema_decay"])
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    t.add_argument("--no-randaugment", action="store_true")
    t.add_argument("--cutout", type=float_range(ge=0, le=1), default=0.5)
    q = p.add_argument_group("query augmentation (training only)")
    q.add_argument("--query-noise", type=float_range(ge=0), default=ZSL_DEFAULTS["query_noise"],
                   help="std of the Gaussian noise added to the word queries, relative to each "
                        "vector's RMS entry (0: off)")
    q.add_argument("--extra-queries", type=int_range(0, also=(-1,)), default=ZSL_DEFAULTS["extra_queries"],
                   help="random extra queries per step, trained as negatives (-1: 10%% of the seen "
                        "classes; 0: off)")
    q.add_argument("--no-query-augment", action="store_true", help="both off")
    e = p.add_argument_group("evaluation")
    e.add_argument("--top-k", type=int_range(1), nargs="+", default=[3, 5])
    e.add_argument("--no-gzsl", action="store_true", help="ZSL metrics only")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int_range(0), default=ZSL_DEFAULTS["workers"])
    r.add_argument("--seed", type=SEED, default=0)
    r.add_argument("--device", default=None)
    r.add_argument("--max-steps-per-epoch", type=int_range(0), default=0)
    r.add_argument("--log-every", type=int_range(1), default=20,
                   help="steps between loss reductions/log lines")
    r.add_argument("--out", default="runs/zsl")
    r.add_argument("--resume", help="continue from a last.pth of this run")
    r.add_argument("--stop-after-epochs", type=int_range(0), default=0,
                   help="stop after N epochs of this invocation (the schedule still spans --epochs)")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.make_miniature:
        from ..synthetic.nus_miniature import make_miniature
        desc = make_miniature(args.make_miniature)
        print(f"wrote a miniature NUS-WIDE ZSL dataset: {desc}")
        return 0
    if not args.data:
        print("error: --data DIR (or --make-miniature DIR)", file=sys.stderr)
        return 2
    return run_recipe(args, _run)


def _run(args, info) -> int:
    from ..datasets import MultiLabelDataset
    from ..formats.nus_wide import load_zsl_data
    from ..models import build_zsl_model
    from ..seeding import rank_seed, seed_everything
    from ..transforms import build_transforms
    from ..zsl import ZSLConfig, ZSLTrainer
    check = info.is_main and not args.no_file_check
    data = load_on_every_rank(lambda: load_zsl_data(args.data, args.images_root, check_files=check,
                                                    trust_pickle=args.trust_pickle), info)
    seed_everything(args.seed)
    model = build_zsl_model(args.model, args.head, args.decoder_embedding, args.pretrained,
                            backend=args.backend)
    t_train = build_transforms(args.image_size, train=True, randaugment=not args.no_randaugment,
                               cutout=args.cutout)
    t_val = build_transforms(args.image_size, train=False)
    train_set = MultiLabelDataset(data.train, data.class_names, t_train)
    val_set = MultiLabelDataset(data.val, data.class_names, t_val)
    cfg = ZSLConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, weight_decay_mode=args.weight_decay_mode,
                    pct_start=args.pct_start, ema_decay=args.ema_decay,
                    query_noise=0.0 if args.no_query_augment else args.query_noise,
                    extra_queries=0 if args.no_query_augment else args.extra_queries,
                    top_k=tuple(args.top_k), gzsl=not args.no_gzsl, amp=args.amp, workers=args.workers,
                    seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch,
                    log_every=args.log_every, out_dir=args.out,
                    progress=not args.no_progress and sys.stderr.isatty())
    model_args = {"model": args.model, "zsl": 1, "head": args.head, "decoder_embedding": args.decoder_embedding,
                  "image_size": args.image_size, "num_classes": len(data.class_names), "recipe": "zsl",
                  "seen": [data.class_names[i] for i in data.seen],
                  "unseen": [data.class_names[i] for i in data.unseen]}
    seed_everything(rank_seed(args.seed, info.rank))
    trainer = ZSLTrainer(model, data, train_set, val_set, cfg, model_args, info)
    trainer.log(f"{model_description(args.model, args.head)} (ZSL): {len(data.seen)} seen / "
                f"{len(data.unseen)} unseen classes, {len(train_set)} training / {len(val_set)} "
                f"validation images, {trainer.steps_per_epoch} steps per epoch; query noise "
                f"{trainer.augment.noise}, {trainer.augment.extra} extra queries")
    if args.resume:
        trainer.resume(args.resume)
    s = trainer.fit(args.stop_after_epochs or None)
    trainer.log(f"best ZSL mAP {s['best']['mAP']:.2f} ({s['best'].get('which')}, epoch "
                f"{s['best'].get('epoch')}); outputs in {cfg.out_dir}")
    return 0
