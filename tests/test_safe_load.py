"""Files from strangers: every binary loader refuses code, truncation and the wrong kind of file.

The loaders: ``mldecoder_fast.safe_load.load_file`` and everything that reads a user's file through
it (word vectors of the ZSL recipe, checkpoints for --resume / --init-checkpoint / predict).
"""
from __future__ import annotations

import argparse
import ast
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch

import mldecoder_fast
from mldecoder_fast.safe_load import FileReadError, UnsafeFileError, load_file
from mldecoder_fast.train.checkpoint import CheckpointError, load_checkpoint
from mldecoder_fast.train.formats.common import DataError
from mldecoder_fast.train.formats.nus_wide import WORDVEC_DIM, read_word_vectors

PACKAGE = pathlib.Path(mldecoder_fast.__file__).parent


class _CreatesFile:
    """Unpickling this runs ``open(marker, 'w')`` (via builtins.exec): a file appears if it runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_files(tmp_path):
    """(path, marker) pairs: each file would create its marker if it were unpickled in full."""
    out = []
    for i, (cls, writer) in enumerate([(_CreatesFile, "torch"), (_CreatesFile, "pickle"),
                                       (_System, "torch"), (_System, "pickle")]):
        marker = tmp_path / f"pwned{i}"
        payload = {"wordvec_array": cls(marker)} if i % 2 else cls(marker)
        path = tmp_path / f"hostile{i}.pth"
        if writer == "torch":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=2)
        out.append((path, marker))
    return out


# the official word-vector file and the formats that stand in for it ------------------------------
def _save_numpy(array: np.ndarray, path, numpy1_names: bool) -> None:
    """torch.save of a numpy array (the official wordvec_array.pth); ``numpy1_names`` rewrites the
    pickle to the module names numpy 1.x writes (numpy.core instead of numpy._core)."""
    torch.save(array, path)
    if not numpy1_names:
        return
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            z.writestr(info, data)


@pytest.mark.parametrize("numpy1_names", [False, True])
@pytest.mark.parametrize("in_dict", [False, True])
def test_pickled_numpy_word_vectors_load(tmp_path, numpy1_names, in_dict):
    wv = np.random.default_rng(0).standard_normal((WORDVEC_DIM, 7)).astype(np.float32)
    path = tmp_path / "wordvec_array.pth"
    _save_numpy({"wordvec_array": wv} if in_dict else wv, path, numpy1_names)
    out = read_word_vectors(str(path), 7)
    assert out.shape == (7, WORDVEC_DIM)
    assert torch.equal(out, torch.from_numpy(wv).t().contiguous())   # read, not computed: bit for bit


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_npy_and_tensor_word_vectors_load(tmp_path, suffix):
    wv = torch.randn(5, WORDVEC_DIM)
    path = tmp_path / f"wordvec_array{suffix}"
    if suffix == ".npy":
        np.save(path, wv.numpy())
    else:
        torch.save(wv, path)
    assert torch.equal(read_word_vectors(str(path), 5), wv)   # read, not computed: bit for bit


def test_zsl_data_finds_npy_word_vectors(tmp_path):
    from mldecoder_fast.train.formats import nus_wide as zsl
    from mldecoder_fast.train.synthetic.nus_miniature import make_miniature
    make_miniature(str(tmp_path))
    official = tmp_path / zsl.WORDVEC_NAME
    wv = torch.load(official, weights_only=True)
    official.unlink()
    np.save(tmp_path / "wordvec_array.npy", wv.numpy())
    data = zsl.load_zsl_data(str(tmp_path), check_files=False)
    assert data.word_vectors.shape == (wv.shape[1], WORDVEC_DIM)


def test_object_arrays_refused(tmp_path):
    objects = np.array([{"a": 1}, [2]], dtype=object)
    npy = tmp_path / "objects.npy"
    np.save(npy, objects, allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="objects"):
        load_file(str(npy), what="word vectors", allow_numpy=True)
    pth = tmp_path / "objects.pth"
    torch.save(objects, pth)
    with pytest.raises(UnsafeFileError, match="ObjectDType|numpy.dtypes"):
        load_file(str(pth), what="word vectors", allow_numpy=True)


# hostile files --------------------------------------------------------------------------------------
def _loaders():
    return {
        "load_file": lambda p: load_file(str(p)),
        "load_file(numpy)": lambda p: load_file(str(p), allow_numpy=True),
        "word vectors": lambda p: read_word_vectors(str(p), 3),
        "checkpoint": lambda p: load_checkpoint(str(p)),
    }


@pytest.mark.parametrize("loader", list(_loaders()))
def test_code_in_a_pickle_never_runs(tmp_path, loader):
    for path, marker in _hostile_files(tmp_path):
        with pytest.raises((UnsafeFileError, DataError, CheckpointError)) as info:
            _loaders()[loader](path)
        assert not marker.exists(), f"{loader} ran the code in {path.name}"
        message = str(info.value)
        assert str(path) in message and "--trust-pickle" in message
        assert ("exec" in message) or ("system" in message), message  # names what it would import


def test_predict_and_train_commands_refuse_hostile_files(tmp_path, capsys):
    from mldecoder_fast import cli
    from mldecoder_fast.train.formats import nus_wide as zsl
    from mldecoder_fast.train.synthetic.nus_miniature import make_miniature
    (path, marker), = [_hostile_files(tmp_path)[2]]
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    assert cli.main(["predict", "--checkpoint", str(path), str(image)]) == 2
    assert not marker.exists()
    assert "refused" in capsys.readouterr().err
    data = tmp_path / "mini"
    make_miniature(str(data))
    os.replace(path, data / zsl.WORDVEC_NAME)
    assert cli.main(["train", "zsl", "--data", str(data), "--no-file-check", "--epochs", "1"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "refused" in err and "--trust-pickle" in err


def test_trust_pickle_is_an_explicit_opt_in_that_warns(tmp_path):
    ckpt = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}  # as old scripts saved
    path = tmp_path / "with_namespace.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_checkpoint(str(path))
    with pytest.warns(UserWarning, match="runs any code"):
        loaded = load_checkpoint(str(path), trust_pickle=True)
    assert loaded["args"].lr == 0.1
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_truncated_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump(np.ones((300, 3), np.float32), f, protocol=2)
    npy = tmp_path / "good.npy"
    np.save(npy, np.ones((3, 300), np.float32))
    for src in (good, legacy, npy):
        data = src.read_bytes()
        for cut in (len(data) // 2, 10, 0):
            bad = tmp_path / f"cut{cut}{src.suffix}"
            bad.write_bytes(data[:cut])
            with pytest.raises(FileReadError, match=str(bad)):
                load_file(str(bad), allow_numpy=True)
            with pytest.raises(DataError, match=str(bad)):
                read_word_vectors(str(bad), 3)
            with pytest.raises(CheckpointError, match=str(bad)):
                load_checkpoint(str(bad))


def test_files_of_the_wrong_kind(tmp_path):
    png = tmp_path / "image.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(FileReadError, match="image.pth"):
        load_file(str(png))
    with pytest.raises(CheckpointError, match="image.pth"):
        load_checkpoint(str(png))
    # a checkpoint where word vectors are expected
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 2}, ckpt)
    with pytest.raises(DataError, match="expected a tensor of word vectors, got dict"):
        read_word_vectors(str(ckpt), 3)
    # word vectors where a checkpoint is expected
    wv = tmp_path / "wordvec.pth"
    torch.save(torch.randn(300, 3), wv)
    with pytest.raises(CheckpointError, match="expected a checkpoint with a state_dict"):
        load_checkpoint(str(wv))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_file(str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("shape", [(300, 4), (3, 299), (300,), (2, 300, 3)])
def test_word_vectors_of_the_wrong_shape(tmp_path, shape):
    path = tmp_path / "wordvec_array.pt"
    torch.save(torch.randn(shape), path)
    with pytest.raises(DataError, match=r"expected \[300, 3\]"):
        read_word_vectors(str(path), 3)


def test_word_vectors_of_the_wrong_dtype(tmp_path):
    path = tmp_path / "wordvec_array.npy"
    np.save(path, np.ones((300, 3), np.int64))
    with pytest.raises(DataError, match="floating point"):
        read_word_vectors(str(path), 3)


# one loading helper ---------------------------------------------------------------------------------
_FORBIDDEN = {
    "torch.load", "torch.serialization.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
    "torch.utils.model_zoo.load_url", "numpy.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
    "_pickle.load", "_pickle.loads", "_pickle.Unpickler", "joblib.load", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "pandas.read_pickle", "shelve.open",
}


def _loading_calls(source: str) -> list:
    """(line, dotted name) of every call in ``source`` to a forbidden loading function, however it
    was imported (``import torch as t``, ``from pickle import loads as l``, ...)."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr):
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return None if base is None else f"{base}.{expr.attr}"
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name is None:
                continue
            name = name.replace("numpy._core", "numpy").replace("np.", "numpy.")
            if name in _FORBIDDEN or name.startswith("torch.hub."):
                found.append((node.lineno, name))
    return found


def test_the_walker_finds_loading_calls_however_imported():
    source = """
import torch as t
import numpy as np
import pickle
from pickle import loads as L
from torch import load
from torch.hub import load_state_dict_from_url as fetch
import joblib
t.load("a"); np.load("b"); pickle.Unpickler(f).load(); L(b""); load("c"); fetch("u"); joblib.load("j")
t.save(x, "ok"); np.save("ok", x)
"""
    names = sorted(name for _, name in _loading_calls(source))
    assert names == sorted(["torch.load", "numpy.load", "pickle.Unpickler", "pickle.loads", "torch.load",
                            "torch.hub.load_state_dict_from_url", "joblib.load"])


def test_only_the_helper_loads_files():
    offenders = []
    helper = PACKAGE / "safe_load.py"
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == helper:
            continue
        for line, name in _loading_calls(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert not offenders, ("load user files through mldecoder_fast.safe_load.load_file only:\n"
                           + "\n".join(offenders))
    assert _loading_calls(helper.read_text()), "the helper itself must be where loading happens"
