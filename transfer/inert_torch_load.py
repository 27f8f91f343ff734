"""Load the weights of a ``torch.save`` file whose *other* entries hold arbitrary Python objects.

Many real checkpoints keep objects beside their weights: Lightning's ``hyper_parameters``
(``AttributeDict``, OmegaConf configs, paths), DINO's ``args`` (``argparse.Namespace``), custom config
classes. ``torch.load(weights_only=True)`` refuses such files as a whole, and ``weights_only=False``
would import and call whatever the file names. This module takes a third way: objects outside torch's
own weights-only allowlist (plus numpy arrays and scalars) become inert :class:`Placeholder` instances.
Nothing the file names is imported or called, so no code from the file runs; the tensors are rebuilt by
torch's usual loader (``torch.load`` with a restricted ``pickle_module``).

The unpickler below differs from ``pickle.Unpickler`` in two places only:

* ``find_class`` resolves torch's weights-only allowlist and the numpy allowlist of
  :mod:`transfer.safe_pickle`; every other name yields a fresh placeholder class (recorded);
* ``BUILD`` (setting an object's state) is allowed on placeholders, ``OrderedDict`` (state_dict
  ``_metadata``), tensors and numpy objects only, so a file cannot overwrite attributes of a class.

A file that names a function which only makes sense for running code (``os.system``, ``eval``, ...) is
refused as hostile rather than loaded, even though the placeholder would have been harmless.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError
from transfer.safe_pickle import ALLOWED_NUMPY_GLOBALS

_HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "marshal",
    "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal", "asyncio", "pdb", "timeit",
})
_HOSTILE_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals", "locals", "vars",
    "input", "breakpoint", "exit", "quit", "help", "memoryview",
})


class Placeholder(dict):
    """Stands in for an object the file describes but that is never built.

    It accepts any constructor arguments, items and state and keeps none of them (a dict subclass so
    that pickled dict subclasses such as Lightning's ``AttributeDict`` unpickle without error).
    """

    qualified_name = "?"
    dump_patches = False  # read by torch's legacy loader for pickled nn.Module classes

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualified_name}>"


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update({f"{module}.{name}": obj for (module, name), obj in ALLOWED_NUMPY_GLOBALS.items()})
    return allowed


class _InertUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    placeholders: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = _allowed_globals()
        self.placeholders = set()

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in self.allowed:
            return self.allowed[qualified]
        self.placeholders.add(qualified)
        return type(name, (Placeholder,), {"qualified_name": qualified, "__module__": __name__})

    def _load_build_restricted(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            return
        if type(inst) in (torch.Tensor, torch.nn.Parameter) or isinstance(inst, (np.ndarray, np.dtype, np.generic)):
            if type(inst) is torch.Tensor and isinstance(state, tuple):
                inst.set_(*state)
            else:
                inst.__setstate__(state)
            return
        if type(inst) is collections.OrderedDict and isinstance(state, dict):
            inst.__dict__.update({k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("__")})
            return
        raise pickle.UnpicklingError(f"refusing to set the state of a {type(inst).__name__}")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build_restricted


def _pickle_module(record: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module that torch.load's ``pickle_module`` argument accepts."""

    class Unpickler(_InertUnpickler):
        def load(self) -> Any:
            try:
                return super().load()
            finally:
                record.update(self.placeholders)

    module = types.ModuleType("masked_ssl_inert_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    module.UnpicklingError = pickle.UnpicklingError
    return module


def hostile_names(names: set[str]) -> list[str]:
    found = []
    for qualified in names:
        module, _, name = qualified.rpartition(".")
        if module.split(".")[0] in _HOSTILE_MODULES or (module == "builtins" and name in _HOSTILE_BUILTINS):
            found.append(qualified)
    return sorted(found)


def inert_torch_load(path: str | os.PathLike) -> tuple[Any, list[str]]:
    """``torch.load`` of ``path`` with foreign objects replaced by placeholders; returns (obj, their names)."""
    path = Path(path)
    record: set[str] = set()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(record))
    except Exception as err:  # noqa: BLE001 - any failure here means: this file cannot be read safely
        hostile = hostile_names(record)
        if hostile:
            raise _hostile_error(path, hostile) from err
        raise CheckpointError(f"cannot read {path} even with its Python objects left out "
                              f"({type(err).__name__}: {str(err)[:200]})") from err
    hostile = hostile_names(record)
    if hostile:
        raise _hostile_error(path, hostile)
    return obj, sorted(record)


def _hostile_error(path: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: while loading, it would call {', '.join(names[:5])}, which weights never "
        "need. Nothing from the file was run. The file is malformed or malicious; get the weights from a "
        "trusted source."
    )
