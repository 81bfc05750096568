"""``mldecoder-fast predict --checkpoint CKPT IMAGES...``: the classes each image shows.

For every image: the top classes (at most ``--top-k``) whose sigmoid score is above
``--threshold``, with their scores, as the official ``infer.py`` picks them. The model is rebuilt
from the checkpoint's ``model_args`` (written by ``mldecoder-fast train``); class names come from
its ``class_names`` or ``idx_to_class`` (official files). Checkpoints without ``model_args`` need
``--model`` (and ``--image-size`` etc. when they differ from the defaults). A zero-shot checkpoint
(``mldecoder-fast train zsl``) scores the classes of its class list through their word vectors,
given by ``--word-vectors``.
"""
from __future__ import annotations

import json
import sys

from ..cli.types import float_range, int_range


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classes of images, from a training checkpoint",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="a .pth written by mldecoder-fast train")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--threshold", type=float_range(ge=0, le=1), default=0.75,
                   help="minimum score (the official infer.py's; Asymmetric Loss lifts the scores)")
    p.add_argument("--top-k", type=int_range(1), default=20, help="at most this many classes per image")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                   help="auto: the EMA weights when they validated better, else the model's")
    p.add_argument("--head", choices=["fast", "reference"], default="fast")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int_range(1), default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    add_checkpoint_options(p, "for checkpoints without model_args (e.g. official ML-Decoder files)")
    p.set_defaults(func=run)


def add_checkpoint_options(p, model_group_title: str) -> None:
    """The options of commands that rebuild a model from a checkpoint (``load_predictor``):
    ``--trust-pickle`` and, for checkpoints that do not say which model they hold, the model's."""
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a checkpoint (or word-vector file) that needs full unpickling (it can run "
                        "any code: only for a file from a source you trust); without it such a file is refused")
    p.add_argument("--word-vectors", metavar="PATH",
                   help="zero-shot (ZSL) checkpoints: the classes' word vectors, one 300-d vector per "
                        "class of the checkpoint's class list ([C, 300], or [300, C] as NUS-WIDE's "
                        "wordvec_array.pth; a tensor, .npy or numeric pickle)")
    g = p.add_argument_group(model_group_title)
    g.add_argument("--model", help="timm model name")
    g.add_argument("--image-size", type=int_range(1), help="input side (default: the checkpoint's, else 448)")
    g.add_argument("--num-of-groups", type=int_range(1, also=(-1,)), default=-1)
    g.add_argument("--decoder-embedding", type=int_range(1), default=768)


def checkpoint_overrides(args) -> dict:
    """The model arguments given by ``add_checkpoint_options``'s options (for ``load_predictor``)."""
    model_options = ({"num_of_groups": args.num_of_groups, "decoder_embedding": args.decoder_embedding}
                     if args.model else {})
    return {"model": args.model, "image_size": args.image_size, **model_options}


def set_word_vectors(head, path: str | None, num_classes: int | None, trust_pickle: bool, what: str) -> None:
    """Give a zero-shot head the word vectors in ``path`` (``num_classes`` of them; None: any
    number); a clear error for a zero-shot head without a file or a file for another head."""
    from ..train.checkpoint import CheckpointError
    from ..train.formats.nus_wide import read_word_vectors
    if not head.config.zsl:
        if path is not None:
            raise CheckpointError(f"{what}: --word-vectors is for zero-shot (ZSL) checkpoints; this one "
                                  f"has a head of {head.num_classes} classes")
        return
    if path is None:
        count = "" if num_classes is None else f" of its class list, {num_classes} classes"
        raise CheckpointError(f"{what} is a zero-shot (ZSL) head without word vectors: it scores the "
                              f"classes whose word vectors it is given; pass --word-vectors (one "
                              f"300-d vector per class{count})")
    vectors = read_word_vectors(path, num_classes, trust_pickle, classes_of=f"{what}'s class list")
    head.set_word_vectors(vectors.to(next(head.parameters()).device))


def _ema_validated_better(ckpt: dict) -> bool:
    """Whether a checkpoint's metrics say its EMA weights validated better than the model's (the
    two scores the multi-label and zero-shot recipes record, ``ASLTrainer.checkpoint_metrics``)."""
    from ..train.checkpoint import MULTILABEL_SCORES, ZSL_SCORES
    metrics = ckpt.get("metrics") or {}
    return any(model in metrics and ema in metrics and metrics[ema] > metrics[model]
               for model, ema in (MULTILABEL_SCORES, ZSL_SCORES))


