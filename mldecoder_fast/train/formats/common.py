"""What every data-file reader of the recipes shares: the error they raise, the sample record they
return, and the one text reader they open files with.

Every text parser of the package (COCO json, multi-label CSV, list and class files, the NUS-WIDE
ZSL files) reads its file with ``open_text``/``read_json`` below: any malformed input (bytes that
are not UTF-8, broken JSON or CSV, a value of the wrong JSON type, a duplicate id, an empty image
path) stops the load with a ``DataError`` naming the file, and the line where there is one;
nothing is returned from a file with a bad row. ``tests/test_parsers_fuzz.py`` feeds them random
and mutated files to hold them to that.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

__all__ = ["DataError", "Sample", "open_text", "read_json", "image_path", "check_image_files", "short"]


class DataError(ValueError):
    """A dataset description (json, CSV, list file) that cannot be trained on; the message says where."""


@dataclass(frozen=True)
class Sample:
    path: str
    labels: tuple      # class indices
    where: str         # "instances_val2014.json image id 42" or "train.csv line 7"


def short(value, limit: int = 80) -> str:
    """``repr(value)``, cut at ``limit`` characters (for messages about bad entries)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _first_non_utf8(path: str) -> str:
    """" line N" of the first line of ``path`` that is not UTF-8 ("" if every line is)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f" line {lineno} (byte {exc.start + 1}: {raw[exc.start:exc.start + 1]!r})"
    return ""


@contextlib.contextmanager
def open_text(path: str, not_found: str = "not found", newline=None):
    """``path`` opened as UTF-8 text for a parser. A file that does not exist is a ``DataError``
    "path: {not_found}"; one that cannot be read, or has bytes that are not UTF-8 (raised while the
    ``with`` body reads it), a ``DataError`` naming the file and the line of the first bad byte."""
    try:
        f = open(path, encoding="utf-8", newline=newline)
    except FileNotFoundError:
        raise DataError(f"{path}: {not_found}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            raise DataError(f"{path}{_first_non_utf8(path)}: not UTF-8 text") from None


def read_json(path: str, not_found: str = "not found"):
    """The JSON value in ``path``; malformed JSON is a ``DataError`` with the file and line."""
    with open_text(path, not_found) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, nesting too deep
        raise DataError(f"{path}: not valid JSON for this reader ({type(exc).__name__}: {exc})") from None


def image_path(text, where: str) -> str:
    """An image path of a data file, stripped; ``where`` ("file line N") names the entry."""
    if not isinstance(text, str):
        raise DataError(f"{where}: the image path is {short(text)}, expected a string")
    path = text.strip()
    if not path or "\0" in path:
        raise DataError(f"{where}: image path {text!r} is " + ("empty" if not path else "not a path (NUL byte)"))
    return path


def check_image_files(samples) -> None:
    """Every sample's image file exists, or a ``DataError`` listing the first ten that do not."""
    missing = [s for s in samples if not os.path.isfile(s.path)]
    if missing:
        shown = "\n".join(f"  {s.where}: {s.path}" for s in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} of {len(samples)} image files are missing:\n{shown}{more}")

