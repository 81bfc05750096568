"""COCO instances files (MS-COCO 2014/2017 or any dataset in that format) as multi-label samples.

Category ids are mapped to 0..n-1 in the json's category order; images without any annotation are
left out, as in the official recipe. A missing image file, an unknown category id, a duplicate id
or an entry of the wrong type is a ``DataError`` naming the file and the entry.
"""
from __future__ import annotations

import os

from .common import DataError, Sample, check_image_files, image_path, read_json, short


def _coco_id(entry, key: str, path: str, where: str):
    """``entry[key]`` of a COCO json entry: an integer or a string (what a dict can key on)."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} is {short(entry)}, expected an object")
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{path}: {where} has {key} {short(value)}, expected an integer or a string")
    return value


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
            raise DataError(f"{instances_json}: categories[{i}] has name {short(label)}, expected a string")
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

