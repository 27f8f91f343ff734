"""Read ``.pkl`` weight files without ever running code from them.

A pickle is a small program: every global it names is imported and may be called while it loads, so
``pickle.load`` on a downloaded file runs whatever its author wanted. Weight pickles (detectron2 model zoo
files, our own converter's output, plain dicts of numpy arrays) only ever need plain containers, numpy
arrays and numpy scalars. :class:`RestrictedUnpickler` resolves exactly those globals, to objects taken
from the installed numpy rather than imported by the name the file gives, and refuses every other
global before anything is called.

Names accepted for numpy, across versions:

* ``numpy.core.multiarray._reconstruct`` / ``.scalar`` (numpy 1.x, and Python 2 era files) and
  ``numpy._core.multiarray._reconstruct`` / ``.scalar`` (numpy 2.x);
* ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` (pickle protocol 5);
* ``numpy.ndarray``, ``numpy.dtype``;
* ``_codecs.encode`` with the latin-1 codec only (protocols 0-2 write ``bytes`` through it).

Files written by Python 2 store byte strings as ``str``; they are decoded with ``encoding="latin1"``,
which numpy understands when it rebuilds arrays (detectron2 reads its model zoo the same way).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.checkpoint import CheckpointError


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (loading it could run code)."""


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    """``name`` from the first of ``modules`` the installed numpy has, without deprecation shims."""
    for module in modules:
        parts = module.split(".")[1:]
        obj: Any = np
        try:
            for part in parts:
                obj = getattr(obj, part)
            return getattr(obj, name)
        except AttributeError:
            continue
    raise ImportError(f"numpy has no {name} in any of {modules}")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` as protocols 0-2 use it: text -> bytes via latin-1 only."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise ForbiddenGlobalError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1", errors)


def _build_allowlist() -> dict[tuple[str, str], Any]:
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    reconstruct = _numpy_attr(multiarray, "_reconstruct")
    scalar = _numpy_attr(multiarray, "scalar")
    frombuffer = _numpy_attr(numeric, "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "bytes"): bytes,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _build_allowlist()
# The numpy part, for torch files that store numpy arrays/scalars beside their tensors.
ALLOWED_NUMPY_GLOBALS = {key: obj for key, obj in _ALLOWED_GLOBALS.items() if key[0].startswith("numpy")}


def numpy_dtype_classes() -> list[type]:
    """The classes of numpy's dtype instances (``numpy.dtypes.Float32DType`` ... under numpy 2)."""
    return sorted({type(np.dtype(code)) for code in np.typecodes["All"]} - {np.dtype}, key=lambda c: c.__name__)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only plain containers and numpy arrays/scalars; see module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocols 0-2 write "__builtin__"); the base class would map them, we must too.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(f"global '{module}.{name}' is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenGlobalError(f"persistent id {str(pid)[:60]!r} is not allowed (not a plain pickle)")


def restricted_pickle_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; one :class:`CheckpointError` per failure."""
    if not data:
        raise CheckpointError(f"{source} is empty (0 bytes); was the run killed while saving?")
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ForbiddenGlobalError as err:
        raise CheckpointError(
            f"refusing to load {source}: it is not a plain weights pickle ({err}). Unpickling it could run "
            "code from the file; only dicts/lists of numpy arrays are accepted. Convert the weights from "
            "their original .pth instead, or re-save them as a dict of numpy arrays."
        ) from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"cannot read {source}: the pickle is truncated or corrupt ({type(err).__name__}: "
            f"{str(err)[:200]}). Re-download or re-create it."
        ) from err


def restricted_pickle_load(path: str | os.PathLike) -> Any:
    """Read a ``.pkl`` file without executing code from it (plain containers and numpy arrays only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, expected a file: {path}")
    return restricted_pickle_loads(path.read_bytes(), str(path))


def load_detectron2_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read a detectron2 weights pickle safely: ``{"model": {name: ndarray}, "__author__": ..., ...}``.

    Use this instead of detectron2's own ``pickle.load`` (which would run code from the file). Caffe2 /
    Detectron1 files (a flat dict of blobs, possibly under ``"blobs"``) are returned in the same shape
    detectron2 gives them: ``{"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}``.
    """
    data = restricted_pickle_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a detectron2 weights dict")
    if "model" in data and "__author__" in data:
        weights = data["model"]
    else:
        weights = data.get("blobs", data)
        weights = {k: v for k, v in weights.items() if not str(k).endswith("_momentum")}
        data = {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(weights).__name__}, expected a dict of arrays")
    bad = [k for k, v in weights.items() if not isinstance(v, np.ndarray) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(
            f"{path}: 'model' must map names to numpy arrays; {len(bad)} entries do not, e.g. {bad[:3]}"
        )
    return data


class _PortablePickler(pickle.Pickler):
    """Writes numpy arrays as ``numpy.ndarray(shape, dtype, bytearray)``.

    numpy's own reduction names ``numpy._core.multiarray._reconstruct`` under numpy 2, which numpy 1.x
    cannot import; ``numpy.ndarray`` and ``numpy.dtype`` exist under both, so the file loads wherever
    detectron2 runs (and through :class:`RestrictedUnpickler`). The bytearray keeps arrays writable.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            if obj.dtype.hasobject:
                raise pickle.PicklingError("object arrays cannot be written to a weights pickle")
            array = np.ascontiguousarray(obj)
            return np.ndarray, (array.shape, array.dtype, bytearray(array.tobytes()))
        return NotImplemented


def dumps_portable(obj: Any) -> bytes:
    """Pickle plain containers of numpy arrays so that numpy 1.x and 2.x (and our unpickler) can read them."""
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=4).dump(obj)
    return buffer.getvalue()
