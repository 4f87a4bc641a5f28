"""The engine's watch on its controller: outlive a dead controller for a grace period.

ipykernel's parent poller ends a kernel the moment the process that launched it is gone.
An engine instead watches its controller's PID (the controller puts it in the engines'
environment, :data:`~kernel_engine.clusters.CONTROLLER_PID_ENV`, and in every setup),
and when that process is gone it waits ``grace`` seconds
(:data:`~kernel_engine.clusters.ENGINE_GRACE_ENV`) for a controller restarted on the
cluster folder to adopt it; if none does, it exits.

Who may take an engine over is decided here too, in one place: the controller that set
the engine's lane up (its *owner*) keeps it for as long as its process runs, so a peer
holding the key cannot steal a live controller's engines. Once the owner is gone:

- a restarted controller's ``px_adopt_request`` (control channel, answered even while a
  task runs on the main thread) makes the watch *follow* that controller: no exit while
  it runs, though its setup may wait for the running task;
- its ``engine_setup_request`` on the lane makes it the new owner.

Threads: the watch runs in thread ``px-controller-watch``; the lane (main thread) and the
control thread call :meth:`ControllerWatch.claim` / :meth:`ControllerWatch.follow`.
Every change of state is made under one lock, so an engine never exits while it is being
adopted. Processes are named by PID and start time, so a reused PID is never mistaken
for the controller.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kernel_engine import processes


class _Process:
    """A process by PID and start time (a later process with the same PID is not it)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.started = processes.start_time(pid)

    def alive(self) -> bool:
        if not processes.running(self.pid):
            return False
        return self.started is None or processes.start_time(self.pid) == self.started


class ControllerWatch(threading.Thread):
    """Exits the process ``grace`` s after its controller is gone, unless adopted.

    Parameters
    ----------
    pid
        The controller's PID (None: not known yet; the first setup may say).
    grace
        Seconds to wait for a new controller once the last one is gone.
    log
        Where to say why the engine leaves.
    exit
        How to leave (``os._exit`` by default; tests pass their own).
    """

    interval = 0.25

    def __init__(
        self,
        pid: int | None,
        grace: float,
        log: Any = None,
        exit: Any = os._exit,
    ):
        super().__init__(name="px-controller-watch", daemon=True)
        self.grace = grace
        self.log = log or logging.getLogger(__name__)
        self._exit = exit
        self._lock = threading.Lock()
        self._owner: _Process | None = _Process(pid) if pid else None
        self._follower: _Process | None = None
        self._gone_since: float | None = None
        self.exiting = False

    @property
    def owner_pid(self) -> int | None:
        """The PID of the controller that owns this engine (None if not known)."""
        owner = self._owner
        return None if owner is None else owner.pid

    def owner_gone(self) -> bool:
        """Whether the owning controller's process is gone (False when no PID is known:
        then nobody may take the engine over)."""
        owner = self._owner
        return owner is not None and not owner.alive()

    def claim(self, pid: int | None, first: bool) -> str | None:
        """A controller (``pid``) sets this engine up: None if it may (then it owns the
        engine), else why not. The ``first`` setup always may; a later one only once the
        owner's process is gone."""
        with self._lock:
            if self.exiting:
                return "this engine is leaving (no controller adopted it in time)"
            if not first and not self.owner_gone():
                why = "this engine is set up already"
                owner = self._owner
                return why if owner is None else f"{why} (its controller, pid {owner.pid}, runs)"
            if pid is not None:
                self._owner = _Process(pid)
            elif not first:  # a controller that does not say its pid: kept for good
                self._owner = None
            self._follower = None
            self._gone_since = None
            return None

    def follow(self, pid: int, first: bool) -> str | None:
        """A restarted controller (``pid``) will set this engine up: do not leave while it
        runs. None if accepted, else why not (the owner still runs, or the engine is
        leaving); ``first``: the engine has not been set up by anybody yet."""
        with self._lock:
            if self.exiting:
                return "this engine is leaving (no controller adopted it in time)"
            if not first and not self.owner_gone():
                owner = self._owner
                pid_text = "" if owner is None else f", pid {owner.pid},"
                return f"this engine's controller{pid_text} still runs"
            self._follower = _Process(pid)
            self._gone_since = None
            return None

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._check(time.monotonic()):
                self._exit(0)
                return

    def _check(self, now: float) -> bool:
        """One look at the controller; True when it is time to leave."""
        with self._lock:
            watched = [p for p in (self._owner, self._follower) if p is not None]
            if not watched or any(p.alive() for p in watched):
                self._gone_since = None
                return False
            if self._gone_since is None:
                self._gone_since = now
                self.log.warning(
                    "the controller (pid %s) is gone; waiting %.0f s for a new one",
                    watched[-1].pid,
                    self.grace,
                )
            if now - self._gone_since < self.grace:
                return False
            self.exiting = True
        self.log.warning("no controller adopted this engine within %.0f s; exiting", self.grace)
        return True
