"""Readers of the data files the training recipes take (see docs/training.md, docs/large_scale.md):
``coco`` (instances json), ``label_csv`` (multi-label CSV), ``image_lists`` (single-label list
files, class files, ImageFolder), ``nus_wide`` (the ZSL data.csv, split json and word vectors),
all built on ``common`` (``DataError``, ``Sample``, the text reader)."""
