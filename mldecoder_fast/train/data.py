"""Multi-label datasets: COCO instances json + image folder, or a CSV of image path + labels.

Bad data fails loudly and says where: a missing image file (checked for every sample before
training), an image that cannot be decoded (when it is read, naming the file and its json id or
CSV line), an empty label list in a CSV, an unknown category id or class name. Nothing is skipped
silently except what the official recipe skips: COCO images without any annotation.

Every text parser of the package (these, and the list, class and ZSL files of ``singlelabel`` and
``zsl``) reads its file with ``open_text``/``read_json`` below: any malformed input (bytes that are
not UTF-8, broken JSON or CSV, a value of the wrong JSON type, a duplicate id, an empty image path)
stops the load with a ``DataError`` naming the file, and the line where there is one; nothing is
returned from a file with a bad row. ``tests/test_parsers_fuzz.py`` feeds them random and mutated
files to hold them to that.

CSV format (one row per image, header optional):

    path,labels[,split]
    images/0001.jpg,person;dog
    images/0002.jpg,"['car', 'person']",val

``labels`` is a list of class names separated by ``;`` or ``|``, or a Python-style list (the
official NUS-WIDE ``data.csv``); ``split`` (``train``/``val``) is optional. Relative paths are
relative to ``images_root`` (default: the CSV's folder).
"""
from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["Sample", "DataError", "BadImageError", "MultiLabelDataset", "load_coco", "load_csv",
           "find_coco", "build_transforms", "Cutout"]


class DataError(ValueError):
    """A dataset description (json, CSV) that cannot be trained on; the message says where."""


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file and its entry."""


@dataclass(frozen=True)
class Sample:
    path: str
    labels: tuple      # class indices
    where: str         # "instances_val2014.json image id 42" or "train.csv line 7"


# reading text files -----------------------------------------------------------------------------
def _short(value, limit: int = 80) -> str:
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
        raise DataError(f"{where}: the image path is {_short(text)}, expected a string")
    path = text.strip()
    if not path or "\0" in path:
        raise DataError(f"{where}: image path {text!r} is " + ("empty" if not path else "not a path (NUL byte)"))
    return path


def _coco_id(entry, key: str, path: str, where: str):
    """``entry[key]`` of a COCO json entry: an integer or a string (what a dict can key on)."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} is {_short(entry)}, expected an object")
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{path}: {where} has {key} {_short(value)}, expected an integer or a string")
    return value


# COCO -------------------------------------------------------------------------------------------
def find_coco(root: str):
    """The (train, val) pairs (images_dir, instances_json) of a COCO 2014 or 2017 folder."""
    for year in ("2014", "2017"):
        ann = os.path.join(root, "annotations")
        tj = os.path.join(ann, f"instances_train{year}.json")
        vj = os.path.join(ann, f"instances_val{year}.json")
        if os.path.isfile(tj) and os.path.isfile(vj):
            return ((os.path.join(root, f"train{year}"), tj), (os.path.join(root, f"val{year}"), vj))
    raise DataError(f"{root}: not a COCO folder (expected annotations/instances_train2014.json and "
                    f"instances_val2014.json with train2014/ and val2014/, or the 2017 names)")


def load_coco(images_dir: str, instances_json: str, class_names=None, check_files: bool = True):
    """Samples and class names of a COCO instances file (category ids mapped to 0..n-1 in the
    json's category order). Images without annotations are left out, as in the official recipe.

    ``class_names``: the training set's classes, which this file's categories must equal."""
    data = read_json(instances_json, "annotation file not found")
    name = os.path.basename(instances_json)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{instances_json}: no '{key}' list: not a COCO instances file")
    cat_index, names = {}, []
    for i, cat in enumerate(data["categories"]):
        cid = _coco_id(cat, "id", instances_json, f"categories[{i}]")
        if cid in cat_index:
            raise DataError(f"{instances_json}: category id {cid} appears twice")
        label = cat.get("name", str(cid))
        if not isinstance(label, str):
            raise DataError(f"{instances_json}: categories[{i}] has name {_short(label)}, expected a string")
        cat_index[cid] = len(names)
        names.append(label)
    if not names:
        raise DataError(f"{instances_json}: the 'categories' list is empty")
    if class_names is not None and list(class_names) != names:
        raise DataError(f"{instances_json}: its {len(names)} categories differ from the "
                        f"{len(class_names)} training classes")
    files = {}
    for i, img in enumerate(data["images"]):
        iid = _coco_id(img, "id", instances_json, f"images[{i}]")
        if iid in files:
            raise DataError(f"{instances_json}: image id {iid} appears twice")
        files[iid] = image_path(img.get("file_name"), f"{instances_json}: images[{i}] (id {iid})")
    labels = {}
    for i, ann in enumerate(data["annotations"]):
        iid = _coco_id(ann, "image_id", instances_json, f"annotations[{i}]")
        cid = _coco_id(ann, "category_id", instances_json, f"annotations[{i}]")
        if iid not in files:
            raise DataError(f"{instances_json}: annotation id {ann.get('id')} refers to image id {iid}, "
                            "which is not in 'images'")
        if cid not in cat_index:
            known = sorted(cat_index, key=str)
            shown = ", ".join(map(str, known[:12])) + (", ..." if len(known) > 12 else "")
            raise DataError(f"{instances_json}: annotation id {ann.get('id')} (image id {iid}) has "
                            f"category_id {cid}, which is not one of the {len(known)} categories "
                            f"(ids {shown})")
        labels.setdefault(iid, set()).add(cat_index[cid])
    samples = [Sample(os.path.join(images_dir, files[iid]), tuple(sorted(lab)),
                      f"{name} image id {iid}")
               for iid, lab in labels.items()]
    if not samples:
        raise DataError(f"{instances_json}: no image has an annotation")
    if check_files:
        check_image_files(samples)
    return samples, names


