"""Local processes by PID: whether one runs, which one it is, and stopping it safely.

A PID names a process only until it exits and is reaped; then the number is reused. So
what outlives a process (a PID in a file) comes with its start time, and stopping a process
checks it is still the one meant and signals it through a pidfd, which names the process
rather than the number. Linux first (``/proc``, pidfds); elsewhere the PID is trusted.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def start_time(pid: int) -> str | None:
    """An identity for process ``pid``: boot id and start tick, or None if not known.

    No other process has the same one, even after ``pid`` is reused or the host rebooted.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # the command name may hold spaces and parentheses: split after the last ")"
            fields = f.read().rsplit(b")", 1)[1].split()
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    return f"{boot_id}:{int(fields[19])}"


def session_members(sid: int, since: str | None) -> dict[int, str | None]:
    """The processes of session ``sid`` (Linux ``/proc``; elsewhere none), by PID with
    their :func:`start_time`: those that a session leader started with that PID left,
    even once it exited and they were reparented away from it.

    ``since`` is the leader's start time: members that started before it are left out,
    and so is everything when a process other than that leader now has the PID (Linux
    does not reuse a PID that is still some process's session id, so then none is
    left of the recorded one's session). None when unknown: ``sid`` is taken as is.
    """
    if since is not None and running(sid) and start_time(sid) != since:
        return {}
    boot, _, tick = (since or "").partition(":")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    out: dict[int, str | None] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
        except (OSError, IndexError, ValueError):
            continue
        started = start_time(int(entry))
        if since is not None and started is not None:
            their_boot, _, their_tick = started.partition(":")
            if their_boot != boot or int(their_tick) < int(tick or 0):
                continue
        out[int(entry)] = started
    return out


def running(pid: int) -> bool:
    """Whether a local process runs (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return not os.path.exists("/proc/self/stat")  # gone, unless there is no /proc
    return state != b"Z"


def terminate(pid: int, timeout: float, is_target: Callable[[], bool]) -> bool:
    """SIGTERM process ``pid``, wait ``timeout`` s for it to exit, then SIGKILL it.

    Nothing is sent unless ``is_target()`` says the process with that PID is the one meant
    (checked once the process is pinned by a pidfd). Returns whether it was signalled.

    Raises
    ------
    TimeoutError
        When the process is still there 10 s after SIGKILL.
    """
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if not is_target():
            return False
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signum)
                else:
                    os.kill(pid, signum)
            except ProcessLookupError:
                return True
            if wait_exit(pid, wait, pidfd):
                return True
        raise TimeoutError(f"process {pid} did not exit after SIGKILL")
    finally:
        if pidfd is not None:
            os.close(pidfd)


def readable(fds: Sequence[Any], timeout: float | None) -> bool:
    """Whether one of ``fds`` (descriptors, or objects with a ``fileno()``) is readable
    within ``timeout`` s (None: no limit).

    ``poll``, not ``select``: ``select`` refuses descriptors past 1023 ("filedescriptor
    out of range"), which a controller of many engines holds (one starting 64 local
    engines failed so).
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))


def wait_exit(pid: int, timeout: float, pidfd: int | None = None) -> bool:
    """Wait up to ``timeout`` s for process ``pid`` to exit; returns whether it did."""
    if pidfd is not None:
        # readable once the process has exited (a zombie counts)
        return readable([pidfd], timeout)
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
