"""The benchmark matrix: which cells the presets hold, their commands (the parts' contract), the verdicts."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from transfer.benchmark_config import BenchmarkConfigError, config_path_for, load_benchmark_config
from transfer.benchmark_kinds import KINDS
from transfer.benchmark_plan import Selection, build_plan, forced_cells
from transfer.benchmark_progress import Progress
from transfer.benchmark_report import matrix_text
from transfer.benchmark_state import CellState, Problem, decide, fingerprint
from transfer.benchmark_workspace import Workspace
from transfer.records import TASKS
from transfer.table_layout import TABLES

TOY_METHODS = {
    "supervised", "mocov2", "mocov2_mscn", "mocov2_adios", "mocov2_hp", "mocov2_blur", "mocov2_mean",
    "mocov2_hp_key", "mocov2_blur_key", "mocov2_mean_key", "simclr", "simclr_mscn", "simclr_adios", "simclr_hp",
    "simclr_blur", "simclr_mean", "random",
}
ALL_TASKS = {"voc", "coco", "imagenet100", "caltech101", "flowers102"}


def preset(name: str, *overrides: str):
    return load_benchmark_config(config_path_for(name), list(overrides))


def kinds(plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cell in plan:
        counts[cell.kind] = counts.get(cell.kind, 0) + 1
    return counts


@pytest.mark.parametrize("name", ["toy", "paper"])
def test_presets_hold_every_row_of_the_paper_tables_and_every_task(name):
    config = preset(name)
    assert set(config.methods) == TOY_METHODS
    assert set(config.tasks) == ALL_TASKS
    assert {task.record_task for task in config.tasks.values()} == set(TASKS)  # every table column is fed
    plan = build_plan(config)
    tasks_of = {m: {c.task for c in plan if c.method == m and c.task} for m in config.methods}
    for method, tasks in tasks_of.items():
        expected = {"imagenet100"} if method.endswith("_key") else ALL_TASKS
        assert tasks == expected, method
    # the rows land where the tables expect them: key-branch rows in Table C, one row per masking strategy
    key_rows = [m for m in config.methods.values() if m.model.get("mask_branch") == "key"]
    assert {m.model["strategy"] for m in key_rows} == {"hp", "blur", "mean"}
    assert TABLES["C"].tasks == ("linear_imagenet100",)
    assert list(plan.cells)[-1] == "tables"
    assert config.methods["random"].source == "random_init"


def test_toy_plan_shape_and_order():
    config = preset("toy")
    plan = build_plan(config)
    assert kinds(plan) == {"data": 1, "pretrain": 16, "random_init": 1, "convert": 14, "detection": 28,
                           "linear": 45, "pictures": 3, "tables": 1}
    ids = list(plan.cells)
    # model-major: a model's checkpoint, then its conversion and transfer cells, before the next model
    assert ids.index("pretrain/mocov2/seed0") < ids.index("voc/mocov2/seed0") < ids.index("pretrain/mocov2_mscn/seed0")
    cell = plan.cells["voc/mocov2_hp/seed0"]
    assert cell.deps == ("data", "convert/mocov2_hp/seed0") and cell.model_cell == "pretrain/mocov2_hp/seed0"
    assert plan.cells["imagenet100/mocov2_hp/seed0"].deps == ("data", "pretrain/mocov2_hp/seed0")
    assert set(plan.cells["tables"].deps) == set(ids[:-1])


def test_only_and_methods_select_tasks_and_keep_what_they_need():
    config = preset("toy")
    plan = build_plan(config, Selection(only=["linear"], methods=["mocov2*"]))
    assert {c.kind for c in plan} == {"data", "pretrain", "linear", "tables"}
    assert {c.method for c in plan if c.method} == {m for m in TOY_METHODS if m.startswith("mocov2")}
    assert {c.task for c in plan if c.task} == {"imagenet100", "caltech101", "flowers102"}
    plan = build_plan(config, Selection(only=["voc"], methods=["random"]))
    assert list(plan.cells) == ["data", "random_init/random/seed0", "convert/random/seed0", "voc/random/seed0",
                                "tables"]
    assert list(build_plan(config, Selection(only=["tables"])).cells) == ["tables"]
    pretrain_only = build_plan(config, Selection(only=["pretrain"]))
    assert {c.kind for c in pretrain_only} == {"data", "pretrain", "random_init", "tables"}
    with pytest.raises(BenchmarkConfigError, match="matches no method"):
        build_plan(config, Selection(methods=["byol"]))


def test_a_selection_of_no_cell_is_refused_naming_what_the_methods_run():
    config = preset("toy")
    with pytest.raises(BenchmarkConfigError, match="select no cell") as err:
        build_plan(config, Selection(only=["voc"], methods=["mocov2_hp_key"]))  # a Table C row: ImageNet-100 only
    assert "mocov2_hp_key: imagenet100" in str(err.value)
    assert list(build_plan(config, Selection(only=["tables"], methods=["mocov2_hp_key"])).cells) == ["tables"]


@pytest.mark.parametrize("override, message", [
    ("machine.job=4", "unknown key 'machine.job'; machine takes: jobs, gpus, env"),
    ("seed=[1]", "unknown key 'seed'"),
    ("tasks.voc.arg=[x]", "unknown key 'tasks.voc.arg'"),
    ("methods.random.sorce=external", "unknown key 'methods.random.sorce'"),
])
def test_a_misspelt_key_is_an_error_not_ignored(override, message):
    with pytest.raises(BenchmarkConfigError, match=message):
        preset("toy", override)


def test_machine_env_reaches_every_cell_but_the_users_own_setting_wins(monkeypatch):
    from transfer.benchmark_runner import cell_environment

    config = preset("toy")
    assert config.env == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    env = cell_environment(1, config.env)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(BenchmarkConfigError, match="machine.env must map environment variable names"):
        preset("toy", "machine.env={FOO: [1, 2]}")


def test_warm_start_is_on_by_default_and_can_be_turned_off():
    assert preset("toy").warm_start is True
    assert preset("toy", "machine.warm_start=false").warm_start is False
    with pytest.raises(BenchmarkConfigError, match="machine.warm_start must be true or false"):
        preset("toy", "machine.warm_start=1")


def test_stop_grace_is_configurable_and_must_be_positive():
    assert preset("toy").stop_grace_s == 20.0
    assert preset("toy", "machine.stop_grace_s=120").stop_grace_s == 120.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(BenchmarkConfigError, match="machine.stop_grace_s must be a number of seconds > 0"):
            preset("toy", f"machine.stop_grace_s={bad}")


def test_a_cell_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    import subprocess
    import sys
    import time

    from transfer.benchmark_runner import Runner, _Running

    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout.readline().strip() == b"up"
    runner = Runner.__new__(Runner)
    runner.stop_grace_s = 0.5
    started = time.monotonic()
    runner._terminate(_Running(None, None, process, None, started, time.time(), None))
    assert process.returncode == -9 and 0.4 < time.monotonic() - started < 10
    process.stdout.close()


def test_a_misspelt_key_in_the_file_is_an_error(tmp_path):
    text = config_path_for("mini").read_text().replace("machine:\n  jobs:", "machine:\n  job:", 1)
    assert "  job:" in text
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(BenchmarkConfigError, match="unknown key 'machine.job'"):
        load_benchmark_config(tmp_path / "typo.yaml")


def test_summary_matrix_columns_line_up_for_short_method_names():
    config = preset("toy")
    config.methods = {"rnd": dataclasses.replace(config.methods["random"], name="rnd")}
    lines = matrix_text({}, build_plan(config, Selection(only=["voc", "caltech101"]))).splitlines()
    header, row = lines[1], lines[2]
    assert header.split() == ["method", "model", "convert", "voc", "caltech101"] and row.split()[0] == "rnd"
    assert row.index("-") == header.index("model")  # the row's first cell sits under its column


def test_force_reruns_the_selected_cells_not_the_checkpoints_they_need():
    config = preset("toy")
    selection = Selection(only=["caltech101"], methods=["mocov2"])
    plan = build_plan(config, selection)
    assert forced_cells(plan, config, selection) == {"caltech101/mocov2/seed0"}
    everything = Selection(methods=["mocov2"])
    forced = forced_cells(build_plan(config, everything), config, everything)
    assert "pretrain/mocov2/seed0" in forced and "data" not in forced and "tables" not in forced


def test_seeds_multiply_transfer_cells_and_optionally_pretraining():
    config = preset("paper", "seeds=[0,1,2]")
    plan = build_plan(config, Selection(methods=["mocov2"]))
    assert kinds(plan) == {"pretrain": 1, "convert": 1, "detection": 6, "linear": 9, "tables": 1}
    config = preset("paper", "seeds=[0,1]", "pretrain_per_seed=true")
    plan = build_plan(config, Selection(methods=["mocov2"], only=["voc"]))
    assert plan.cells["voc/mocov2/seed1"].model_cell == "pretrain/mocov2/seed1"
    assert kinds(plan)["pretrain"] == 2


def workspace(config, tmp_path: Path, gpus: int = 1) -> Workspace:
    return Workspace(config=config, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results",
                     data_root=tmp_path / "data", gpus=gpus)


def expected_deps(plan, cell, ws):
    ids = [*cell.deps, *([cell.model_cell] if cell.model_cell else [])]
    return {i: KINDS[plan.cells[i].kind].expected_outputs(plan.cells[i], ws) for i in ids}


def test_commands_follow_the_parts_contract(tmp_path):
    config = preset("paper")
    plan = build_plan(config, Selection(methods=["mocov2_hp"]))
    ws = workspace(config, tmp_path)
    command = {cid: KINDS[c.kind].command(c, ws, expected_deps(plan, c, ws)) for cid, c in plan.cells.items()
               if not KINDS[c.kind].runs_in_process(ws)}
    pre = command["pretrain/mocov2_hp/seed0"]
    assert pre[1:4] == ["-m", "pretrain", "configs/pretrain/paper/mocov2_hp.yaml"]
    assert f"out_dir={tmp_path}/runs/pretrain/mocov2_hp/seed0" in pre and "resume=auto" in pre
    assert f"data.root={tmp_path}/data/imagenet100" in pre and "seed=0" in pre
    voc = command["voc/mocov2_hp/seed0"]
    assert voc[1:3] == ["-m", "transfer.detection"]
    flags = dict(zip(voc[3::2], voc[4::2]))
    assert flags["--weights"].endswith("convert/mocov2_hp/seed0/detectron2.pkl")
    assert flags["--name"] == "mocov2_hp" and flags["--preset"] == "paper" and flags["--seed"] == "0"
    assert flags["--record"] == f"{tmp_path}/results/records/voc_detection__mocov2_hp__seed0.json"
    assert "--resume" in voc
    assert voc[-4:] == ["--task", "voc", "--config", "configs/detection/voc07+12_faster_rcnn_C4_24k.yaml"]
    lin = command["caltech101/mocov2_hp/seed0"]
    assert lin[lin.index("--weights") + 1].endswith("pretrain/mocov2_hp/seed0/final.pth")
    assert lin[lin.index("--cache-dir") + 1] == f"{tmp_path}/runs/features"  # placeholders filled in
    assert "pictures/mocov2_hp" not in command  # copied from the run dir inside the driver


def _last_epochs(command: list[str]) -> int:
    return int([arg for arg in command if arg.startswith("train.epochs=")][-1].split("=")[1])


def test_toy_supervised_row_gets_the_image_passes_of_the_ssl_rows(tmp_path):
    # One view per image against the SSL rows' two: the method's override comes after the preset's schedule.
    config = preset("toy")
    plan = build_plan(config, Selection(methods=["supervised", "mocov2"]))
    ws = workspace(config, tmp_path)
    epochs = {m: _last_epochs(KINDS["pretrain"].command(plan.cells[f"pretrain/{m}/seed0"], ws, {}))
              for m in ("supervised", "mocov2")}
    assert epochs == {"supervised": 6, "mocov2": 3}


def test_several_gpus_launch_torchrun_and_detectron2_workers(tmp_path):
    config = preset("paper")
    plan = build_plan(config, Selection(methods=["mocov2"]))
    ws = workspace(config, tmp_path, gpus=4)

    def command(cid):
        cell = plan.cells[cid]
        return KINDS[cell.kind].command(cell, ws, expected_deps(plan, cell, ws))

    assert command("pretrain/mocov2/seed0")[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node=4", "-m"]
    assert command("imagenet100/mocov2/seed0")[3] == "--standalone"
    assert command("caltech101/mocov2/seed0")[1:3] == ["-m", "transfer.linear"]  # a single process
    voc = command("voc/mocov2/seed0")
    assert voc[voc.index("--num-gpus") + 1] == "4" and voc[1:3] == ["-m", "transfer.detection"]


# ------------------------------------------------------------------------------------------ verdicts

INPUTS = {"weights_sha256": "abc", "args": ["--x"]}


def state(status: str, inputs=INPUTS) -> CellState:
    return CellState(cell="c", kind="linear", status=status, fingerprint=fingerprint(inputs), inputs=inputs)


@pytest.mark.parametrize(
    "previous, problem, expected",
    [
        (None, Problem("missing", "no record"), "todo"),
        (None, None, "done"),  # outputs found and valid without a state: adopted
        (state("ok"), None, "done"),
        (state("ok"), Problem("missing", "gone"), "missing"),
        (state("running"), Problem("missing", "no record"), "resume"),
        (state("running"), None, "done"),  # killed after the runner wrote its record
        (state("failed"), Problem("failed", "status failed"), "retry"),
        (state("ok"), Problem("corrupt", "bad json"), "corrupt"),
        (state("ok", {"weights_sha256": "old", "args": ["--x"]}), None, "stale"),
        (state("ok"), Problem("stale", "other preset"), "stale"),
        (None, Problem("corrupt", "bad json"), "corrupt"),
    ],
)
def test_verdicts(previous, problem, expected):
    verdict = decide(previous, INPUTS, problem)
    assert verdict.status == expected
    if expected == "stale" and previous and previous.inputs != INPUTS:
        assert verdict.reason == "inputs changed: weights_sha256"


def test_force_and_always_override_the_state():
    assert decide(state("ok"), INPUTS, None, force=True).status == "stale"
    assert decide(state("ok"), INPUTS, None, always=True).status == "always"


def test_progress_lines_without_a_terminal_carry_counts_and_eta():
    stream = io.StringIO()
    config = preset("paper")
    plan = build_plan(config, Selection(methods=["random"], only=["caltech101"]))
    cells = list(plan)
    progress = Progress("paper", len(cells), stream=stream)
    progress.start(cells[0], 4.0)
    assert "1 running" in progress.status_text() and "random-init · random" in progress.status_text()
    progress.finish(cells[0], "ok", 3.0)
    progress.finish(cells[1], "failed", 1.0, "exit status 1: boom", "runs/toy/logs/x.log")
    out = stream.getvalue()
    assert "[1/3] ok      random-init · random · seed 0  0:03" in out and "ETA" in out
    assert "FAILED  caltech101 · random · seed 0" in out and "log: runs/toy/logs/x.log" in out


def test_driver_written_failed_records_never_split_a_table(tmp_path):
    """A blocked cell's record cannot know the protocol its runner would have used; it must not break the
    tables (only records with numbers decide a task's protocol) and it still says why the cell is empty."""
    from transfer.records import make_record, write_record
    from transfer.results_data import collect

    def write(name, status, protocol):
        record = make_record(task="logreg_caltech101", protocol=protocol, seed=0, model={"name": name, "base": "mocov2"},
                             weights_path="w", weights_sha256="s", metrics={"caltech101_acc": 50.0} if status == "ok"
                             else {}, config={}, status=status, error=None if status == "ok" else "blocked: x",
                             extra={"preset": "toy"})
        write_record(tmp_path / f"{name}.json", record)

    write("b", "failed", "toy:caltech101")
    write("c", "failed", "toy_ericsson_logreg_caltech101_64px")  # a runner's own failed record
    assert len(collect(tmp_path, preset="toy").failed) == 2  # only failures so far: still one table
    write("a", "ok", "toy_ericsson_logreg_caltech101_64px")
    data = collect(tmp_path, preset="toy")
    assert data.protocols == {"logreg_caltech101": "toy_ericsson_logreg_caltech101_64px"}
    assert sorted(item.record["model"]["name"] for item in data.failed) == ["b", "c"]
    assert not data.excluded
