"""Every numeric command-line option declares its valid range, and the parser refuses values just
past each bound, and words that are not numbers, with exit status 2 and the range in the message.

The options are found by walking the parsers (``mldecoder-fast`` with all its subcommands at any
depth, and the ImageNet-21K generator), so a new option without a range fails here."""
import argparse
import math

import pytest

from mldecoder_fast import cli
from mldecoder_fast.cli.types import NumberType, float_range, int_list, int_range
from mldecoder_fast.train import imagenet21k

ROOTS = {"mldecoder-fast": cli.build_parser, "imagenet21k": imagenet21k.build_parser}


def walk(prefix, parser, found):
    found.append((prefix, parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                walk(prefix + [name], sub, found)
    return found


def all_parsers():
    """(root name, argv prefix, parser) of every parser and subparser."""
    return [(root, prefix, parser) for root, build in ROOTS.items() for prefix, parser in walk([], build(), [])]


def options():
    """(root, prefix, parser, action) of every option and positional (not help, not subparsers)."""
    return [(root, prefix, parser, a) for root, prefix, parser in all_parsers() for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def numeric_options():
    return [o for o in options() if isinstance(o[3].type, NumberType)]


def _id(option):
    root, prefix, _, action = option
    return " ".join([root, *prefix, action.option_strings[0] if action.option_strings else action.dest])


def test_the_walk_finds_every_subcommand():
    commands = {" ".join(prefix) for root, prefix, _ in all_parsers() if root == "mldecoder-fast"}
    assert {"bench", "predict", "train", "train multilabel", "train singlelabel", "train zsl"} <= commands
    unavailable = [f"{' '.join(prefix)} {choice.dest}: {choice.help}" for _, prefix, p in all_parsers()
                   for a in p._actions if isinstance(a, argparse._SubParsersAction)
                   for choice in a._choices_actions if (choice.help or "").startswith("(unavailable")]
    assert not unavailable, f"subcommands that failed to import (their options cannot be checked): {unavailable}"
    assert len(numeric_options()) > 60


@pytest.mark.parametrize("option", options(), ids=_id)
def test_every_numeric_option_declares_a_range(option):
    *_, action = option
    assert action.type is None or action.type is str or isinstance(action.type, NumberType), (
        f"{_id(option)} has type={action.type!r}: a numeric option needs a range from "
        "mldecoder_fast.cli.types (int_range, float_range, int_list); if this type is not numeric, "
        "add it to this test's allowed types")
    default = action.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        assert isinstance(action.type, NumberType), f"{_id(option)} has the numeric default {default!r} but no range"
    if isinstance(action.type, NumberType) and default is not None:
        values = default if isinstance(default, list) else [default]
        assert all(action.type.contains(v) for v in values), (
            f"{_id(option)}: the default {default!r} is outside its own range ({action.type.expected})")


def filler(parser):
    """Arguments that satisfy ``parser``'s required options and positionals."""
    args = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.nargs in ("?", "*", 0):
            continue
        if not a.option_strings:
            args.append("x")
        elif a.required:
            args += [a.option_strings[0], "x"]
    return args


def parse(option, text, capsys):
    """Parse ``--opt=text`` with the root parser; (namespace, None) or (None, stderr)."""
    root, prefix, parser, action = option
    argv = prefix + [f"{action.option_strings[0]}={text}"] + filler(parser)
    try:
        return ROOTS[root]().parse_args(argv), None
    except SystemExit as exc:
        assert exc.code == 2, f"{argv}: exit status {exc.code}, expected 2"
        return None, capsys.readouterr().err


def boundary_values(t: NumberType):
    """(refused, accepted) values around each bound and sentinel of ``t``."""
    refused, accepted = [], list(t.also)
    step = (lambda v, d: v + d) if t.kind is int else (lambda v, d: math.nextafter(v, d * math.inf))
    if t.ge is not None:
        refused.append(step(t.ge, -1)), accepted.append(t.ge)
    if t.gt is not None:
        refused.append(t.gt), accepted.append(step(t.gt, +1))
    if t.le is not None:
        refused.append(step(t.le, +1)), accepted.append(t.le)
    if t.lt is not None:
        refused.append(t.lt), accepted.append(step(t.lt, -1))
    refused += [step(v, d) for v in t.also for d in (-1, +1)]
    return [v for v in refused if not t.contains(v)], [t.kind(v) for v in accepted]


@pytest.mark.parametrize("option", numeric_options(), ids=_id)
def test_values_past_each_bound_are_refused_with_the_range(option, capsys):
    *_, action = option
    t = action.type
    refused, accepted = boundary_values(t)
    assert refused, f"{_id(option)} declares no bound ({t.expected})"
    words = ["abc", "", "1x"] + (["1.5"] if t.kind is int else ["nan", "inf", "-inf"])
    ok = repr(accepted[0])
    lists = [f"{ok},{refused[0]!r}", ","] if t.separator else []
    for text in [repr(v) for v in refused] + words + lists:
        ns, err = parse(option, text, capsys)
        assert ns is None, f"{_id(option)} accepted {text!r}, outside {t.expected}"
        assert f"argument {'/'.join(action.option_strings)}: expected {t.expected}, got {text!r}" in err, err
    for value in accepted:
        ns, err = parse(option, repr(value), capsys)
        assert err is None, f"{_id(option)} refused {value!r}, inside {t.expected}: {err}"
        got = getattr(ns, action.dest)
        want = [value] if t.separator or action.nargs == "+" else value
        assert got == want and type(got) is type(want), f"{_id(option)}: {value!r} parsed as {got!r}"


def test_bench_negative_batch_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--batch", "-3"])
    assert exc.value.code == 2
    assert "argument --batch: expected comma-separated integers >= 1, got '-3'" in capsys.readouterr().err


def test_range_descriptions():
    assert int_range(1).expected == "an integer >= 1"
    assert int_range(0, 2**32 - 1).expected == "an integer in [0, 4294967295]"
    assert int_range(1, also=(-1,)).expected == "an integer >= 1, or -1"
    assert float_range(gt=0).expected == "a number > 0"
    assert float_range(ge=0, lt=1).expected == "a number in [0, 1)"
    assert float_range(gt=0, le=1).expected == "a number in (0, 1]"
    assert int_list(1).expected == "comma-separated integers >= 1"
    assert int_list(1)("8, 16,") == [8, 16]
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer >= 1, got '1e999'"):
        int_range(1)("1e999")
    assert int_range(1)("9" * 50) == int("9" * 50)  # no float conversion on the way
    with pytest.raises(ValueError, match="at most one lower bound"):
        float_range(ge=0, gt=0)
