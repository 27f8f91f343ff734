"""Benchmark cells started as forks of the preloaded driver behave like ``python -m`` subprocesses.

The starter only forks from a single-threaded process, and pytest's is not, so each test drives it from a fresh
interpreter (math libraries limited to one thread, as the benchmark driver sets them) and reads back JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + /proc")

REPO = Path(__file__).resolve().parents[2]

CELL = textwrap.dedent("""
    import atexit, json, os, signal, sys, threading, time
    from pathlib import Path

    out = Path(os.environ["CELL_OUT"])
    mode = sys.argv[1]
    if mode == "raise":
        raise ValueError("a broken cell")
    if mode == "sleep":
        time.sleep(60)
    import torch
    facts = {"name": __name__, "argv": sys.argv[1:], "foo": os.environ.get("FOO"),
             "driver_only": os.environ.get("DRIVER_ONLY"), "threads": torch.get_num_threads(),
             "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
             "own_session": os.getsid(0) == os.getpid(), "stdin": sys.stdin.read(),
             "driver_fd_open": os.path.exists(f"/proc/self/fd/{os.environ['DRIVER_FD']}")}
    (out / "facts.json").write_text(json.dumps(facts))
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("joined"))).start()
    import warnings
    warnings.warn("quiet please")  # silenced by the filter warnmod added when the driver imported it
    print("to stdout")
    print("to stderr", file=sys.stderr)
    sys.exit(3)
""")

WARNMOD = textwrap.dedent("""
    import warnings
    warnings.filterwarnings("ignore", message="quiet please")
    warnings.warn("an import-time warning")
""")

DRIVER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, threading, time
    from transfer.warm_start import WarmStarter, prepare_driver
    prepare_driver()
    mode, log_path = sys.argv[1], sys.argv[2]
    starter = WarmStarter(preload=("json", "warnmod"))
    if mode == "threaded":
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    held = open(log_path + ".lock", "w")  # like the driver's lock file: not inherited by the cell
    env = {**os.environ, "FOO": "bar", "CELL_OUT": os.environ["CELL_OUT"], "DRIVER_FD": str(held.fileno())}
    env.pop("DRIVER_ONLY")
    command = [sys.executable, "-m", "cellmod", {"threaded": "facts"}.get(mode, mode), "x y"]
    if mode == "not_python_m":
        command = ["/bin/true"]
    with open(log_path, "a") as log:
        cell = starter.start(command, log, env, threads=2)
    if cell is None:
        print(json.dumps({"forked": False, "reason": starter.reason}))
        sys.exit(0)
    if mode == "sleep":
        time.sleep(1.5)
        os.killpg(cell.pid, signal.SIGTERM)
    try:
        cell.wait(0.2)
        early = True
    except subprocess.TimeoutExpired:
        early = False
    print(json.dumps({"forked": True, "code": cell.wait(60), "pid": cell.pid, "waited_out": not early}))
""")


def drive(tmp_path: Path, mode: str) -> tuple[dict, str]:
    (tmp_path / "cellmod.py").write_text(CELL)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "warnmod.py").write_text(WARNMOD)
    log = tmp_path / "cell.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]), CELL_OUT=str(tmp_path), DRIVER_ONLY="1")
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), mode, str(log)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "import-time warning" not in done.stderr  # preloading keeps the driver's terminal clean
    return json.loads(done.stdout.strip().splitlines()[-1]), log.read_text() if log.exists() else ""


def test_a_forked_cell_runs_the_module_as_python_m_would(tmp_path):
    result, log = drive(tmp_path, "facts")
    assert result["forked"] and result["code"] == 3 and result["waited_out"]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["name"] == "__main__" and facts["argv"] == ["facts", "x y"]
    assert facts["foo"] == "bar" and facts["driver_only"] is None  # the cell's environment, not the driver's
    assert facts["threads"] == 2 and facts["sigterm_default"] and facts["own_session"] and facts["stdin"] == ""
    assert facts["driver_fd_open"] is False
    assert "to stdout" in log and "to stderr" in log and "started as a fork" in log
    assert "quiet please" not in log  # warning filters set by preloaded modules stay in force
    # exit waits for the cell's threads and runs its atexit handlers, as the end of an interpreter does
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"


def test_an_exception_in_a_forked_cell_exits_1_with_its_traceback_in_the_log(tmp_path):
    result, log = drive(tmp_path, "raise")
    assert result["forked"] and result["code"] == 1
    assert "ValueError: a broken cell" in log and "Traceback" in log


def test_sigterm_to_the_cells_session_ends_it_like_a_subprocess(tmp_path):
    result, _ = drive(tmp_path, "sleep")
    assert result["forked"] and result["code"] == -15


@pytest.mark.parametrize(("mode", "why"), [("threaded", "threads"), ("not_python_m", None)])
def test_cells_start_as_plain_subprocesses_when_forking_is_not_safe(tmp_path, mode, why):
    result, _ = drive(tmp_path, mode)
    assert result["forked"] is False
    if why:
        assert why in result["reason"]
    assert not (tmp_path / "facts.json").exists()
