"""Per-phase step timing for benchmarks: a no-op unless enabled.

A method wraps each phase of its step in ``with timer("masking"): ...``. The default timer does nothing;
an enabled one synchronizes CUDA around each phase (only then, so normal training never waits) and
accumulates wall time per phase name. Phase names used by the engine and the built-in methods:
``data``, ``input_filter``, ``saliency``, ``masking``, ``key_forward``, ``hard_negative_forward``, ``query_forward``,
``loss``, ``backward``, ``optimizer``, ``momentum_update``.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    def __init__(self, enabled: bool = False, device: torch.device | str | None = None):
        self.enabled = enabled
        self.cuda = enabled and device is not None and torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start
            self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def summary(self) -> dict[str, float]:
        """Total seconds per phase since the last reset."""
        return dict(self.totals)


NULL_TIMER = PhaseTimer(enabled=False)
