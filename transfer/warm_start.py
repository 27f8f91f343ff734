"""Start benchmark cells as forks of a driver that has already imported torch, detectron2 and sklearn.

Each cell is a ``python -m MODULE ...`` process. Started fresh, it spends about 5-7 s of CPU importing torch,
torchvision, detectron2, tensorboard and sklearn before it does any work (measured on 2 cores: a toy
Caltech-101 cell 16.8 s -> 9.7 s, a toy VOC cell 39.6 s -> 31.7 s). With ~110 cells in the toy matrix
that is several minutes of a 30-minute budget. The driver therefore imports those modules once and forks
for each cell; the child becomes the cell exactly as ``python -m`` would run it (its own session, the log
as stdout/stderr, the cell's environment, thread count and arguments, default signal handlers), and exits
with the module's exit status. The driver is its parent, so waiting, timeouts and stopping work unchanged.

Forking is only safe while the driver has no other threads (a thread pool of OpenMP or a BLAS library
would be missing in the child) and has not touched CUDA. The warm start is used only when all of that holds
(checked before every fork); otherwise, and for any command that is not ``<this python> -m MODULE``, the
cell starts as a plain subprocess. ``machine.warm_start: false`` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import IO

# What the cells import before they start working (their entry modules and what those import lazily).
PRELOAD = (
    "torch", "torchvision", "numpy", "PIL.Image", "omegaconf", "tqdm",
    "pretrain.__main__", "pretrain.engine", "pretrain.random_init",
    "transfer.__main__", "transfer.convert", "transfer.linear", "transfer.detection",
    "transfer.d2_run", "transfer.d2_training", "transfer.d2_datasets", "transfer.verify",
    "detectron2.engine", "detectron2.evaluation", "pycocotools.coco", "pycocotools.cocoeval",
    "torch.utils.tensorboard", "sklearn.linear_model", "matplotlib.pyplot",
)
# Variables the math libraries read once, when they load: the driver sets them to 1 for itself (it does no
# numerical work) so that it holds no thread pools; a child applies the cell's count at run time instead.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")
# What every cell's environment defaults to that libraries read when they are imported (tqdm's TQDM_*
# options, matplotlib's backend): the driver takes the same defaults before it imports them.
IMPORT_TIME_DEFAULTS = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                        "TQDM_MININTERVAL": "5"}  # progress bars in log files: a line every few seconds
# glibc reads these at start-up; a forked child sets the same parameters with mallopt().
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3,
            "MALLOC_MMAP_MAX_": -4, "MALLOC_ARENA_MAX": -8}


def prepare_driver() -> None:
    """Called by the driver before it imports numpy, torch or tqdm (a value already set is kept)."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    for name, value in IMPORT_TIME_DEFAULTS.items():
        os.environ.setdefault(name, value)


def die_with_parent() -> None:
    """In a cell's process: get SIGKILL when the driver dies, so a killed driver leaves no orphans."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def unsafe_reason() -> str | None:
    """Why this process cannot fork cells right now, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if Path("/dev/nvidiactl").exists():
        return "an NVIDIA GPU is present (CUDA must be initialized by the cell itself)"
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        return "CUDA is initialized in the driver"
    threads = os_threads()
    if threads > 1:
        return f"the driver runs {threads} threads"
    return None


class ForkedCell:
    """The parts of ``subprocess.Popen`` the runner uses (pid, returncode, poll, wait) for a forked cell."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"cell pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


class WarmStarter:
    """Forks cells from this (preloaded) process; ``start`` returns None when a plain subprocess must be used."""

    def __init__(self, enabled: bool = True, preload: tuple[str, ...] = PRELOAD):
        self.preload_modules = preload
        # Why cells start as subprocesses; once set, for the rest of the run.
        self.reason: str | None = None if enabled else "machine.warm_start is false"
        self._loaded = False

    def _preload(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        # Import-time warnings are not shown on the driver's terminal; the filters that modules add when
        # imported stay in place (catch_warnings would drop them), as they would in a fresh cell.
        shown, warnings.showwarning = warnings.showwarning, lambda *args, **kwargs: None
        try:
            for name in self.preload_modules:
                try:
                    importlib.import_module(name)
                except Exception as err:  # the cell itself will report a broken install clearly
                    self.reason = f"cannot preload {name}: {type(err).__name__}"
                    return
        finally:
            warnings.showwarning = shown

    def module_of(self, command: list[str]) -> str | None:
        if len(command) >= 3 and command[1] == "-m" and os.path.realpath(command[0]) == os.path.realpath(
                sys.executable):
            return command[2]
        return None

    def start(self, command: list[str], log: IO[str], env: dict[str, str], threads: int) -> ForkedCell | None:
        module = self.module_of(command)
        if self.reason is None and not self._loaded:
            self.reason = unsafe_reason()  # checked before the preload as well: it would be wasted
            if self.reason is None:
                self._preload()
        if self.reason is None:
            self.reason = unsafe_reason()  # before every fork: an import or a cell may have started a thread
        if self.reason is not None or module is None:
            return None
        log.write("[benchmark] started as a fork of the driver, which has the libraries imported "
                  "(machine.warm_start)\n")
        log.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:  # the cell; never returns
            _become_cell(module, command[3:], log.fileno(), env, threads)
        return ForkedCell(pid)


def _become_cell(module: str, args: list[str], log_fd: int, env: dict[str, str], threads: int) -> None:
    code = 1
    try:
        os.setsid()
        die_with_parent()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Like close_fds: the cell must not hold the driver's lock file or the other cells' logs.
        open_fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
        os.closerange(3, max(open_fds, default=2) + 1)
        for name in dir(signal):  # a fresh interpreter's handlers, not the driver's
            if name.startswith("SIG") and not name.startswith("SIG_") and name not in ("SIGKILL", "SIGSTOP"):
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.environ.clear()
        os.environ.update(env)
        libc = ctypes.CDLL("libc.so.6")
        for name, param in _MALLOPT.items():
            if env.get(name, "").lstrip("-").isdigit():
                libc.mallopt(param, int(env[name]))
        _set_threads(threads)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        sys.modules.pop(module, None)  # run it as __main__, as `python -m` does
        sys.argv = [module, *args]
        code = _run(module)
        threading._shutdown()  # join the cell's non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code if isinstance(code, int) and code >= 0 else 1)


def _set_threads(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def _run(module: str) -> int:
    """The module's exit status, as the interpreter would give it."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code & 0xFF
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    return 0
