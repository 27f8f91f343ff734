"""The benchmark driver's orchestration: skip, resume, rerun on changed inputs, isolate failures.

These tests run the real driver (``transfer.benchmark.main``, and once ``python -m transfer.benchmark`` as
a subprocess that is killed), real random-init checkpoints, the real converter and the real tables, but
the transfer cells are run by ``tests/transfer/benchmark_stub_runner.py``: a test-only runner that speaks
the runners' command-line contract and writes SYNTHETIC records (protocol ``synthetic-driver-test``) so
that the driver's own behaviour is tested quickly and deterministically. The end-to-end test with the real
pretraining, detection and linear runners is ``test_benchmark_e2e.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from transfer import benchmark
from transfer.benchmark_state import fingerprint
from transfer.records import read_record, record_filename

REPO = Path(__file__).resolve().parents[2]
STUB = "tests.transfer.benchmark_stub_runner"


def stub_config(tmp: Path, slow_steps: int = 1, step_s: float = 0.0, extra_args: list[str] | None = None) -> Path:
    """A two-task matrix on stub runners: ``lin`` takes the checkpoint, ``det`` the converted .pkl."""
    config = {
        "preset": "stub",
        "data": {"root": str(tmp / "data")},
        "arch": "resnet18",
        "image_size": 64,
        "seeds": [0],
        "machine": {"jobs": 2},
        "tasks": {
            "det": {"kind": "detection", "module": STUB, "record_task": "voc_detection",
                    "protocol": "synthetic-driver-test", "args": ["--task-key", "voc_detection"]},
            "lin": {"kind": "linear", "module": STUB, "record_task": "logreg_caltech101",
                    "protocol": "synthetic-driver-test", "resume_args": ["--resume"],
                    "args": ["--task-key", "logreg_caltech101", "--steps", str(slow_steps), "--step-s", str(step_s),
                             *(extra_args or [])]},
        },
        "methods": {"random": {"source": "random_init", "base": "random"}},
    }
    (tmp / "data").mkdir(exist_ok=True)
    path = tmp / "stub.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def driver_args(tmp: Path, config: Path, *more: str) -> list[str]:
    return ["--config", str(config), "--runs-dir", str(tmp / "runs"), "--results-dir", str(tmp / "results"),
            "--quiet", *more]


def run(capsys, tmp: Path, config: Path, *more: str) -> tuple[int, str]:
    code = benchmark.main(driver_args(tmp, config, *more))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def record(tmp: Path, task: str, name: str, seed: int = 0) -> Path:
    return tmp / "results" / "records" / record_filename(task, name, seed)


def cell_status(tmp: Path, cell_slug: str) -> dict:
    return json.loads((tmp / "runs" / "cells" / f"{cell_slug}.json").read_text())


@pytest.fixture(scope="module")
def external_checkpoint(tmp_path_factory) -> Path:
    import torch

    from pretrain.backbones import build_resnet, trunk_state_dict
    from pretrain.checkpoint import make_meta, save_checkpoint

    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("external") / "third_party.pth"
    save_checkpoint(path, trunk_state_dict(build_resnet("resnet18")),
                    make_meta(arch="resnet18", method="external", image_size=64, seed=7))
    return path


@pytest.fixture(scope="module")
def finished_matrix(tmp_path_factory, external_checkpoint):
    """A complete stub matrix (random init + an external checkpoint, two tasks) and what the first run printed."""
    tmp = tmp_path_factory.mktemp("matrix")
    config = stub_config(tmp)
    code = benchmark.main(driver_args(tmp, config, "--checkpoint", str(external_checkpoint), "--name", "ext",
                                      "--methods", "random,ext"))
    assert code == 0
    return tmp


def copy_matrix(source: Path, target: Path) -> Path:
    """A copy of a finished matrix (big weights hard-linked: nothing rewrites them in place)."""

    def copy(src, dst):
        if Path(src).suffix in (".pth", ".pkl") and os.stat(src).st_dev == os.stat(target).st_dev:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    for name in ("runs", "results", "data"):
        shutil.copytree(source / name, target / name, copy_function=copy)
    for path in (target / "runs" / "cells").glob("*.json"):  # states name paths of the original: re-point them
        state = json.loads(path.read_text().replace(str(source), str(target)))
        state["fingerprint"] = fingerprint(state["inputs"])
        path.write_text(json.dumps(state))
    return stub_config(target)


def mtimes(tmp: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (tmp / "results" / "records").glob("*.json")}


# --------------------------------------------------------------------------------------- whole matrix


def test_matrix_writes_records_tables_and_figures_that_agree(finished_matrix):
    tmp = finished_matrix
    for name in ("random", "ext"):
        for task in ("logreg_caltech101", "voc_detection"):
            rec = read_record(record(tmp, task, name))
            assert rec["status"] == "ok" and rec["model"]["name"] == name
            assert rec["extra"]["preset"] == "stub" and rec["extra"]["synthetic"] is True
    det = read_record(record(tmp, "voc_detection", "ext"))
    assert det["weights"]["path"].endswith("detectron2.pkl")  # detection got the converted weights
    lin = read_record(record(tmp, "logreg_caltech101", "ext"))
    assert lin["weights"]["sha256"] == cell_status(tmp, "external__ext")["outputs"]["sha256"]
    tables = tmp / "results" / "tables"
    for key in "ABC":
        for suffix in ("csv", "md", "tex"):
            assert (tables / f"table_{key}.{suffix}").stat().st_size > 0
        assert (tmp / "results" / "figures" / f"table_{key}.png").stat().st_size > 0
    cells = __import__("pandas").read_csv(tables / "cells.csv")
    voc = cells[(cells.metric == "voc_AP50") & (cells.model == "ext")]
    assert voc["mean"].tolist() == [det["metrics"]["voc_AP50"]]
    assert "ext" in (tables / "table_A.md").read_text()
    summary = json.loads((tmp / "runs" / "summary.json").read_text())
    assert summary["counts"] == {"ok": len(summary["cells"])}
    assert (tmp / "results" / "README.md").is_file()


def test_rerun_skips_every_finished_cell(finished_matrix, tmp_path, capsys):
    config = copy_matrix(finished_matrix, tmp_path)
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, "--methods", "random")
    assert code == 0
    assert mtimes(tmp_path) == before
    assert "0 failed" in out and " 1 ran" in out  # only the tables are regenerated


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys, external_checkpoint):
    config = stub_config(tmp_path)
    code, out = run(capsys, tmp_path, config, "--dry-run", "--checkpoint", str(external_checkpoint), "--name", "ext",
                    "--methods", "*")
    assert code == 0
    for cell in ("random_init/random/seed0", "convert/random/seed0", "lin/random/seed0", "det/random/seed0",
                 "external/ext", "det/ext/seed0", "tables"):
        assert cell in out
    assert "--preset stub" in out and "--record" in out and "detectron2.pkl" in out
    assert "Nothing was run" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------- staleness, corruption


def test_corrupt_record_is_reported_moved_aside_and_recomputed(finished_matrix, tmp_path, capsys):
    config = copy_matrix(finished_matrix, tmp_path)
    bad = record(tmp_path, "logreg_caltech101", "random")
    bad.write_text('{"schema": "masked-ssl-record/v1", "status": "ok", "metr')
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, "--methods", "random", "--no-tables")
    assert code == 0
    assert "corrupt" in out and "lin · random" in out
    assert read_record(bad)["status"] == "ok"
    after = mtimes(tmp_path)
    assert after[bad.name] != before[bad.name]
    assert {k: v for k, v in after.items() if k != bad.name} == {k: v for k, v in before.items() if k != bad.name}
    kept = list((tmp_path / "runs" / "attic").rglob(bad.name))
    assert kept and "metr" in kept[0].read_text()


def test_a_record_of_other_weights_is_not_trusted(finished_matrix, tmp_path, capsys):
    config = copy_matrix(finished_matrix, tmp_path)
    path = record(tmp_path, "voc_detection", "random")
    forged = read_record(path)
    forged["weights"]["sha256"] = "0" * 64
    path.write_text(json.dumps(forged))
    code, out = run(capsys, tmp_path, config, "--methods", "random", "--only", "det", "--no-tables")
    assert code == 0 and "other weights" in out
    assert read_record(path)["weights"]["sha256"] != "0" * 64


def test_changed_inputs_rerun_exactly_their_cells(finished_matrix, tmp_path, capsys, external_checkpoint):
    config = copy_matrix(finished_matrix, tmp_path)
    both = ("--checkpoint", str(external_checkpoint), "--name", "ext", "--methods", "random,ext", "--no-tables")
    # 1. a changed task config (the preset's schedule for det): that task's cell reruns, nothing else
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, *both, "--only", "det", "--methods", "random",
                    "--set", "tasks.det.args=[--task-key,voc_detection,--steps,'2']")
    assert code == 0 and "inputs changed: args" in out
    after = mtimes(tmp_path)
    assert {n for n in before if after[n] != before[n]} == {record_filename("voc_detection", "random", 0)}
    # 2. a changed checkpoint behind the same name: its cells rerun, the other model's are kept
    from pretrain.checkpoint import load_checkpoint, save_checkpoint

    other = tmp_path / "other.pth"
    ckpt = load_checkpoint(external_checkpoint)
    save_checkpoint(other, {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["backbone"].items()},
                    ckpt["meta"])
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, "--checkpoint", str(other), "--name", "ext", "--methods", "random,ext",
                    "--only", "lin", "--no-tables")
    assert code == 0 and "inputs changed: weights_sha256" in out
    after = mtimes(tmp_path)
    assert {n for n in before if after[n] != before[n]} == {record_filename("logreg_caltech101", "ext", 0)}
    assert read_record(record(tmp_path, "logreg_caltech101", "ext"))["weights"]["sha256"] != \
        read_record(record(finished_matrix, "logreg_caltech101", "ext"))["weights"]["sha256"]


# ----------------------------------------------------------------------------------------- failures


def test_failing_cell_is_recorded_and_the_rest_continues(finished_matrix, tmp_path, capsys, external_checkpoint):
    copy_matrix(finished_matrix, tmp_path)
    cause = tmp_path / "cause.flag"
    cause.touch()
    config = stub_config(tmp_path, extra_args=["--fail-for", "random", "--fail-if-exists", str(cause)])
    choice = ("--checkpoint", str(external_checkpoint), "--name", "ext", "--methods", "random,ext", "--only", "lin")
    code, out = run(capsys, tmp_path, config, *choice)
    assert code == 1
    failed = read_record(record(tmp_path, "logreg_caltech101", "random"))
    assert failed["status"] == "failed" and "told to fail" in failed["error"]
    log = Path(failed["extra"]["log"])
    assert log.is_file() and "told to fail" in log.read_text()
    assert str(log) in out and "FAILED" in out and "1 failed" in out
    assert read_record(record(tmp_path, "logreg_caltech101", "ext"))["status"] == "ok"
    index = (tmp_path / "results" / "README.md").read_text()
    assert "Failed runs (no number; rerun them to fill the cell): 1" in index  # the tables say why it is empty
    # the cause is gone: the next run retries the failed cell only
    cause.unlink()
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, *choice, "--no-tables")
    assert code == 0 and "retry" in out
    after = mtimes(tmp_path)
    assert {n for n in before if after[n] != before[n]} == {record_filename("logreg_caltech101", "random", 0)}


def test_a_failed_checkpoint_blocks_its_cells(tmp_path, capsys):
    config = stub_config(tmp_path)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, out = run(capsys, tmp_path, config, "--checkpoint", str(broken), "--name", "broken", "--no-tables")
    assert code == 1
    assert "blocked" in out and "external · broken failed" in out
    for task in ("logreg_caltech101", "voc_detection"):
        blocked = read_record(record(tmp_path, task, "broken"))
        assert blocked["status"] == "failed" and blocked["error"].startswith("blocked:")
    state = cell_status(tmp_path, "external__broken")
    assert state["status"] == "failed" and "broken.pth" in state["error"]


# ------------------------------------------------------------------------------------ kill and resume


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_killed_run_resumes_and_skips_finished_cells(tmp_path, capsys):
    config = stub_config(tmp_path, slow_steps=5, step_s=0.7)
    choice = ("--jobs", "1", "--only", "lin", "--set", "seeds=[0,1]", "--no-tables")
    command = [sys.executable, "-m", "transfer.benchmark", *driver_args(tmp_path, config, *choice)]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = tmp_path / "runs" / "lin" / "random" / "seed1" / "progress.json"
    finished = record(tmp_path, "logreg_caltech101", "random", seed=0)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # wait until one cell is done and the next one is half-way
        if finished.exists() and progress.exists() and json.loads(progress.read_text())["step"] >= 2:
            break
        assert driver.poll() is None, driver.stdout.read().decode()
        time.sleep(0.1)
    else:
        pytest.fail("the matrix did not get going in time")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    driver.stdout.close()
    time.sleep(1.0)
    assert _processes_mentioning(str(tmp_path / "runs")) == []  # its children died with it
    done_at = finished.stat().st_mtime_ns
    assert cell_status(tmp_path, "lin__random__seed1")["status"] == "running"
    # the driver ran as a program, single-threaded: its cells started as forks of it (transfer.warm_start)
    assert "started as a fork of the driver" in (tmp_path / "runs" / "logs" / "lin__random__seed1.log").read_text()

    code, out = run(capsys, tmp_path, config, *choice)
    assert code == 0
    assert "resume" in out and "lin · random · seed 1" in out
    assert finished.stat().st_mtime_ns == done_at  # the finished cell was skipped
    resumed = read_record(record(tmp_path, "logreg_caltech101", "random", seed=1))
    assert resumed["status"] == "ok" and resumed["extra"]["resumed_from"] >= 2


# --------------------------------------------------------------------------------------- external


def test_external_checkpoint_adds_its_row_to_the_preset(finished_matrix, tmp_path, capsys, random_checkpoint_factory):
    config = copy_matrix(finished_matrix, tmp_path)
    mine = random_checkpoint_factory(seed=11, method="external")
    before = mtimes(tmp_path)
    code, out = run(capsys, tmp_path, config, "--checkpoint", str(mine), "--name", "mine", "--only", "lin")
    assert code == 0
    after = mtimes(tmp_path)
    assert {n for n in after if n not in before} == {record_filename("logreg_caltech101", "mine", 0)}
    assert all(after[n] == before[n] for n in before)  # the preset's other rows are untouched
    table = (tmp_path / "results" / "tables" / "table_A.md").read_text()
    assert "mine" in table and "ext" in table and "Random init" in table


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nosuchpreset"], "unknown preset"),
        (["--only", "segmentation-of-cats"], "--only: unknown word"),
        (["--methods", "nosuchmethod"], "matches no method"),
        (["--checkpoint", "x.pth"], "its --name"),
        (["--checkpoint", "/nonexistent/x.pth", "--name", "x"], "no such file"),
        (["--seeds", "three"], "--seeds expects"),
        (["--seeds", "0,0"], "a seed is listed twice"),
        (["--seeds=-1,2"], "seeds are non-negative"),
        (["--seeds", "0"], "one seed N alone: --seeds N,"),
        (["--set", "machine.job=4"], "unknown key 'machine.job'"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--gpus=-1"], "--gpus must be 0 or more"),
        (["--set", "seeds=[]"], "'seeds' must be a non-empty list"),
    ],
)
def test_bad_arguments_give_one_clear_error(tmp_path, capsys, args, message):
    config = stub_config(tmp_path)
    base = [] if args[0] == "--preset" else ["--config", str(config)]
    code = benchmark.main([*base, "--runs-dir", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--preset", "--data-root", "--gpus", "--seeds", "--checkpoint", "--name", "--only", "--methods",
                   "--dry-run", "--jobs", "--force"):
        assert option in text
