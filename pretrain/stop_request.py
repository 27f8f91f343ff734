"""Stop a training run at the next step boundary on SIGTERM or Ctrl-C, with a checkpoint of that step.

A scheduler that preempts a job (SLURM, Kubernetes) sends SIGTERM and kills the job a grace period later.
Stopping at once would lose everything since the last epoch or ``checkpoint.every_minutes`` checkpoint.
So while the training loop runs, the first SIGTERM or SIGINT only records the request. The loop sees it
after the step in progress, writes ``checkpoint_last.pth`` at that step, and raises ``Terminated`` (SIGTERM)
or ``KeyboardInterrupt`` (SIGINT). A second signal stops at once: a checkpoint being written is then
discarded and the previous one stays. Outside the training loop (set-up, loading data) every signal
stops at once, since there is nothing new to save.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, torchrun stopping its workers), handled like Ctrl-C."""


def exception_for(signum: int) -> KeyboardInterrupt:
    """What a signal raises when it stops a command at once: ``Terminated`` for SIGTERM, else ``KeyboardInterrupt``."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StopRequest:
    """The signal handlers of ``python -m pretrain`` and the flag the training loop reads."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received while armed
        self._armed = False
        self._installed = False
        self._owner = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._owner:
            # A forked data-loader worker inherits the handler; the process that installed it decides (and
            # ends its workers), and each worker announcing "stopping" would repeat the line N times.
            return
        if self._armed and self.signum is None:
            self.signum = signum
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            print(f"\n{name}: stopping after the current step and saving a checkpoint of it "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise exception_for(signum)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGTERM and SIGINT for the duration (the previous handlers come back afterwards)."""
        previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        self.signum, self._installed, self._owner = None, True, os.getpid()
        try:
            yield self
        finally:
            self.signum, self._installed = None, False  # a later train() in this process starts afresh
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Within: a first signal is only recorded (when the handlers are installed)."""
        self._armed = self._installed
        try:
            yield
        finally:
            self._armed = False

    def exception(self) -> KeyboardInterrupt:
        """What to raise once the requested checkpoint is written (Terminated if another process got it)."""
        return exception_for(self.signum if self.signum is not None else signal.SIGTERM)


STOP = StopRequest()


def ignore_in_worker() -> None:
    """Data-loader workers leave both signals to the main process, which ends them when it stops.

    Killed by the same SIGTERM as the trainer (a scheduler signals every process of the job), a worker
    would make the trainer fail mid-step with "DataLoader worker ... is killed by signal" instead of
    finishing the step and saving it.
    """
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


def _init_then_ignore(original: Callable[[int], Any] | None, worker_id: int) -> None:
    if original is not None:
        original(worker_id)
    ignore_in_worker()


def leave_signals_to_the_trainer(loader: Any) -> Any:
    """Make the workers of a ``DataLoader`` built elsewhere (detectron2's) ignore SIGTERM and Ctrl-C too.

    Chains after the loader's own ``worker_init_fn``; must be called before the loader is iterated. Finds
    the ``DataLoader`` inside wrappers that keep it as ``.dataset`` or ``._dataset`` (detectron2's
    aspect-ratio grouping). Returns ``loader``, unchanged when there is no multi-worker ``DataLoader``.
    """
    from torch.utils.data import DataLoader

    inner = loader
    for _ in range(4):
        if isinstance(inner, DataLoader):
            if inner.num_workers > 0:
                inner.worker_init_fn = functools.partial(_init_then_ignore, inner.worker_init_fn)
            break
        inner = getattr(inner, "dataset", None) if hasattr(inner, "dataset") else getattr(inner, "_dataset", None)
    return loader
