"""Reading checkpoints: one clear error per way a file can be wrong; written files are readable like any other."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from pretrain.backbones import build_resnet, trunk_state_dict
from pretrain.checkpoint import CheckpointError, make_meta, safe_torch_load, save_checkpoint


def test_text_file_renamed_pth_is_not_called_unsafe(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        safe_torch_load(path)
    assert "run code" not in str(info.value) and "starts with b'not a checkpoint'" in str(info.value)


def test_pickled_module_is_refused_naming_the_class_without_torch_advice(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        safe_torch_load(path)
    message = str(info.value)
    assert "torch.nn.modules.linear.Linear" in message
    assert "\x1b[" not in message and "weights_only` set to `False`" not in message  # no "load it unsafely" hint


def test_written_checkpoint_gets_the_usual_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "final.pth"
        save_checkpoint(path, trunk_state_dict(build_resnet("resnet18")), make_meta(arch="resnet18", method="random"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)  # an existing file keeps the mode it has
        save_checkpoint(path, trunk_state_dict(build_resnet("resnet18")), make_meta(arch="resnet18", method="random"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_bytes_overwritten_inside_a_tensor_are_refused_not_loaded_silently(tmp_path):
    """torch's zip reader skips CRCs; a checkpoint damaged in place (bad disk, copy over an old file) must not
    load with wrong weights."""
    path = tmp_path / "damaged.pth"
    save_checkpoint(path, trunk_state_dict(build_resnet("resnet18")), make_meta(arch="resnet18", method="random"))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the largest tensors, far from the zip directory at the end
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt \(checksum mismatch in .*\)\. Re-download"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="move it out"):
        safe_torch_load(path, damaged_hint="move it out")


def test_undamaged_checkpoint_still_loads_after_the_checksum_check(tmp_path):
    path = tmp_path / "ok.pth"
    trunk = trunk_state_dict(build_resnet("resnet18"))
    save_checkpoint(path, trunk, make_meta(arch="resnet18", method="random"))
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["backbone"]["layer4.1.conv2.weight"], trunk["layer4.1.conv2.weight"])
