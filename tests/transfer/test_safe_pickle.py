"""The restricted unpickler reads real numpy pickles (numpy 1.x and 2.x names, every protocol) and
refuses anything that could run code, without running it."""

from __future__ import annotations

import os
import pickle
import pickletools

import numpy as np
import pytest

from pretrain.checkpoint import CheckpointError
from transfer.safe_pickle import (
    dumps_portable,
    load_detectron2_pickle,
    restricted_pickle_load,
    restricted_pickle_loads,
)


def _weights() -> dict:
    rng = np.random.default_rng(0)
    return {
        "stem.conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "counter": np.arange(5, dtype=np.int64),
        "half": rng.standard_normal(3).astype(np.float16),
        "big_endian": np.arange(3, dtype=">f4"),
        "empty": np.zeros((0, 2), np.float32),
        "scalar": np.float32(1.5),
        "nested": {"flags": np.array([True, False]), "list": [1, 2.5, "x", None]},
    }


def _assert_same(loaded: dict, original: dict) -> None:
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        if isinstance(value, dict):
            _assert_same(loaded[key], value)
        elif isinstance(value, np.ndarray | np.generic):
            # numpy itself stores non-native byte order as native below protocol 5: compare kinds and values
            assert loaded[key].dtype.newbyteorder("=") == value.dtype.newbyteorder("="), key
            assert np.array_equal(loaded[key], value), key
        else:
            assert loaded[key] == value


def _as_numpy1(data: bytes) -> bytes:
    """Rewrite a numpy-2 pickle as numpy 1.x writes it (``numpy.core`` instead of ``numpy._core``).

    Rebuilt opcode by opcode: FRAME opcodes are dropped (they are optional) so the changed string
    lengths stay consistent."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    for index, (opcode, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
        raw = data[pos:end]
        if opcode.name == "FRAME":
            continue
        if opcode.name == "SHORT_BINUNICODE" and isinstance(arg, str) and arg.startswith("numpy._core"):
            text = arg.replace("numpy._core", "numpy.core").encode()
            raw = bytes([raw[0], len(text)]) + text
        elif opcode.name == "GLOBAL":
            raw = raw.replace(b"numpy._core", b"numpy.core")
        out += raw
    return bytes(out)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reads_numpy_pickles_of_every_protocol(protocol):
    original = _weights()
    _assert_same(restricted_pickle_loads(pickle.dumps(original, protocol=protocol)), original)


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_numpy1_pickles(protocol):
    data = _as_numpy1(pickle.dumps(_weights(), protocol=protocol))
    assert b"numpy.core" in data and b"numpy._core" not in data
    _assert_same(restricted_pickle_loads(data), _weights())


def test_portable_dump_loads_everywhere_and_names_no_private_numpy_module():
    weights = {k: v for k, v in _weights().items() if isinstance(v, np.ndarray)}
    data = dumps_portable({"model": weights, "__author__": "test"})
    assert b"numpy._core" not in data and b"numpy.core" not in data
    for loaded in (restricted_pickle_loads(data), pickle.loads(data)):
        _assert_same(loaded["model"], weights)
        assert all(array.flags.writeable for array in loaded["model"].values())


class _Payload:
    """Unpickling this calls ``os.mkdir(flag)``: the side effect the tests look for."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return os.mkdir, (self.flag,)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    flag = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Payload(flag)}, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"not allowed.*could run code|could run code") as info:
        restricted_pickle_load(path)
    assert "posix.mkdir" in str(info.value) or "os.mkdir" in str(info.value) or "nt.mkdir" in str(info.value)
    assert not flag.exists()


def test_only_latin1_codec_is_allowed():
    data = b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x06\x00\x00\x00base64tR."
    with pytest.raises(CheckpointError, match="not allowed"):
        restricted_pickle_loads(data)


def test_truncated_pickle_is_reported_as_corrupt_not_as_unsafe(tmp_path):
    data = pickle.dumps(_weights(), protocol=4)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        restricted_pickle_load(path)
    assert "could run code" not in str(info.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        restricted_pickle_load(tmp_path / "empty.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        restricted_pickle_load(tmp_path / "missing.pkl")


def test_load_detectron2_pickle_formats(tmp_path):
    zoo = tmp_path / "zoo.pkl"
    zoo.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.ones(2)}, "__author__": "x"}, protocol=2))
    assert load_detectron2_pickle(zoo)["__author__"] == "x"
    caffe2 = tmp_path / "caffe2.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones(2), "conv1_w_momentum": np.ones(2)}}))
    data = load_detectron2_pickle(caffe2)
    assert data["__author__"] == "Caffe2" and list(data["model"]) == ["conv1_w"]
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"model": {"w": [1, 2]}, "__author__": "x"}))
    with pytest.raises(CheckpointError, match="numpy arrays"):
        load_detectron2_pickle(bad)


class _Python2Pickler(pickle._Pickler):
    """Writes byte strings the way Python 2 wrote ``str`` (BINSTRING opcodes), as in old model-zoo files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        import struct

        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_reads_python2_era_pickles():
    import io

    weights = {"res2.0.conv1.weight": np.arange(300, dtype=np.float32).reshape(3, 100), "counter": np.int64(3)}
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({"model": {k.encode(): v for k, v in weights.items()}, "__author__": b"MSRA"})
    data = buffer.getvalue().replace(b"numpy._core", b"numpy.core")
    assert b"_codecs" not in data and b"numpy.core.multiarray" in data
    loaded = restricted_pickle_loads(data)
    assert loaded["__author__"] == "MSRA" and set(loaded["model"]) == set(weights)
    assert np.array_equal(loaded["model"]["res2.0.conv1.weight"], weights["res2.0.conv1.weight"])
