"""The detectron2 compatibility layer bridges exactly the known gaps, and nothing where none exist."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import transfer.d2compat as d2compat

REPO = Path(__file__).resolve().parents[2]


def test_apply_makes_detectron2_importable_with_clear_missing_ops():
    d2 = d2compat.import_detectron2()
    assert d2.__version__.startswith("0.6")
    for alias in ("int", "float", "str", "object", "bool"):
        assert hasattr(np, alias)
    from PIL import Image

    assert hasattr(Image, "LINEAR")
    from detectron2 import _C
    from detectron2.layers import deform_conv  # imports `from detectron2 import _C` at module level

    if d2compat.has_compiled_ops():  # a from-source build: the real extension must be untouched
        assert not isinstance(_C, d2compat._MissingCompiledOps)
        return
    with pytest.raises(d2compat.MissingCompiledOpError, match=r"'deform_conv_forward'.*from source"):
        _C.deform_conv_forward(None)
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(d2compat.MissingCompiledOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(None, None)
    assert deform_conv.DeformConv is not None


def test_apply_is_idempotent():
    first = d2compat.apply()
    assert d2compat.apply() == first


def _run(code: str, extra_path: Path) -> str:
    script = f"import sys; sys.path[:0] = [{str(extra_path)!r}, {str(REPO)!r}]\n" + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_does_nothing_where_detectron2_has_its_compiled_extension(tmp_path: Path):
    fake = tmp_path / "detectron2"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = 'from-source'\n")
    (fake / "_C.py").write_text("def deform_conv_forward(*a):\n    return 'real op'\n")
    out = _run(
        """
        import transfer.d2compat as c
        patched = c.apply()
        from detectron2 import _C
        print(_C.deform_conv_forward(), c.has_compiled_ops(), any('_C' in p for p in patched))
        """,
        tmp_path,
    )
    assert out == "real op True False"


def test_keeps_existing_library_attributes(tmp_path: Path):
    out = _run(
        """
        import numpy as np
        from PIL import Image
        sentinel = object()
        np.int = sentinel
        Image.LINEAR = 'kept'
        import transfer.d2compat as c
        patched = c.apply()
        print(np.int is sentinel, Image.LINEAR, 'numpy.int' in patched)
        """,
        tmp_path,
    )
    assert out == "True kept False"


def test_missing_detectron2_gives_install_instructions(tmp_path: Path):
    blocker = tmp_path / "detectron2.py"
    blocker.write_text("raise ModuleNotFoundError('No module named detectron2', name='detectron2')\n")
    script = (
        f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]\n"
        "import transfer.d2compat as c\n"
        "try:\n    c.import_detectron2()\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "setup_env.sh" in proc.stdout and "from source" in proc.stdout
