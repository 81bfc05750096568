"""The NUS-WIDE zero-shot files, in the formats the official ``train_zsl_nus.py`` reads.

- ``data.csv``: a header row, then ``image path, label list, split`` per image; the label list is
  written like a Python list (``['airport', 'sky']``; quotes optional), split is ``train`` or
  ``val``. The classes are the sorted set of every label in the file (both splits), which fixes
  the column order of the word vectors.
- ``benchmark_81_v0.json``: ``{"train class": [...], "test class": [...]}``, the seen (925) and
  unseen (81) class names; without ``train class`` every class that is not a test class is seen.
- ``wordvec_array.pth``: a tensor [300, C] (one 300-d word vector per column, columns in the
  sorted class order of data.csv; [C, 300] is accepted too), or the official file's pickled numpy
  array; ``wordvec_array.npy`` or ``wordvec_array.pt`` instead are read too. Nothing in it is
  executed: it is read by ``mldecoder_fast.safe_load.load_file``, which refuses a file that would
  import anything beyond a numeric array, naming what it imports, unless ``trust_pickle``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from .common import DataError, Sample, check_image_files, image_path, open_text, read_json

WORDVEC_DIM = 300
CSV_NAME, SPLIT_NAME, WORDVEC_NAME = "data.csv", "benchmark_81_v0.json", "wordvec_array.pth"
# Read in this order when WORDVEC_NAME is not there.
WORDVEC_NAMES = (WORDVEC_NAME, "wordvec_array.npy", "wordvec_array.pt")


@dataclass
class ZSLData:
    """The data set of a ZSL folder: classes, the seen/unseen split, word vectors, samples."""
    class_names: list          # every class of data.csv, sorted (the word vectors' order)
    seen: np.ndarray           # indices of the training classes
    unseen: np.ndarray         # indices of the test classes
    word_vectors: torch.Tensor  # [C, 300] float32
    train: list                # Samples (labels index class_names)
    val: list

    @property
    def gzsl(self) -> np.ndarray:
        return np.union1d(self.seen, self.unseen)


def _clean_label(text: str) -> str:
    return text.strip().strip("'\"").strip()


def parse_label_list(text: str) -> list:
    """``['a', 'b']`` / ``[a, b]`` / ``a, b`` -> ["a", "b"] (the official parser splits on ", "
    after removing the brackets; quotes and blanks are removed here too)."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [lab for lab in (_clean_label(t) for t in body.split(",")) if lab]


def read_data_csv(path: str, images_root: str):
    """(rows [(line, path, labels, split)], sorted class names)."""
    name = os.path.basename(path)
    with open_text(path, f"not found (the NUS-WIDE ZSL folder needs {CSV_NAME}, {SPLIT_NAME} and "
                         f"{WORDVEC_NAME})", newline="") as f:
        reader = csv.reader(f)
        try:
            rows = _data_csv_rows(path, reader, images_root)
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    names = sorted({lab for _, _, labs, _ in rows for lab in labs})
    if not names:
        raise DataError(f"{path}: no labels at all")
    return rows, names, name


def _data_csv_rows(path: str, reader, images_root: str) -> list:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) > 3 and row[1].lstrip().startswith("["):
            # an unquoted list: its commas split it over several cells
            end = next((j for j in range(1, len(row)) if row[j].rstrip().endswith("]")), None)
            if end is None:
                raise DataError(f"{path} line {lineno}: the label list has no closing ']'")
            row = [row[0], ",".join(row[1:end + 1])] + row[end + 1:]
        if len(row) < 3:
            raise DataError(f"{path} line {lineno}: expected 'image, labels, split' (3 columns), "
                            f"got {len(row)}: {row!r}"[:400])
        split = row[2].strip()
        if split not in ("train", "val"):
            raise DataError(f"{path} line {lineno}: split {split!r} is neither 'train' nor 'val'"[:400])
        image = image_path(row[0], f"{path} line {lineno}")
        rows.append((lineno, os.path.join(images_root, image), parse_label_list(row[1]), split))
    return rows


