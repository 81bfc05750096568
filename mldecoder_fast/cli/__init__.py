"""The ``mldecoder-fast`` command. Each subcommand lives in its own module, imported lazily,
which provides ``register(subparsers)`` adding its parser and setting ``func(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "bench": "mldecoder_fast.benchmark.cli",
    "train": "mldecoder_fast.train.cli",
    "predict": "mldecoder_fast.serving.predict",
    "export": "mldecoder_fast.serving.export",
}


def build_parser(argv=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mldecoder-fast",
                                     description="Fast ML-Decoder head: benchmarks, training, inference.")
    parser.add_argument("--version", action="store_true", help="print the version and backends, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in SUBCOMMANDS.items():
        if wanted is not None and wanted != name and wanted in SUBCOMMANDS:
            continue  # import only the subcommand being run (training pulls in timm, etc.)
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda args, exc=exc, name=name: _unavailable(name, exc))
    return parser


def _unavailable(name, exc) -> int:
    print(f"mldecoder-fast {name} is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__, backends
        print(f"mldecoder-fast {__version__}")
        for name, info in backends().items():
            print(f"  {name:7s} {'available' if info['available'] else 'unavailable'}: {info['detail']}")
        import torch

        from ..head.backends import select_ops
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        print("  backend='auto' runs: " + ", ".join(
            f"{select_ops('auto', torch.device(d), mode == 'train')[0]} on {d} ({mode})"
            for d in devices for mode in ("eval", "train")))
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return int(args.func(args) or 0)
