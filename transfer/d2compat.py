"""Make the pure-Python detectron2 v0.6 package usable with current numpy, Pillow and torch.

On platforms without a detectron2 wheel the suite installs the Python files of detectron2 v0.6 (see
``scripts/install_detectron2.py``). Three gaps keep that package from importing and training:

* numpy >= 1.24 removed the aliases ``np.int``, ``np.float``, ``np.str``, ``np.object`` and ``np.bool``
  that v0.6 still uses (VOC loader and evaluator, mask structures, dataset statistics);
* Pillow >= 10 removed ``Image.LINEAR`` (used as a default argument in ``data/transforms``);
* the compiled extension ``detectron2._C`` is missing. Only rotated boxes, deformable convolution and the
  fast COCO evaluation use it; the suite uses none of them (``COCOEvaluator(use_fast_impl=False)``).

:func:`apply` bridges exactly these gaps and nothing else. Each patch is added only when the thing it
stands in for is absent, so with a from-source detectron2 build (real ``_C``) and older libraries it does
nothing. A call into the placeholder ``_C`` raises :class:`MissingCompiledOpError` naming the op.

Import detectron2 through :func:`import_detectron2` (or call :func:`apply` first) everywhere in the suite.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

__all__ = ["MissingCompiledOpError", "apply", "import_detectron2", "has_compiled_ops", "patches_applied"]

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "object": object, "bool": bool}
_applied: list[str] = []


class MissingCompiledOpError(RuntimeError):
    """A detectron2 C++/CUDA op was called but this detectron2 has no compiled extension."""


class _MissingCompiledOps(types.ModuleType):
    """Stands in for ``detectron2._C``: importable, but every op raises a clear error when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing_op(*args, **kwargs):
            raise MissingCompiledOpError(
                f"detectron2 C++ op '{name}' is not available: this detectron2 is the pure-Python package "
                "without its compiled extension (detectron2._C). Build detectron2 from source to use it "
                "(README, section 'Detectron2 from source (GPU)')."
            )

        missing_op.__name__ = name
        return missing_op


def _patch_numpy() -> None:
    import numpy as np

    for name, builtin in _NUMPY_ALIASES.items():
        if name not in vars(np):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                available = hasattr(np, name)
            if not available:
                setattr(np, name, builtin)
                _applied.append(f"numpy.{name}")


def _patch_pillow() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.Resampling.BILINEAR
        _applied.append("PIL.Image.LINEAR")


def _compiled_extension_present() -> bool:
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except ModuleNotFoundError:
        return False


def _install_placeholder_extension() -> None:
    if "detectron2._C" in sys.modules or _compiled_extension_present():
        return
    placeholder = _MissingCompiledOps("detectron2._C", "placeholder installed by transfer.d2compat")
    placeholder.__spec__ = importlib.util.spec_from_loader("detectron2._C", loader=None)
    sys.modules["detectron2._C"] = placeholder
    _applied.append("detectron2._C (placeholder)")


def apply() -> list[str]:
    """Apply the bridges that this environment needs (idempotent); return what was patched."""
    if not _applied:
        _patch_numpy()
        _patch_pillow()
        if importlib.util.find_spec("detectron2") is not None:
            _install_placeholder_extension()
        _applied.append("")  # marks "done" even when nothing needed patching
    return [p for p in _applied if p]


def patches_applied() -> list[str]:
    return [p for p in _applied if p]


def has_compiled_ops() -> bool:
    """True when detectron2's real compiled extension is importable."""
    module = sys.modules.get("detectron2._C")
    if isinstance(module, _MissingCompiledOps):
        return False
    return _compiled_extension_present()


def silence_import_warnings() -> None:
    """Hide the deprecation warnings detectron2 v0.6 triggers at import time (pkg_resources,
    torch.jit.script): they are not the user's concern in a command-line run."""
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def import_detectron2() -> types.ModuleType:
    """Apply the bridges and import detectron2, or fail with instructions if it is not installed."""
    apply()
    try:
        return importlib.import_module("detectron2")
    except ModuleNotFoundError as err:
        if err.name != "detectron2":
            raise
        raise ModuleNotFoundError(
            "detectron2 is not installed in this environment. Run `bash scripts/setup_env.sh` (CPU, "
            "pure-Python package) or build it from source (README, 'Detectron2 from source (GPU)')."
        ) from err
