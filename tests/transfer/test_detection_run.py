"""Real detectron2 transfer runs on the toy world (micro schedule, a few iterations): records with
finite metrics from the evaluators, skipping finished runs, and resuming a run killed mid-training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.fileio import sha256_file
from transfer.detection import DetectionSetupError, run_detection
from transfer.records import TASKS, read_record, sha256_json

REPO = Path(__file__).resolve().parents[2]
RESUMABLE = ["SOLVER.MAX_ITER", "24", "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.PRECISE_BN.NUM_ITER", "2"]
SHORT = ["SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6,)", "SOLVER.WARMUP_ITERS", "2", "TEST.PRECISE_BN.NUM_ITER", "2"]


def assert_record(record: dict, task: str, weights: Path, max_iter: int):
    assert record["status"] == "ok" and record["task"] == task
    assert set(TASKS[task]) <= set(record["metrics"])
    for name, value in record["metrics"].items():
        assert math.isfinite(value) and 0.0 <= value <= 100.0, (name, value)
    assert record["weights"]["sha256"] == sha256_file(weights)
    assert record["config_hash"] == sha256_json(record["config"])
    assert record["config"]["detectron2"]["SOLVER"]["MAX_ITER"] == max_iter
    extra = record["extra"]
    assert extra["iteration"] == max_iter == extra["max_iter"]
    assert extra["weights_loaded"] == extra["conversion"]["verification"]["FPN"] == "backbone: 100/100 loaded"
    assert record["code_version"] and record["device"] and record["wall_time_s"] > 0
    assert record["protocol"].startswith("micro_")


@pytest.mark.slow
def test_toy_voc_run_writes_a_record_then_skips(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory()
    out = tmp_path / "voc"
    record = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT,
                           preset="test", progress=False)
    assert_record(record, "voc_detection", weights, 8)
    assert record["extra"]["preset"] == "test" and record["model"]["name"] == "random"
    assert set(record["extra"]["evaluator_results"]["bbox"]) == {"AP", "AP50", "AP75"}
    assert record["metrics"]["voc_AP50"] == pytest.approx(record["extra"]["evaluator_results"]["bbox"]["AP50"])
    assert read_record(out / "voc_detection__random__seed0.json") == record
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_final.pth"]

    again = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT)
    assert again["extra"]["skipped"] and again["metrics"] == record["metrics"]

    # --eval-only re-evaluates the trained model (precise-BN statistics are in model_final): same numbers
    evaluated = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT,
                              eval_only=True, force=False, record=tmp_path / "eval.json")
    assert evaluated["extra"]["eval_only"] and evaluated["extra"]["iteration"] == 8
    assert evaluated["metrics"] == pytest.approx(record["metrics"])


@pytest.mark.slow
def test_toy_coco_run_reports_bbox_and_segm(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory()
    record = run_detection("coco", weights, data_root=toy_world, config="micro", out=tmp_path / "coco",
                           overrides=SHORT, progress=False, keep_checkpoints="none")
    assert_record(record, "coco_instance", weights, 8)
    results = record["extra"]["evaluator_results"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results["bbox"]) & set(results["segm"])
    assert not list((tmp_path / "coco").glob("model_*.pth"))


def test_a_finished_record_for_other_inputs_is_not_overwritten(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory()
    out = tmp_path / "run"
    out.mkdir()
    fake = {"schema": "masked-ssl-record/v1", "status": "ok", "task": "voc_detection", "protocol": "x", "seed": 0,
            "model": {"name": "random"}, "weights": {"path": "w", "sha256": "other"},
            "metrics": {"voc_AP": 1.0, "voc_AP50": 2.0, "voc_AP75": 0.5}, "config_hash": "h"}
    (out / "voc_detection__random__seed0.json").write_text(json.dumps(fake))
    with pytest.raises(DetectionSetupError, match="--force"):
        run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT)


def _start_killable_run(weights: Path, toy_world: Path, out: Path, overrides=RESUMABLE) -> subprocess.Popen:
    command = [sys.executable, "-m", "transfer.detection", "--task", "voc", "--weights", str(weights),
               "--config", "micro", "--data-root", str(toy_world), "--out", str(out), "--no-progress",
               *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_final_iteration(toy_world, tmp_path, random_checkpoint_factory):
    weights = random_checkpoint_factory()
    out = tmp_path / "killed"
    process = _start_killable_run(weights, toy_world, out)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last_checkpoint").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not list(out.glob("voc_detection__*.json"))
    assert (out / (out / "last_checkpoint").read_text().strip()).is_file()
    overrides = RESUMABLE

    with pytest.raises(DetectionSetupError, match="--resume"):
        run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=overrides)
    record = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=overrides,
                           resume=True, progress=False)
    extra = record["extra"]
    assert extra["mode"] == "resume" and extra["resumed_from_iteration"] >= 4
    assert extra["iteration"] == extra["max_iter"] == 24
    assert all(math.isfinite(v) for v in record["metrics"].values())


@pytest.mark.slow
def test_sigterm_saves_the_step_in_progress_and_resume_continues_from_it(toy_world, tmp_path,
                                                                          random_checkpoint_factory):
    """A preempted job (SIGTERM to the whole process group) keeps its progress even with no periodic
    checkpoint yet."""
    weights = random_checkpoint_factory()
    out = tmp_path / "preempted"
    no_periodic = ["SOLVER.MAX_ITER", "24", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.PRECISE_BN.NUM_ITER", "2",
                   "DATALOADER.NUM_WORKERS", "1"]  # a worker gets the SIGTERM too: it must not break the step
    process = _start_killable_run(weights, toy_world, out, no_periodic)
    try:
        deadline = time.monotonic() + 240
        while "Starting training" not in ((out / "log.txt").read_text() if (out / "log.txt").exists() else ""):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "training did not start within 4 minutes"
            time.sleep(0.05)
        time.sleep(2.0)  # a few iterations in
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    err = err.decode()
    assert process.returncode == 143, err[-2000:]
    assert "stopping after the current step" in err and "Traceback" not in err
    assert "interrupted: no record written" in err.strip().splitlines()[-1]
    saved = (out / "last_checkpoint").read_text().strip()
    assert saved.startswith("model_") and (out / saved).is_file() and not list(out.glob("voc_detection__*.json"))
    stopped_at = 24 if saved == "model_final.pth" else int(saved[len("model_"):-len(".pth")]) + 1
    assert f"stopped after iteration {stopped_at} of 24" in err

    record = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=no_periodic,
                           resume=True, progress=False)
    assert record["extra"]["resumed_from"] == saved and record["extra"]["resumed_from_iteration"] == stopped_at
    assert record["extra"]["iteration"] == 24 and all(math.isfinite(v) for v in record["metrics"].values())


def test_record_metrics_come_from_the_evaluator_dict():
    from transfer.d2_run import record_metrics

    metrics, notes = record_metrics("voc_detection", {"bbox": {"AP": 10.5, "AP50": 20.25, "AP75": 5.0}})
    assert metrics == {"voc_AP": 10.5, "voc_AP50": 20.25, "voc_AP75": 5.0} and notes == []
    nan = float("nan")
    coco = {"bbox": {"AP": 3.0, "AP50": 9.0, "AP75": 1.0, "APs": 2.0, "APm": 4.0, "APl": nan},
            "segm": dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), nan)}
    metrics, notes = record_metrics("coco_instance", coco)
    assert metrics["coco_bbox_AP50"] == 9.0 and "coco_bbox_APl" not in metrics  # no large objects: left out
    assert metrics["coco_segm_AP"] == 0.0 and len(notes) == 1 and "no detections" in notes[0]
    with pytest.raises(ValueError, match="segm"):
        record_metrics("coco_instance", {"bbox": coco["bbox"]})


@pytest.mark.slow
def test_a_forced_rerun_killed_before_its_record_does_not_leave_the_old_one_to_be_skipped(
        toy_world, tmp_path, random_checkpoint_factory):
    from transfer.detection import plan_detection

    weights = random_checkpoint_factory()
    out = tmp_path / "voc"
    record = run_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT,
                           progress=False)
    record_path = Path(record["extra"]["record_path"])
    assert record["extra"]["resumed_from_iteration"] == 0  # a fresh run says so, like a resumed one
    # what `--force` does before it trains: if it is killed now, the next plain run must not skip
    plan_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT, force=True)
    assert not record_path.exists() and not (out / "model_final.pth").exists()
    plan, existing = plan_detection("voc", weights, data_root=toy_world, config="micro", out=out, overrides=SHORT)
    assert existing is None and plan.mode == "train"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_killed_command_says_how_to_continue_in_one_line(monkeypatch, capsys, tmp_path, signum):
    from transfer.detection import main

    def killed_mid_run(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr("transfer.detection.run_detection", killed_mid_run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--task", "voc", "--weights", str(tmp_path / "w.pth")]) == (143 if signum == signal.SIGTERM else 130)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: no record written; rerun the same command with --resume")
    assert signal.getsignal(signal.SIGTERM) == before
