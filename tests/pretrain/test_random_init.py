"""The random-init sanity checkpoint: deterministic, in the suite format, refuses to clobber."""

from __future__ import annotations

import torch

from pretrain.checkpoint import load_checkpoint
from pretrain.random_init import main, random_init_checkpoint


def test_same_seed_same_weights_and_suite_metadata(tmp_path):
    a = random_init_checkpoint(tmp_path / "a.pth", "resnet18", seed=3)
    b = random_init_checkpoint(tmp_path / "b.pth", "resnet18", seed=3)
    c = random_init_checkpoint(tmp_path / "c.pth", "resnet18", seed=4)
    wa, wb, wc = (load_checkpoint(p)["backbone"] for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["conv1.weight"], wc["conv1.weight"])
    meta = load_checkpoint(a)["meta"]
    assert (meta["method"], meta["arch"], meta["seed"], meta["finished"]) == ("random", "resnet18", 3, True)
    assert meta["input_filter"] == {"name": "none"}


def test_global_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_init_checkpoint(tmp_path / "x.pth", "resnet18", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_cli_keeps_an_identical_file_and_refuses_a_different_one(tmp_path, capsys):
    out = tmp_path / "r.pth"
    assert main([str(out), "--arch", "resnet18", "--seed", "1"]) == 0
    before = out.stat().st_mtime_ns
    assert main([str(out), "--arch", "resnet18", "--seed", "1"]) == 0
    assert out.stat().st_mtime_ns == before, "an up-to-date file is not rewritten"
    assert main([str(out), "--arch", "resnet18", "--seed", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([str(out), "--arch", "resnet18", "--seed", "1", "--image-size", "64"]) == 2  # meta would lie
    assert "image size 64" in capsys.readouterr().err
    assert main([str(out), "--arch", "resnet18", "--seed", "2", "--force"]) == 0
    assert load_checkpoint(out)["meta"]["seed"] == 2


def test_cli_unwritable_output_is_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main([str(blocker / "r.pth"), "--arch", "resnet18"]) == 2  # its folder cannot be created
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and err.count("\n") == 1
    assert main([str(tmp_path), "--arch", "resnet18"]) == 2  # a directory: not writable as a file
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
