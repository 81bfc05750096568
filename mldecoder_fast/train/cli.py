"""``mldecoder-fast train RECIPE ...``: the training subcommands.

``register(subparsers)`` adds ``train`` with one sub-subcommand per recipe; each recipe's command
line is ``commands/<recipe>.py`` (its ``register(recipes)`` adds the parser, its ``run(args)``
runs it).
"""
from __future__ import annotations

from .commands import multilabel, singlelabel, zsl

RECIPES = (multilabel, singlelabel, zsl)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a timm backbone with an ML-Decoder head",
                                   description="Train a timm backbone with an ML-Decoder head.")
    recipes = parser.add_subparsers(dest="recipe", metavar="RECIPE")
    parser.set_defaults(func=lambda args: _no_recipe(parser))
    for recipe in RECIPES:
        recipe.register(recipes)


def _no_recipe(parser) -> int:
    parser.print_help()
    return 1