# CSV --------------------------------------------------------------------------------------------
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
                    raise DataError(f"{csv_path} line {lineno}: expected 'path,labels[,split]', got {_short(row)}")
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


def check_image_files(samples) -> None:
    missing = [s for s in samples if not os.path.isfile(s.path)]
    if missing:
        shown = "\n".join(f"  {s.where}: {s.path}" for s in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} of {len(samples)} image files are missing:\n{shown}{more}")


# dataset ----------------------------------------------------------------------------------------
def load_rgb(sample: Sample):
    from PIL import Image
    try:
        with Image.open(sample.path) as im:
            return im.convert("RGB")  # decodes the whole file: truncated data fails here
    except FileNotFoundError:
        raise BadImageError(f"{sample.where}: image file {sample.path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImageError(f"{sample.where}: cannot decode image {sample.path} "
                            f"({type(exc).__name__}: {exc})") from None


class MultiLabelDataset(Dataset):
    """Images with multi-hot float targets [num_classes]."""

    def __init__(self, samples, class_names, transform=None):
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> torch.Tensor:
        t = torch.zeros(len(self.samples), len(self.class_names))
        for i, s in enumerate(self.samples):
            t[i, list(s.labels)] = 1
        return t

    def __getitem__(self, i):
        s = self.samples[i]
        img = load_rgb(s)
        if self.transform is not None:
            img = self.transform(img)
        target = torch.zeros(len(self.class_names))
        target[list(s.labels)] = 1
        return img, target


# transforms -------------------------------------------------------------------------------------
class Cutout:
    """Paint one rectangle of ``factor`` x the image's sides, centred at a random point (clipped at
    the borders), with a random colour (the recipe's cutout, factor 0.5). PIL in, PIL out; draws
    from torch's RNG so that seeded runs repeat."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def __call__(self, img):
        from PIL import ImageDraw
        w, h = img.size
        ch, cw = int(self.factor * h + 0.5), int(self.factor * w + 0.5)
        yc, xc = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y1, y2 = max(yc - ch // 2, 0), min(yc + ch // 2, h)
        x1, x2 = max(xc - cw // 2, 0), min(xc + cw // 2, w)
        color = tuple(int(c) for c in torch.randint(256, (3,)))
        img = img.copy()
        ImageDraw.Draw(img).rectangle([x1, y1, x2, y2], fill=color)
        return img

    def __repr__(self) -> str:
        return f"Cutout(factor={self.factor})"


def build_transforms(image_size: int, train: bool, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     randaugment: bool = True, cutout: float = 0.5):
    """The recipe's transforms: resize to a square; for training cutout then RandAugment; to a
    [0, 1] tensor, then normalised by the backbone's mean/std (identity for TResNet)."""
    from torchvision import transforms as T
    ops = [T.Resize((image_size, image_size))]
    if train:
        if cutout > 0:
            ops.append(Cutout(cutout))
        if randaugment:
            ops.append(T.RandAugment())
    ops.append(T.ToTensor())
    if tuple(mean) != (0.0, 0.0, 0.0) or tuple(std) != (1.0, 1.0, 1.0):
        ops.append(T.Normalize(mean, std))
    return T.Compose(ops)
