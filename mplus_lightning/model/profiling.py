"""Named regions of the model's work for profilers (`python -m mplus_lightning.bench profile`, or any torch.profiler).

`region(label)` marks a block (`with region("commit"):`) or a function (`@region("commit")`). While a torch profiler
runs, the block is a `torch.profiler.record_function` range; while a caller collects them (`thread_cpu_times()`), the
calling thread's CPU time inside the block is added to the caller's table (unlike wall time, it does not count time
the process was descheduled). Otherwise a region costs one flag check.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

# A cheap "is a profiler running?" test; if torch drops this helper, regions are always recorded (correct, slower).
_profiler_running = getattr(torch.autograd, "_profiler_enabled", lambda: True)

_cpu_ms: dict[str, float] | None = None
"""The table of `thread_cpu_times` while one is open: label -> milliseconds of thread CPU time."""


class region(contextlib.ContextDecorator):
    """A labelled region of the model's work (see the module docstring)."""

    def __init__(self, label: str):
        self.label = label
        self._record = None
        self._start: float | None = None

    def _recreate_cm(self) -> "region":
        return region(self.label)   # a fresh one per decorated call: regions nest and recurse

    def __enter__(self) -> "region":
        if _profiler_running():
            self._record = torch.profiler.record_function(self.label)
            self._record.__enter__()
        if _cpu_ms is not None:
            self._start = time.thread_time()
        return self

    def __exit__(self, *exc) -> bool:
        if self._start is not None and _cpu_ms is not None:
            _cpu_ms[self.label] = _cpu_ms.get(self.label, 0.0) + (time.thread_time() - self._start) * 1e3
        if self._record is not None:
            self._record.__exit__(*exc)
        return False


@contextlib.contextmanager
def thread_cpu_times(table: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Inside, every region adds the calling thread's CPU milliseconds spent in it to `table` (inclusive of nested
    regions; a new dict if None), which is yielded."""
    global _cpu_ms
    previous, _cpu_ms = _cpu_ms, (table if table is not None else {})
    try:
        yield _cpu_ms
    finally:
        _cpu_ms = previous


def collecting_thread_cpu_times() -> bool:
    """Whether a `thread_cpu_times` table is open."""
    return _cpu_ms is not None
