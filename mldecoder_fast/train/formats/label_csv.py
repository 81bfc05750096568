"""Multi-label CSV files: one row per image, ``path,labels[,split]``, header optional.

    path,labels[,split]
    images/0001.jpg,person;dog
    images/0002.jpg,"['car', 'person']",val

``labels`` is a list of class names separated by ``;`` or ``|``, or a Python-style list (the
official NUS-WIDE ``data.csv``); ``split`` (``train``/``val``) is optional. Relative paths are
relative to ``images_root`` (default: the CSV's folder). An empty label list is an error unless
all-negative images are allowed; so is a class name outside a given class list.
"""
from __future__ import annotations

import ast
import csv
import os

from .common import DataError, Sample, check_image_files, image_path, open_text, short


def _parse_labels(text: str):
    text = text.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, RecursionError):  # not a literal: split it
            value = [t.strip().strip("'\"") for t in text.strip("[]").split(",")]
        return [str(v).strip() for v in value if str(v).strip()]
    sep = ";" if ";" in text else "|"
    return [t.strip() for t in text.split(sep) if t.strip()]


def load_csv(csv_path: str, images_root: str | None = None, class_names=None, split=None,
             allow_empty: bool = False, check_files: bool = True):
    """Samples and class names of a CSV (see the module docstring).

    ``class_names``: fixed class list (e.g. the training set's); otherwise the sorted set of the
    names in the file. ``split``: keep only rows whose split column equals it. ``allow_empty``:
    accept rows with no label (all-negative images) instead of reporting them as errors.
    """
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(csv_path))
    name = os.path.basename(csv_path)
    rows = []
    with open_text(csv_path, "CSV file not found", newline="") as f:
        reader = csv.reader(f)
        try:
            for lineno, row in enumerate(reader, start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                if lineno == 1 and row[0].strip().lower() in ("path", "image", "image_path", "filename", "file"):
                    continue  # header
                if len(row) < 2:
                    raise DataError(f"{csv_path} line {lineno}: expected 'path,labels[,split]', got {short(row)}")
                if row[1].lstrip().startswith("[") and not row[1].rstrip().endswith("]"):
                    # an unquoted Python-style list: its commas split it over several cells
                    end = next((j for j in range(2, len(row)) if row[j].rstrip().endswith("]")), None)
                    if end is None:
                        raise DataError(f"{csv_path} line {lineno}: the label list {row[1]!r}... has no "
                                        "closing ']'")
                    row = [row[0], ",".join(row[1:end + 1])] + row[end + 1:]
                row_split = row[2].strip() if len(row) > 2 else None
                if split is not None:
                    if not row_split:
                        raise DataError(f"{csv_path} line {lineno}: no split column (train or val), "
                                        "which a single CSV for training and validation needs")
                    if row_split != split:
                        continue
                labels = _parse_labels(row[1])
                if not labels and not allow_empty:
                    raise DataError(f"{csv_path} line {lineno}: image {row[0]!r} has an empty label list "
                                    "(pass allow_empty / --allow-empty-labels to train on all-negative images)")
                rows.append((lineno, image_path(row[0], f"{csv_path} line {lineno}"), labels))
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise DataError(f"{csv_path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{csv_path}: no rows" + (f" with split {split!r}" if split else ""))
    if class_names is None:
        class_names = sorted({lab for _, _, labs in rows for lab in labs})
    index = {c: i for i, c in enumerate(class_names)}
    samples = []
    for lineno, path, labels in rows:
        unknown = [lab for lab in labels if lab not in index]
        if unknown:
            raise DataError(f"{csv_path} line {lineno}: unknown class {unknown[0]!r} (not among the "
                            f"{len(class_names)} classes of the training set)")
        samples.append(Sample(os.path.join(root, path), tuple(sorted({index[lab] for lab in labels})),
                              f"{name} line {lineno}"))
    if check_files:
        check_image_files(samples)
    return samples, list(class_names)

