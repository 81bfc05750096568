"""argparse ``type=`` callables for the numeric options of every command line.

Each numeric option declares its valid range here, so that a value outside it (or a word that is
not a number) is refused by the parser, with the range in the message, before anything runs::

    mldecoder-fast bench: error: argument --batch: expected comma-separated integers >= 1, got '-3'

``tests/test_cli_ranges.py`` walks every parser and fails on a numeric option without a range.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["NumberType", "int_range", "float_range", "int_list", "SEED"]


class NumberType:
    """Parse an int or a finite float (or a ``separator``-separated list of them) and check that
    it lies within the bounds (``ge``/``gt`` below, ``le``/``lt`` above; None: unbounded), or is
    one of the ``also`` values (sentinels such as -1 for "the default")."""

    def __init__(self, kind: type, *, ge=None, gt=None, le=None, lt=None, also=(), separator=None):
        if kind not in (int, float):
            raise TypeError(f"kind must be int or float, got {kind!r}")
        if (ge is not None and gt is not None) or (le is not None and lt is not None):
            raise ValueError("give at most one lower bound (ge or gt) and one upper bound (le or lt)")
        self.kind, self.ge, self.gt, self.le, self.lt = kind, ge, gt, le, lt
        self.also, self.separator = tuple(also), separator

    def contains(self, value) -> bool:
        if value in self.also:
            return True
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    @property
    def expected(self) -> str:
        """What a valid value looks like, e.g. "an integer >= 1" or "a number in [0, 1)"."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            bounds = f" in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"
        elif low is not None:
            bounds = f" {'>=' if self.ge is not None else '>'} {low}"
        elif high is not None:
            bounds = f" {'<=' if self.le is not None else '<'} {high}"
        else:
            bounds = ""
        if self.separator is not None:
            noun = "integers" if self.kind is int else "numbers"
            what = f"{'comma' if self.separator == ',' else repr(self.separator)}-separated {noun}{bounds}"
        else:
            what = f"{'an integer' if self.kind is int else 'a number'}{bounds}"
        if self.also:
            what += ", or " + " or ".join(map(str, self.also))
        return what

    def _one(self, text: str):
        value = self.kind(text)  # ValueError for a word that is not a number of this kind
        if (self.kind is float and not math.isfinite(value)) or not self.contains(value):
            raise ValueError(text)
        return value

    def __call__(self, text: str):
        try:
            if self.separator is None:
                return self._one(text)
            values = [self._one(t) for t in text.split(self.separator) if t.strip()]
            if not values:
                raise ValueError(text)
            return values
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None

    def __repr__(self) -> str:
        return f"NumberType({self.expected})"


def int_range(ge=None, le=None, *, also=()) -> NumberType:
    return NumberType(int, ge=ge, le=le, also=also)


def float_range(*, ge=None, gt=None, le=None, lt=None) -> NumberType:
    return NumberType(float, ge=ge, gt=gt, le=le, lt=lt)


def int_list(ge=None, le=None, separator: str = ",") -> NumberType:
    return NumberType(int, ge=ge, le=le, separator=separator)


# a seed that torch, numpy and random all accept
SEED = int_range(0, 2**32 - 1)
