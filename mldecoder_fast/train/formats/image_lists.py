"""Single-label sample lists: ``path class_index`` list files with a class-name file, and the
ImageFolder layout (``split/<class>/<image>``), both read into a compact ``SampleTable``.

- list file: one ``path class_index`` per line (separated by spaces, a tab or a comma; blank lines
  and ``#`` comments skipped; a header line is allowed), paths relative to an images root
  (default: the list file's folder). An index outside [0, classes) fails with the file and line.
- class file: one class name per line, no name twice; it fixes the class count.
- ImageFolder: the classes are the sorted folder names of the training split; a validation split
  may not have a class the training split lacks.
"""
from __future__ import annotations

import os

import numpy as np

from .common import DataError, Sample, image_path, open_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SampleTable:
    """Image paths and class indices of a split, stored compactly (ImageNet-21K has 13M images:
    numpy arrays, not Python objects, so data-loader workers share them without copying).
    ``where(i)`` says where sample i came from (list file and line, or the folder)."""

    def __init__(self, root: str, paths, labels, lines, source: str):
        self.root = root  # paths are stored relative to it
        self.paths = np.asarray([p.encode("utf-8") for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode("utf-8"))

    def where(self, i: int) -> str:
        line = int(self.lines[i])
        return f"{self.source} line {line}" if line > 0 else f"{self.source}: {self.path(i)}"

    def sample(self, i: int) -> Sample:
        return Sample(self.path(i), (int(self.labels[i]),), self.where(i))

    def check_files(self) -> None:
        missing = [i for i in range(len(self)) if not os.path.isfile(self.path(i))]
        if missing:
            shown = "\n".join(f"  {self.where(i)}: {self.path(i)}" for i in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(f"{len(missing)} of {len(self)} image files listed in {self.source} are "
                            f"missing:\n{shown}{more}")


def read_class_names(path: str) -> list:
    """One class name per line (blank lines and ``#`` comments skipped); no name twice."""
    line_of = {}
    with open_text(path, "class list not found") as f:
        for lineno, line in enumerate(f, start=1):
            name = line.strip()
            if not name or line.startswith("#"):
                continue
            if name in line_of:
                raise DataError(f"{path} line {lineno}: class {name!r} is listed twice (first on "
                                f"line {line_of[name]})")
            line_of[name] = lineno
    if not line_of:
        raise DataError(f"{path}: the class list is empty")
    return list(line_of)


def read_list_file(path: str, num_classes: int, images_root: str | None = None) -> SampleTable:
    """A list file of ``path class_index`` lines (see the module docstring)."""
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    paths, labels, lines = [], [], []
    with open_text(path, "list file not found") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            if len(parts) != 2 or not parts[0].strip():
                raise DataError(f"{path} line {lineno}: expected 'image_path class_index', got {line!r}")
            img, idx = image_path(parts[0], f"{path} line {lineno}"), parts[1].strip()
            try:
                c = int(idx)
            except ValueError:
                if lineno == 1:
                    continue  # a header such as "path,label"
                raise DataError(f"{path} line {lineno}: class index {idx!r} is not an integer") from None
            if not 0 <= c < num_classes:
                raise DataError(f"{path} line {lineno}: class index {c} is out of range: the run has "
                                f"{num_classes} classes (indices 0..{num_classes - 1})")
            paths.append(img)
            labels.append(c)
            lines.append(lineno)
    if not paths:
        raise DataError(f"{path}: no samples")
    return SampleTable(root, paths, labels, lines, name if images_root is None else path)


def scan_image_folder(split_dir: str, class_names=None):
    """(SampleTable, class names) of ``split_dir/<class>/<image>``; ``class_names`` fixes the
    classes (the training set's) for a validation split."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: folder not found (expected the ImageFolder layout "
                        "DIR/train/<class>/<image> and DIR/val/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if class_names is None:
        class_names = found
        if not class_names:
            raise DataError(f"{split_dir}: no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{split_dir}: class folder {unknown[0]!r} is not one of the "
                        f"{len(class_names)} training classes")
    paths, labels = [], []
    for c in found:
        for dirpath, _, files in os.walk(os.path.join(split_dir, c)):
            rel = os.path.relpath(dirpath, split_dir)
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(rel, fn))
                    labels.append(index[c])
    if not paths:
        raise DataError(f"{split_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return SampleTable(split_dir, paths, labels, [0] * len(paths), split_dir), list(class_names)

