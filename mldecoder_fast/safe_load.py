"""Reading binary files that users bring (checkpoints, word vectors) without running code from them.

Every binary file this package reads from a user goes through :func:`load_file`; a test walks the
package's source and fails on any other ``torch.load``/``np.load``/``pickle``/``torch.hub`` load.

What is read:

- ``.npy``: ``np.load(..., allow_pickle=False)``: a plain numeric array, never objects.
- anything else (``.pth``, ``.pt``, ...): ``torch.load(..., weights_only=True)``, which builds only
  tensors, containers and plain Python values. ``allow_numpy=True`` (word vectors) also admits a
  pickled numeric numpy array, by allowing exactly the names such a pickle refers to (numpy 1.x
  and 2.x spell them differently): the array reconstructor, ``ndarray``, ``dtype`` and the numeric
  dtype classes. Object arrays are refused.

A file that needs anything else is refused with :class:`UnsafeFileError`, which names what the
file would import and how to convert it. ``trust_pickle=True`` unpickles it in full, running any
code the file contains: only for files whose origin you trust; it warns every time.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile

import numpy as np
import torch


class FileReadError(ValueError):
    """A user's file that cannot be read: missing, truncated, of the wrong kind or shape."""


class UnsafeFileError(FileReadError):
    """A file that would run or import code to be read (refused unless ``trust_pickle=True``)."""


_NUMERIC_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                   np.uint64, np.float16, np.float32, np.float64)


def _numpy_array_globals() -> list:
    """What a pickled numeric numpy array refers to, under the names of numpy 1.x and 2.x."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    reconstruct = multiarray._reconstruct
    allowed = [(reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    # numpy >= 1.25 pickles a dtype by its class (numpy.dtypes.Float32DType, ...); numeric only.
    dtype_classes = {type(np.dtype(t)) for t in _NUMERIC_DTYPES}
    allowed += [c for c in dtype_classes if c is not np.dtype]
    return allowed


def _pickle_globals(path: str) -> list:
    """The globals a file's pickle would import, read without unpickling it."""
    if zipfile.is_zipfile(path):
        try:
            return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
        except Exception:  # noqa: BLE001 - a damaged archive: nothing more to say than the load's error
            return []
    names, strings = set(), []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    break
    except Exception:  # noqa: BLE001 - not a pickle (or a truncated one): no names to report
        pass
    return sorted(names)


def _describe(exc: BaseException) -> str:
    """The exception's type and its most telling line (torch's weights-only errors put the
    refused type or opcode in a line of their own, after general advice)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    telling = [line for line in lines if any(word in line for word in (
        "Unsupported", "Can only build", "got <class", "GLOBAL", "operand"))]
    return f"{type(exc).__name__}: {(telling or lines or [''])[0]}"


def load_file(path: str, *, what: str = "file", allow_numpy: bool = False,
              trust_pickle: bool = False, map_location="cpu"):
    """The object stored in ``path`` (a checkpoint, tensor or array), read without running code.

    ``what`` names the file in errors ("checkpoint", "word vectors"). Raises ``FileNotFoundError``
    for a missing file, :class:`UnsafeFileError` for a file that needs code to be read, and
    :class:`FileReadError` for one that is truncated or not a tensor/array file at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: not found")
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:  # numpy's words for an object array without allow_pickle
            if "allow_pickle" in str(exc):
                raise UnsafeFileError(
                    f"{what} {path}: a .npy file of Python objects, which would have to be "
                    "unpickled; expected a numeric array (save it with a numeric dtype, e.g. "
                    "np.save(path, array.astype(np.float32)))") from None
            raise FileReadError(f"{what} {path}: not a readable .npy array ({_describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - truncated or not a .npy file
            raise FileReadError(f"{what} {path}: not a readable .npy array ({_describe(exc)})") from None
    if trust_pickle:
        warnings.warn(f"mldecoder_fast: unpickling {path} in full (trust_pickle=True): this runs "
                      "any code the file contains; use it only for files from a source you trust",
                      UserWarning, stacklevel=2)
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise FileReadError(f"{what} {path}: cannot read it ({_describe(exc)})") from None
    allowed = _numpy_array_globals() if allow_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - classified below
        if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in str(exc):
            raise FileReadError(f"{what} {path}: not a readable PyTorch file, or a truncated one "
                                f"({_describe(exc)})") from None
        allowed_names = {name for item in allowed
                         for name in ([item[1]] if isinstance(item, tuple)
                                      else [f"{item.__module__}.{item.__qualname__}"])}
        unsafe = [g for g in _pickle_globals(path) if g not in allowed_names]
        if unsafe:
            why = f"reading it would import {', '.join(unsafe)}, which can run code"
        else:
            kinds = "tensors or a numeric array" if allow_numpy else "tensors and plain Python values"
            why = f"it cannot be read as {kinds} without full unpickling ({_describe(exc)})"
        convert = ("save it as a tensor (torch.save(torch.as_tensor(array), 'file.pt')) or a "
                   "numeric .npy (np.save)" if allow_numpy else
                   "re-save it with tensors and plain Python values only (e.g. "
                   "torch.save({'model': model.state_dict()}, 'file.pth'))")
        raise UnsafeFileError(
            f"{what} {path}: refused: {why}. To use it, {convert} where you trust it, or pass "
            "--trust-pickle (trust_pickle=True in Python) if you trust its source.") from None
