"""``python -m pretrain``: every failure is one line on stderr with an exit status, never a traceback."""

from __future__ import annotations

import os
import signal
import time

import pytest

import pretrain.engine
from pretrain.__main__ import main
from tests.pretrain.engine_helpers import TOY_CONFIGS

CONFIG = {p.stem: p for p in TOY_CONFIGS}


def test_unparsable_override_value_is_a_config_error(capsys):
    code = main([str(CONFIG["mocov2"]), "data.root=/x", "masking.query_ratio=[0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot parse the override 'masking.query_ratio=[0.1'")


def test_sigterm_during_training_is_reported_like_ctrl_c(monkeypatch, capsys, tmp_path):
    def train(cfg, force=False):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not stop training")

    monkeypatch.setattr(pretrain.engine, "train", train)
    before = signal.getsignal(signal.SIGTERM)
    command = [str(CONFIG["mocov2"]), f"data.root={tmp_path}", f"out_dir={tmp_path / 'run'}"]
    assert main(command) == 143
    assert capsys.readouterr().err == ("terminated (SIGTERM): nothing was checkpointed yet; rerunning the same "
                                       "command starts the run again\n")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler does not outlive the command
    (tmp_path / "run" / "checkpoint_last.pth").parent.mkdir()
    (tmp_path / "run" / "checkpoint_last.pth").write_bytes(b"x")
    assert main(command) == 143
    assert "rerun the same command to resume from the last checkpoint" in capsys.readouterr().err


def test_unwritable_out_dir_is_one_line(capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    code = main([str(CONFIG["mocov2"]), f"data.root={tmp_path}", f"out_dir={tmp_path / 'a_file' / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot create the run directory")


def test_why_a_run_stopped_is_also_in_its_log_file(capsys, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([str(CONFIG["mocov2"]), f"data.root={tmp_path / 'nope'}", f"out_dir={first}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data directory not found")
    assert err.strip() in (first / "log.txt").read_text()  # the run directory says why it holds no run
    # another run's failure goes to its own log only, never to a log this process opened before
    assert main([str(CONFIG["mocov2"]), f"data.root={tmp_path / 'nope2'}", f"out_dir={second}"]) == 2
    assert "nope2" not in (first / "log.txt").read_text()
    assert "nope2" in (second / "log.txt").read_text()


def test_no_config_file_says_so_not_that_overrides_are_required(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "no config file given" in err
    assert "arguments are required" not in err  # argparse's "required: config, key=value": overrides are not


def test_an_error_in_a_loader_worker_is_one_line_not_the_workers_traceback(monkeypatch, capsys, tmp_path):
    from torch.utils.data import DataLoader

    from pretrain.data import ImageFolderDataset, collate_samples

    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "train" / "a" / f"img_{i}.jpg").write_text("not an image")

    def train(cfg, force=False):  # what the training loop does with a split that is not made of images
        dataset = ImageFolderDataset(cfg.data.root, "train", lambda image: 0)
        next(iter(DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_samples)))

    monkeypatch.setattr(pretrain.engine, "train", train)
    assert main([str(CONFIG["mocov2"]), f"data.root={tmp_path}", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 consecutive images of ") and "cannot be read" in err
    assert err.count("\n") == 1 and "Traceback" not in err
