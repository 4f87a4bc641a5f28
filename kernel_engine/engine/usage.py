"""What an engine says of itself when the controller asks (``px_engine_status_request``):
its CPU use since the last report, its resident memory and the task it runs.

The engine measures its own process, wherever it runs (a controller on another host
could not), with nothing beyond the standard library: CPU time from
:func:`time.process_time` (every thread of the process), resident memory from
``/proc/self/statm`` where there is one, else the peak from :mod:`resource`, else
nothing. The report is answered on the kernel's control thread, so a busy engine answers
too; it only reads what the main thread wrote (the current task, one tuple).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from kernel_engine.protocol import EngineReport

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None  # type: ignore[assignment]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (the peak where only that is known)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return None
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    # kilobytes on Linux and the BSDs, bytes on macOS
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


class Usage:
    """CPU use between two reports: the process's CPU seconds over the wall seconds."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.process_time()

    def cpu_percent(self) -> float | None:
        """Percent of one core used since the last call (None on the first, too soon)."""
        wall, cpu = time.monotonic(), time.process_time()
        span = wall - self._wall
        used = cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        if span < 0.05:
            return None
        return round(max(0.0, used / span * 100.0), 1)

    def report(self, current: tuple[str, str, float] | None) -> EngineReport:
        """A report, with ``current`` (msg_id, function name, Unix time started) if a task
        runs."""
        task, name, since = current if current is not None else (None, None, None)
        return EngineReport(self.cpu_percent(), resident_bytes(), task, name, since)


_WRAPPERS = frozenset({"map_chunk", "map_chunk_safe", "call_part"})
"""The engine's own helpers that call a user's function (their first argument)."""


def task_name(f: Any, args: Sequence[Any] = ()) -> str:
    """What a dashboard calls a task: its function's qualified name (for a map's chunk,
    the mapped function's)."""
    if (
        getattr(f, "__module__", None) == "kernel_engine.engine.ops"
        and getattr(f, "__name__", None) in _WRAPPERS
        and args
    ):
        f = args[0]
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None)
    if not isinstance(name, str):
        name = type(f).__name__
    return name.rsplit("<locals>.", 1)[-1][:200]  # (where it was defined is noise here)
