"""What a new invocation does with a run directory: resume=PATH, --force and unusable out_dir are clear errors."""

from __future__ import annotations

import pytest

from pretrain import rundir
from pretrain.backbones import build_resnet, trunk_state_dict
from pretrain.checkpoint import make_meta, save_checkpoint

CONFIG = {"method": "mocov2", "seed": 0, "out_dir": "somewhere", "train": {"epochs": 2}}


def _last(path, config=CONFIG):
    meta = make_meta(arch="resnet18", method="mocov2", config=config, epoch=1, finished=False)
    save_checkpoint(path, trunk_state_dict(build_resnet("resnet18")), meta, training={"epoch": 1})
    return path


def test_resume_path_with_another_config_is_refused_naming_the_keys(tmp_path):
    last = _last(tmp_path / "old" / "checkpoint_last.pth")
    decision = rundir.decide(tmp_path / "new", {**CONFIG, "out_dir": "elsewhere"}, str(last), force=False)
    assert decision.action == "resume" and decision.checkpoint == last  # runtime keys may differ
    with pytest.raises(rundir.RunDirError, match=r"cannot resume from .*the config differs \(seed: 0 -> 5\)"):
        rundir.decide(tmp_path / "new", {**CONFIG, "seed": 5}, str(last), force=False)


def test_resume_path_that_is_not_a_suite_checkpoint_is_a_run_dir_error(tmp_path):
    (tmp_path / "notes.pth").write_text("hello\n")
    with pytest.raises(rundir.RunDirError, match="cannot resume from .*not a PyTorch checkpoint"):
        rundir.decide(tmp_path / "new", CONFIG, str(tmp_path / "notes.pth"), force=False)


def test_resume_path_of_a_foreign_torch_file_says_what_resume_takes(tmp_path):
    import torch

    torch.save(build_resnet("resnet18").state_dict(), tmp_path / "torchvision.pth")
    with pytest.raises(rundir.RunDirError, match="checkpoint_last.pth of an interrupted") as caught:
        rundir.decide(tmp_path / "run", CONFIG, str(tmp_path / "torchvision.pth"), force=False)
    assert "transfer.convert" not in str(caught.value)  # converting would not make it resumable


def test_force_does_not_delete_the_checkpoint_it_is_asked_to_resume_from(tmp_path):
    out = tmp_path / "run"
    last = _last(out / rundir.LAST)
    with pytest.raises(rundir.RunDirError, match="would delete resume="):
        rundir.decide(out, CONFIG, str(last), force=True)
    assert last.exists()


def test_out_dir_that_is_a_file_or_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(rundir.RunDirError, match="is a file, not a directory"):
        rundir.decide(blocker, CONFIG, "auto", force=False)
    with pytest.raises(rundir.RunDirError, match="cannot create the run directory"):
        rundir.decide(blocker / "run", CONFIG, "auto", force=False)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", None], ids=["empty", "truncated", "foreign"])
def test_damaged_or_foreign_checkpoint_in_the_run_dir_says_how_to_start_again_and_is_kept(tmp_path, content):
    import torch

    out = tmp_path / "run"
    out.mkdir()
    last = out / rundir.LAST
    if content is None:
        torch.save({"weight": torch.zeros(2)}, last)
    else:
        last.write_bytes(content)
    with pytest.raises(rundir.RunDirError, match=r"move checkpoint_last.pth out of .*run .*or pass --force") as caught:
        rundir.decide(out, CONFIG, "auto", force=False)
    message = str(caught.value)
    # not the fixes for a downloaded or third-party file, and no "saving?." punctuation
    assert "Re-download" not in message and "transfer.convert" not in message and "?." not in message
    assert last.exists()  # refusing loses nothing