def load_predictor(path: str, head: str = "fast", backend: str = "auto", weights: str = "auto",
                   device=None, overrides=None, trust_pickle: bool = False, ckpt: dict | None = None,
                   word_vectors: str | None = None):
    """(model in eval mode, class names, model_args) from a checkpoint (``trust_pickle``: see
    ``mldecoder_fast.safe_load.load_file``); ``ckpt``: the checkpoint at ``path`` already read by
    ``load_checkpoint``; ``word_vectors``: the file of a zero-shot checkpoint's class vectors."""
    import torch

    from ..train.checkpoint import CheckpointError, check_classes, head_num_classes, load_checkpoint
    from ..train.models import model_from_args, zsl_head
    if ckpt is None:
        ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    names = ckpt.get("class_names")
    if names is None and "idx_to_class" in ckpt:
        idx = ckpt["idx_to_class"]
        names = [idx[k] for k in sorted(idx, key=int)]
    key, n = head_num_classes(ckpt["model"])
    if names is None:
        if n is None:
            raise CheckpointError(f"{path}: no ML-Decoder head and no class names in this checkpoint")
        names = [str(i) for i in range(n)]
    model_args = dict(ckpt.get("model_args") or {})
    for k, v in (overrides or {}).items():
        if v is not None:
            model_args[k] = v
    if "model" not in model_args:
        raise CheckpointError(f"{path}: the checkpoint does not say which backbone it has: pass --model")
    model_args["num_classes"] = len(names)
    model_args.setdefault("image_size", 448)
    if not model_args.get("zsl"):   # a zero-shot head has one output per word vector, not per class
        check_classes(ckpt, names, "its class list")
    state = ckpt["model"]
    if weights == "ema" or (weights == "auto" and "ema" in ckpt and _ema_validated_better(ckpt)):
        if "ema" not in ckpt:
            raise CheckpointError(f"{path}: no EMA weights in this checkpoint")
        state = ckpt["ema"]["module"]
    model = model_from_args(model_args, head=head, backend=backend)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit {model_args['model']} with an "
                              f"ML-Decoder head of {len(names)} classes: {exc}") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    set_word_vectors(zsl_head(model), word_vectors, len(names), trust_pickle, path)
    return model, list(names), model_args


def top_classes(scores, names, threshold: float, top_k: int):
    """[(name, score)] best first: at most ``top_k``, each above ``threshold``."""
    order = sorted(range(len(names)), key=lambda i: -float(scores[i]))[:top_k]
    return [(names[i], float(scores[i])) for i in order if float(scores[i]) > threshold]


def run(args) -> int:
    import torch

    from ..train.checkpoint import CheckpointError
    from ..train.datasets import BadImageError, load_rgb
    from ..train.formats.common import DataError, Sample
    from ..train.transforms import build_transforms
    try:
        model, names, margs = load_predictor(
            args.checkpoint, args.head, args.backend, args.weights, args.device,
            overrides=checkpoint_overrides(args), trust_pickle=args.trust_pickle, word_vectors=args.word_vectors)
    except (CheckpointError, DataError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    transform = build_transforms(int(margs["image_size"]), train=False,
                                 mean=margs.get("mean", (0.0, 0.0, 0.0)), std=margs.get("std", (1.0, 1.0, 1.0)))
    device = next(model.parameters()).device
    failures = 0
    paths = list(args.images)
    for start in range(0, len(paths), args.batch_size):
        batch, ok = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                batch.append(transform(load_rgb(Sample(path, (), path))))
                ok.append(path)
            except BadImageError as exc:
                failures += 1
                print(f"error: {exc}", file=sys.stderr)
        if not batch:
            continue
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.stack(batch).to(device)).float()).cpu()
        for path, s in zip(ok, scores, strict=True):
            found = top_classes(s.tolist(), names, args.threshold, args.top_k)
            if args.json:
                print(json.dumps({"image": path, "classes": [{"class": c, "score": round(v, 4)} for c, v in found]}))
            elif found:
                print(f"{path}: " + ", ".join(f"{c} ({v:.2f})" for c, v in found))
            else:
                best = int(torch.argmax(s))
                print(f"{path}: nothing above {args.threshold:.2f} (best: {names[best]} {float(s[best]):.2f})")
    return 1 if failures else 0
