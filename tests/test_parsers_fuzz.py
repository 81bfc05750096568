"""The text parsers under random and mutated input: every failure is a ``DataError`` naming the
file (and the line where there is one), never another exception from inside the parser; valid
files give the same results as always.

Parsers: COCO instances json (``load_coco``), the multi-label CSV (``load_csv``), the ZSL recipe's
data.csv and benchmark_81_v0.json (``read_data_csv``, ``read_split_json``), the single-label list
and class files (``read_list_file``, ``read_class_names``).
"""
import json
import os
import re
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mldecoder_fast.train.formats.coco import load_coco
from mldecoder_fast.train.formats.common import DataError
from mldecoder_fast.train.formats.image_lists import read_class_names, read_list_file
from mldecoder_fast.train.formats.label_csv import load_csv
from mldecoder_fast.train.formats.nus_wide import read_data_csv, read_split_json

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow])

COCO = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
               {"id": 5, "file_name": "sub/c.jpg"}, {"id": 9, "file_name": "d.jpg"}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 3}, {"id": 11, "image_id": 1, "category_id": 7},
                    {"id": 12, "image_id": 2, "category_id": 1}, {"id": 13, "image_id": 5, "category_id": 3},
                    {"id": 14, "image_id": 5, "category_id": 3}],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
}
MULTILABEL_CSV = ("path,labels,split\n"
                  "a.jpg,person;dog,train\n"
                  "b.jpg,\"['car', 'person']\",val\n"
                  "c.jpg,car|dog,train\n"
                  "d.jpg,dog,val\n")
ZSL_CSV = ("image,labels,split\n"
           "i/0.png,\"['sky', 'cat']\",train\n"
           "i/1.png,['dog', 'sky'],train\n"
           "i/2.png,\"[cat, bird]\",val\n"
           "i/3.png,\"['dog']\",val\n")
ZSL_CLASSES = ["bird", "cat", "dog", "sky"]
SPLIT_JSON = {"train class": ["cat", "sky", "dog"], "test class": ["bird"]}
LIST_FILE = "path,label\n# a comment\nimgs/a.png 0\nimgs/b c.png\t2\n\nimgs/d.png,1\n"
CLASS_FILE = "# classes\nn001\nn002\n\nn003\n"


# the parsers, each reading one file -------------------------------------------------------------
def _coco(path):
    return load_coco("/images", path, check_files=False)


def _csv(path):
    return load_csv(path, images_root="/images", check_files=False)


def _csv_train_split(path):
    return load_csv(path, images_root="/images", split="train", check_files=False)


def _zsl_csv(path):
    return read_data_csv(path, "/images")


def _split_json(path):
    return read_split_json(path, ZSL_CLASSES)


def _list_file(path):
    return read_list_file(path, 3, images_root="/images")