def read_split_json(path: str, class_names):
    """(seen indices, unseen indices) from benchmark_81_v0.json."""
    split = read_json(path)
    if not isinstance(split, dict) or not isinstance(split.get("test class"), list):
        raise DataError(f"{path}: expected an object with a 'test class' list (and optionally "
                        "'train class')")
    for key in ("test class", "train class"):
        names = split.get(key, [])
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise DataError(f"{path}: '{key}' must be a list of class names (strings)")
    index = {c: i for i, c in enumerate(class_names)}
    test = [_clean_label(c) for c in split["test class"]]
    missing = [c for c in test if c not in index]
    if missing:
        raise DataError(f"{path}: test class {missing[0]!r} does not occur in {CSV_NAME} "
                        f"({len(missing)} of {len(test)} test classes are missing)")
    unseen = np.array(sorted({index[c] for c in test}), dtype=np.int64)
    if "train class" in split:
        train = [_clean_label(c) for c in split["train class"]]
        missing = [c for c in train if c not in index]
        if missing:
            raise DataError(f"{path}: train class {missing[0]!r} does not occur in {CSV_NAME}")
        seen = np.array(sorted({index[c] for c in train}), dtype=np.int64)
    else:
        seen = np.setdiff1d(np.arange(len(class_names)), unseen)
    overlap = np.intersect1d(seen, unseen)
    if len(overlap):
        raise DataError(f"{path}: class {class_names[overlap[0]]!r} is both a train and a test class")
    if not len(seen) or not len(unseen):
        raise DataError(f"{path}: needs at least one train and one test class")
    return seen, unseen


def read_word_vectors(path: str, num_classes: int | None, trust_pickle: bool = False,
                      classes_of: str = CSV_NAME) -> torch.Tensor:
    """[C, 300] float32 from wordvec_array.pth ([300, C] officially): a tensor, a pickled numeric
    numpy array (the official file) or a ``.npy``, read by ``mldecoder_fast.safe_load.load_file``
    (no code runs unless ``trust_pickle``). ``num_classes`` None: any C (a [300, 300] array is
    read in the official orientation); ``classes_of``: whose classes, for the error message."""
    from ...safe_load import FileReadError, load_file
    try:
        wv = load_file(path, what="word vectors", allow_numpy=True, trust_pickle=trust_pickle)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except FileReadError as exc:
        raise DataError(str(exc)) from None
    if isinstance(wv, dict) and len(wv) == 1:
        wv = next(iter(wv.values()))
    try:
        wv = torch.as_tensor(np.asarray(wv) if not isinstance(wv, torch.Tensor) else wv)
    except Exception:  # noqa: BLE001
        raise DataError(f"{path}: expected a tensor of word vectors, got {type(wv).__name__}") from None
    wv = wv.squeeze()
    shape = tuple(wv.shape)
    if num_classes is None and wv.dim() == 2:
        num_classes = shape[0] if shape[1] == WORDVEC_DIM else shape[1]
    if wv.dim() == 2 and shape == (WORDVEC_DIM, num_classes):
        wv = wv.t()
    elif not (wv.dim() == 2 and shape == (num_classes, WORDVEC_DIM)):
        raise DataError(f"{path}: word vectors of shape {list(shape)}, expected [{WORDVEC_DIM}, "
                        f"{num_classes}]: {WORDVEC_DIM}-d vectors, one column per class of "
                        f"{classes_of} ({num_classes} classes)")
    if not wv.is_floating_point():
        raise DataError(f"{path}: word vectors must be floating point, got {wv.dtype}")
    wv = wv.float().contiguous()
    if not torch.isfinite(wv).all():
        raise DataError(f"{path}: word vectors contain NaN or infinity")
    return wv


def word_vector_path(root: str) -> str:
    """The word-vector file of ``root``: the first of ``WORDVEC_NAMES`` that exists."""
    for name in WORDVEC_NAMES:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(root, WORDVEC_NAME)  # reported as not found


def load_zsl_data(root: str, images_root: str | None = None, check_files: bool = True,
                  trust_pickle: bool = False) -> ZSLData:
    """The data set in ``root``. ``trust_pickle`` lets the word-vector file unpickle anything
    (it can run code: only for files you trust)."""
    images_root = images_root if images_root is not None else root
    rows, names, csv_name = read_data_csv(os.path.join(root, CSV_NAME), images_root)
    seen, unseen = read_split_json(os.path.join(root, SPLIT_NAME), names)
    wv = read_word_vectors(word_vector_path(root), len(names), trust_pickle=trust_pickle)
    index = {c: i for i, c in enumerate(names)}
    samples = {"train": [], "val": []}
    for lineno, path, labels, split in rows:
        samples[split].append(Sample(path, tuple(sorted({index[c] for c in labels})),
                                     f"{csv_name} line {lineno}"))
    for split in ("train", "val"):
        if not samples[split]:
            raise DataError(f"{os.path.join(root, CSV_NAME)}: no '{split}' rows")
        if check_files:
            check_image_files(samples[split])
    return ZSLData(names, seen, unseen, wv, samples["train"], samples["val"])

