"""The terminal side of a benchmark run: one status line for the matrix, one line per event, a summary.

On a terminal the status line (cells done / running / left, the running cells, elapsed time, ETA) is
redrawn in place, and only events worth reading scroll above it: a finished run with its headline
metric, a stale / corrupt / resumed cell with the reason, a failure with its log file. Without a terminal
(CI, ``| tee``) the same event lines are printed, each with the count and the ETA, and nothing is redrawn.
Logs of the parts never reach the terminal; they go to one file per cell.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO

from transfer.benchmark_plan import Cell

FINAL = ("ok", "done", "failed", "blocked")  # statuses that count as finished
QUIET_STATUS_S = 120.0  # without a terminal, print the status line after this long without an event


def clock(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Progress:
    preset: str
    total: int
    jobs: int = 1
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    live: bool | None = None  # redraw a status line; default: when the stream is a terminal
    started: float = field(default_factory=time.monotonic)
    finished: dict[str, str] = field(default_factory=dict)  # cell id -> final status
    running: dict[str, tuple[Cell, float, float]] = field(default_factory=dict)  # id -> (cell, start, estimate)
    measured: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # kind key -> walls
    _status_width: int = 0
    _last_draw: float = 0.0
    _last_line: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    # ------------------------------------------------------------------ events

    def line(self, text: str) -> None:
        """Print an event line above the status line."""
        self._last_line = time.monotonic()
        self._clear()
        print(text, file=self.stream, flush=True)
        self.draw(force=True)

    def note(self, cell: Cell, verdict: str, reason: str) -> None:
        if verdict in ("stale", "corrupt", "resume", "retry", "missing"):
            self.line(f"  {verdict:<7} {cell.title}: {reason}")

    def start(self, cell: Cell, estimate: float) -> None:
        self.running[cell.id] = (cell, time.monotonic(), estimate)
        self.draw(force=True)

    def finish(self, cell: Cell, status: str, wall: float | None = None, detail: str = "",
               log: str | None = None) -> None:
        self.running.pop(cell.id, None)
        self.finished[cell.id] = status
        if wall is not None and status == "ok":
            self.measured[estimate_key(cell)].append(wall)
        if status == "done":
            self.draw()
            return
        count = f"[{len(self.finished):>{len(str(self.total))}}/{self.total}]"
        if status == "ok":
            tail = f"  {detail}" if detail else ""
            eta = "" if self.live else f"  · ETA {clock(self.eta())}"
            self.line(f"{count} ok      {cell.title}  {clock(wall or 0)}{tail}{eta}")
        elif status == "failed":
            self.line(f"{count} FAILED  {cell.title}  {clock(wall or 0)}: {detail}")
            if log:
                self.line(f"{' ' * len(count)}         log: {log}")
        elif status == "blocked":
            self.draw()  # reported together by blocked(): one line per cause, not one per cell

    def blocked(self, cause: str, cells: list[Cell]) -> None:
        """One line for every cell a failure blocked (e.g. the six transfer cells of a failed pretraining)."""
        count = f"[{len(self.finished):>{len(str(self.total))}}/{self.total}]"
        names = ", ".join(cell.task or cell.kind for cell in cells[:8]) + (", ..." if len(cells) > 8 else "")
        self.line(f"{count} blocked {len(cells)} cell{'s' if len(cells) != 1 else ''} ({names}): {cause}")

    # --------------------------------------------------------------- the line

    def eta(self, pending: list[tuple[Cell, float]] | None = None) -> float:
        """Seconds left: measured means per kind (else the config's estimates), spread over the jobs."""
        if pending is not None:
            self._pending = pending
        now = time.monotonic()
        left = sum(self.estimate(cell, guess) for cell, guess in getattr(self, "_pending", []))
        left += sum(max(0.0, self.estimate(cell, guess) - (now - start)) for cell, start, guess in
                    self.running.values())
        return left / max(1, self.jobs)

    def estimate(self, cell: Cell, guess: float) -> float:
        """Mean measured wall of this kind; before any, the guess, raised to what a running one has taken."""
        key = estimate_key(cell)
        walls = self.measured.get(key)
        if walls:
            return sum(walls) / len(walls)
        now = time.monotonic()
        running = [now - start for other, start, _ in self.running.values() if estimate_key(other) == key]
        return max([guess, *running])

    def status_text(self) -> str:
        now = time.monotonic()
        done = len(self.finished)
        failed = sum(1 for status in self.finished.values() if status in ("failed", "blocked"))
        left = self.total - done - len(self.running)
        parts = [f"[{self.preset}] {done}/{self.total} cells", f"{len(self.running)} running", f"{left} left"]
        if failed:
            parts.append(f"{failed} failed/blocked")
        parts += [f"{clock(now - self.started)} elapsed", f"ETA {clock(self.eta())}"]
        if self.running:
            names = ", ".join(f"{cell.title} ({clock(now - start)})" for cell, start, _ in self.running.values())
            parts.append(f"running: {names}")
        return " · ".join(parts)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live:
            # no terminal: a plain status line when nothing else was printed for a while
            if self.running and now - max(self._last_draw, self._last_line) >= QUIET_STATUS_S:
                self._last_draw = now
                print(f"  ... {self.status_text()}", file=self.stream, flush=True)
            return
        if not force and now - self._last_draw < 1.0:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((120, 20)).columns - 1
        text = self.status_text()[:width]
        self.stream.write("\r" + text + " " * max(0, self._status_width - len(text)))
        self.stream.flush()
        self._status_width = len(text)

    def _clear(self) -> None:
        if self.live and self._status_width:
            self.stream.write("\r" + " " * self._status_width + "\r")
            self._status_width = 0

    def close(self) -> None:
        self._clear()
        self.stream.flush()


def estimate_key(cell: Cell) -> str:
    return f"{cell.kind}:{cell.task or ''}"