PARSERS = {  # name: (parser, file name, a valid file's text)
    "coco": (_coco, "instances_train2014.json", json.dumps(COCO, indent=1)),
    "csv": (_csv, "train.csv", MULTILABEL_CSV),
    "csv-split": (_csv_train_split, "all.csv", MULTILABEL_CSV),
    "zsl-data-csv": (_zsl_csv, "data.csv", ZSL_CSV),
    "zsl-split-json": (_split_json, "benchmark_81_v0.json", json.dumps(SPLIT_JSON, indent=1)),
    "list-file": (_list_file, "train.txt", LIST_FILE),
    "class-file": (read_class_names, "classes.txt", CLASS_FILE),
}
JSON_PARSERS = ["coco", "zsl-split-json"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def parse_bytes(workdir, name: str, data: bytes):
    """Run parser ``name`` on a file holding ``data``: its result, or the DataError it raised (any
    other exception fails the test). A DataError must name the file."""
    parser, filename, _ = PARSERS[name]
    path = workdir / filename
    path.write_bytes(data)
    try:
        return parser(str(path))
    except DataError as exc:
        assert filename in str(exc), f"the {name} parser's error does not name {filename}: {exc}"
        return exc


# random input -----------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.mark.parametrize("name", list(PARSERS))
@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(workdir, name, data):
    parse_bytes(workdir, name, data)


@pytest.mark.parametrize("name", list(PARSERS))
@FUZZ
@given(text=st.text(max_size=300))
def test_random_text(workdir, name, text):
    parse_bytes(workdir, name, text.encode("utf-8"))


@pytest.mark.parametrize("name", JSON_PARSERS)
@FUZZ
@given(value=json_values)
def test_random_json(workdir, name, value):
    parse_bytes(workdir, name, json.dumps(value).encode("utf-8"))


# mutations of a valid file ----------------------------------------------------------------------
line_edit = st.tuples(st.sampled_from(["drop", "duplicate", "replace", "insert", "truncate", "bytes"]),
                      st.integers(0, 1000), st.text(max_size=30), st.binary(min_size=1, max_size=4))


def mutate_lines(text: str, edits) -> bytes:
    lines = text.encode("utf-8").split(b"\n")
    for op, at, new_text, raw in edits:
        i = at % len(lines)
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "replace":
            lines[i] = new_text.encode("utf-8")
        elif op == "insert":
            lines.insert(i, new_text.encode("utf-8"))
        elif op == "truncate":
            lines[i] = lines[i][:at % (len(lines[i]) + 1)]
        elif op == "bytes":  # any bytes, not necessarily UTF-8, inside a line
            pos = at % (len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + raw + lines[i][pos:]
    return b"\n".join(lines)


@pytest.mark.parametrize("name", list(PARSERS))
@FUZZ
@given(edits=st.lists(line_edit, min_size=1, max_size=4))
def test_mutated_lines(workdir, name, edits):
    parse_bytes(workdir, name, mutate_lines(PARSERS[name][2], edits))


def json_paths(value, prefix=()):
    """Every path (tuple of keys / indices) inside a JSON value, the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from json_paths(child, prefix + (key,))


def mutate_json(doc, path, op, new):
    """``doc`` with the value at ``path`` replaced by ``new`` (a field of another type), deleted,
    or duplicated (list entries)."""
    doc = json.loads(json.dumps(doc))
    if not path:
        return new
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = new
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, list):  # duplicate an entry: a duplicate id for images / categories
        parent.insert(last, parent[last])
    else:
        parent[last] = [parent[last], parent[last]]
    return doc


@pytest.mark.parametrize("name", JSON_PARSERS)
@FUZZ
@given(data=st.data())
def test_mutated_json(workdir, name, data):
    doc = COCO if name == "coco" else SPLIT_JSON
    path = data.draw(st.sampled_from(list(json_paths(doc))), label="path")
    op = data.draw(st.sampled_from(["replace", "delete", "duplicate"]), label="op")
    new = data.draw(json_values, label="new value")
    parse_bytes(workdir, name, json.dumps(mutate_json(doc, path, op, new)).encode("utf-8"))


# valid files: the results are as they always were -----------------------------------------------
def test_valid_files_round_trip(workdir):
    samples, names = parse_bytes(workdir, "coco", PARSERS["coco"][2].encode())
    assert names == ["person", "car", "dog"]
    assert [(s.path, s.labels, s.where) for s in samples] == [
        ("/images/a.jpg", (1, 2), "instances_train2014.json image id 1"),
        ("/images/b.jpg", (0,), "instances_train2014.json image id 2"),
        ("/images/sub/c.jpg", (1,), "instances_train2014.json image id 5")]

    samples, names = parse_bytes(workdir, "csv", MULTILABEL_CSV.encode())
    assert names == ["car", "dog", "person"]
    assert [(s.path, s.labels, s.where) for s in samples] == [
        ("/images/a.jpg", (1, 2), "train.csv line 2"), ("/images/b.jpg", (0, 2), "train.csv line 3"),
        ("/images/c.jpg", (0, 1), "train.csv line 4"), ("/images/d.jpg", (1,), "train.csv line 5")]
    samples, names = parse_bytes(workdir, "csv-split", MULTILABEL_CSV.encode())
    assert names == ["car", "dog", "person"] and [s.path for s in samples] == ["/images/a.jpg", "/images/c.jpg"]

    rows, names, name = parse_bytes(workdir, "zsl-data-csv", ZSL_CSV.encode())
    assert (names, name) == (ZSL_CLASSES, "data.csv")
    assert rows == [(2, "/images/i/0.png", ["sky", "cat"], "train"), (3, "/images/i/1.png", ["dog", "sky"], "train"),
                    (4, "/images/i/2.png", ["cat", "bird"], "val"), (5, "/images/i/3.png", ["dog"], "val")]
    seen, unseen = parse_bytes(workdir, "zsl-split-json", PARSERS["zsl-split-json"][2].encode())
    assert seen.tolist() == [1, 2, 3] and unseen.tolist() == [0]
    no_train = parse_bytes(workdir, "zsl-split-json", json.dumps({"test class": ["'dog' "]}).encode())
    assert [a.tolist() for a in no_train] == [[0, 1, 3], [2]]

    table = parse_bytes(workdir, "list-file", LIST_FILE.encode())
    assert [table.path(i) for i in range(len(table))] == ["/images/imgs/a.png", "/images/imgs/b c.png",
                                                          "/images/imgs/d.png"]
    assert table.labels.tolist() == [0, 2, 1] and table.lines.tolist() == [3, 4, 6]
    assert parse_bytes(workdir, "class-file", CLASS_FILE.encode()) == ["n001", "n002", "n003"]


def test_a_bad_row_stops_the_load(workdir):
    """A bad row anywhere stops the load: the parser raises rather than returning the good rows."""
    for name, bad_row in [("csv", "e.jpg\n"), ("csv-split", "e.jpg,dog\n"),
                          ("zsl-data-csv", "i/4.png,\"['cat']\",test\n"), ("list-file", "imgs/e.png 3\n"),
                          ("list-file", " ,1\n")]:
        good = PARSERS[name][2]
        for text in (good + bad_row, good.replace("\n", "\n" + bad_row, 2)):
            result = parse_bytes(workdir, name, text.encode())
            assert isinstance(result, DataError), f"{name} returned a result from a file with {bad_row!r}"
            line = text.split("\n").index(bad_row.rstrip("\n")) + 1
            assert f"line {line}:" in str(result), str(result)


# specific malformed inputs: the message says what and where -------------------------------------
@pytest.mark.parametrize("name, data, message", [
    ("csv", MULTILABEL_CSV.encode().replace(b"c.jpg", b"c\xff.jpg"),
     r"train\.csv line 4 \(byte 2: b'\\xff'\): not UTF-8"),
    ("list-file", b"a.png 0\n\xe9.png 1\n", r"train\.txt line 2 \(byte 1: b'\\xe9'\): not UTF-8"),
    ("class-file", b"n1\nn2\n\xc3", r"classes\.txt line 3 .*: not UTF-8"),
    ("class-file", b"n1\nn2\n n1\n", r"classes\.txt line 3: class 'n1' is listed twice \(first on line 1\)"),
    ("coco", b'{"images": [}', r"instances_train2014\.json line 1: not valid JSON \(Expecting value, column 13\)"),
    ("coco", b"", r"instances_train2014\.json line 1: not valid JSON"),
    ("coco", b"[]", r"no 'images' list: not a COCO instances file"),
    ("coco", json.dumps(dict(COCO, images=COCO["images"] + [{"id": 2, "file_name": "e.jpg"}])).encode(),
     r"instances_train2014\.json: image id 2 appears twice"),
    ("coco", json.dumps(dict(COCO, images=[{"id": [1], "file_name": "a.jpg"}])).encode(),
     r"images\[0\] has id \[1\], expected an integer or a string"),
    ("coco", json.dumps(dict(COCO, images=[{"id": 1, "file_name": 7}])).encode(),
     r"images\[0\] \(id 1\): the image path is 7, expected a string"),
    ("coco", json.dumps(dict(COCO, annotations=["x"])).encode(), r"annotations\[0\] is 'x', expected an object"),
    ("coco", json.dumps(dict(COCO, categories=[{"id": 1, "name": None}])).encode(),
     r"categories\[0\] has name None, expected a string"),
    ("coco", b"[" * 100000, r"instances_train2014\.json: not valid JSON for this reader \(RecursionError"),
    ("zsl-data-csv", ZSL_CSV.encode() + b"  ,['cat'],train\n", r"data\.csv line 6: image path '  ' is empty"),
    ("zsl-data-csv", b"h\n" + b"a" * 200000 + b",x,train\n", r"data\.csv line 2: not valid CSV \(field larger"),
    ("zsl-split-json", json.dumps({"test class": ["bird"], "train class": "cat"}).encode(),
     r"benchmark_81_v0\.json: 'train class' must be a list of class names"),
    ("zsl-split-json", json.dumps({"test class": ["bird", 3]}).encode(),
     r"benchmark_81_v0\.json: 'test class' must be a list of class names"),
])
def test_malformed_input_messages(workdir, name, data, message):
    result = parse_bytes(workdir, name, data)
    assert isinstance(result, DataError), f"{name} accepted {data[:60]!r}"
    assert re.search(message, str(result)), f"expected /{message}/, got: {result}"


def test_unreadable_path_is_a_data_error(workdir):
    folder = workdir / "a_folder.csv"
    folder.mkdir(exist_ok=True)
    with pytest.raises(DataError, match=r"a_folder\.csv: cannot read it"):
        load_csv(str(folder), check_files=False)
    with pytest.raises(DataError, match=r"nope\.txt: list file not found"):
        read_list_file(os.path.join(workdir, "nope.txt"), 3)
