"""The controller's launchers and its start: who starts engines, and when the start is over.

One launcher class serves the cluster (``--engines``: ``local``, ``mpi``, ``slurm``,
``ssh``, ``provisioner`` or a plug-in, see :mod:`kernel_engine.launchers`); each
:meth:`Launches.start` makes one instance of it (one ``mpiexec``, one Slurm job, one set
of kernels of a kernel spec). Local engines are started through the
engine set (it connects to them); the others register themselves, with the ids the
launcher announced, and the engine set takes them in then.

The start is reported once (see :mod:`kernel_engine.launchers.state`): when the engines
are ready (or ``minimum`` of them), or with the first failure: an engine dying while
starting, a launcher failing (its own message, quoted), or ``timeout`` seconds passing.
Launchers are polled on the controller's loop, so a failure is seen within a fraction of
a second. Their records go to ``launchers.json`` in the cluster folder, for stopping what
they started should this controller die (:func:`kernel_engine.launchers.stop_recorded`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel_engine import clusters, launchers
from kernel_engine.launchers import LaunchContext, Launcher
from kernel_engine.launchers.state import Report, Startup

from .engines import EngineSet
from .loop import PollLoop

log = logging.getLogger("kernel_engine.controller")

POLL_EVERY = 0.2
"""Seconds between two looks at the launchers."""


class Launches:
    """The launchers a controller runs, and its start.

    Parameters
    ----------
    loop, engines
        The controller's loop, and the engine set (which starts local engines).
    folder, cwd
        The cluster folder and the engines' working directory.
    launcher
        The launcher's name (see :func:`kernel_engine.launchers.find`).
    options
        The launcher's options (``mpi_args``, ``slurm_args``, ...).
    env
        What registering engines need in their environment (connection info...).
    minimum, timeout
        Report the start once this many engines are ready (None: all); fail it after this
        many seconds (None: no deadline of its own).
    on_report
        Called once, with the start's outcome.
    """

    def __init__(
        self,
        loop: PollLoop,
        engines: EngineSet,
        folder: Path,
        cwd: str | None,
        launcher: str = "local",
        options: dict[str, Any] | None = None,
        env: Callable[[], dict[str, str]] = dict,
        minimum: int | None = None,
        timeout: float | None = None,
        on_report: Callable[[Report], None] = lambda r: None,
    ):
        self.engines = engines
        self.folder = folder
        self.cwd = cwd
        self.cls = launchers.find(launcher)
        self.options = dict(options or {})
        self.env = env
        self.startup = Startup(minimum, timeout)
        self.on_report = on_report
        self.running: list[Launcher] = []
        self._starting: list[Launcher] = []  # (starting in the background: recorded when done)
        self._failed: set[int] = set()
        if self.cls.registers:
            # (refuse bad options now, before anything starts)
            self.cls(LaunchContext(folder, 0, options=self.options))
        loop.call_every(POLL_EVERY, self.poll)

    def start(self, n: int) -> list[int]:
        """Start ``n`` engines; their ids (they become ready, or register, later).

        Raises
        ------
        LaunchError
            When the launcher fails at once (with its own message).
        """
        if not self.cls.registers:
            ids = [e.id for e in self.engines.start(n, cwd=self.cwd)]
        else:
            first = self.engines.reserve(n)
            context = LaunchContext(
                self.folder, n, first, env=self.env(), cwd=self.cwd, options=self.options
            )
            launcher = self.cls(context)
            ids = launcher.start()
            self.running.append(launcher)
            if not launcher.start_done():
                self._starting.append(launcher)
            self._write_records()
            log.info("%s launcher started engines %s", self.cls.name or self.cls.__name__, ids)
        self.startup.expect(ids, time.monotonic())
        return ids

    def engine_ready(self, eid: int, held: bool = False) -> None:
        if self._starting:  # (its record names the processes started so far)
            self._write_records()
        self._emit(self.startup.engine_ready(eid, held))

    def engine_dead(self, eid: int, reason: str) -> None:
        self._emit(self.startup.engine_dead(eid, reason))

    def check(self, held: bool = False) -> None:
        """Report the start if it is due (``held``: not yet, something else must end)."""
        self._emit(self.startup.check(held))

    def fail(self, message: str) -> None:
        self._emit(self.startup.launcher_failed(message))

    def poll(self) -> None:
        """Look at the launchers and the start's deadline."""
        if self._starting:
            done = [launcher for launcher in self._starting if launcher.start_done()]
            if done:
                self._starting = [la for la in self._starting if la not in done]
                self._write_records()  # (with the processes they started)
        for launcher in self.running:
            for eid, (pid, how) in launcher.ended().items():
                self._engine_ended(eid, pid, how)
            if id(launcher) in self._failed:
                continue
            why = launcher.poll()
            if why:
                self._failed.add(id(launcher))
                log.warning("launcher failed: %s", why)
                self._emit(self.startup.launcher_failed(why))
        if not self.startup.reported:
            report = self.startup.tick(time.monotonic())
            if report is not None and self.running:
                said = "\n".join(_outputs(self.running))
                report = Report(report.ready, report.ids, f"{report.message}\n{said}".rstrip())
            self._emit(report)

    def _engine_ended(self, eid: int, pid: int | None, how: str) -> None:
        """A launcher saw engine ``eid``'s process end: fail it now, if it is still the
        engine registered with that id (by its PID)."""
        engine = self.engines.engines.get(eid)
        if engine is None or engine.state == "dead" or (pid is not None and engine.pid != pid):
            return
        self.engines._fail(engine, how)  # (as when the engine set sees a process exit)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every launcher (after the engines were asked to stop)."""
        for launcher in self.running:
            try:
                launcher.stop(timeout)
            except Exception:
                log.exception("stopping the %s launcher", launcher.name)
        self.running.clear()
        self._starting.clear()
        (self.folder / launchers.RECORD_FILE).unlink(missing_ok=True)

    def _write_records(self) -> None:
        records = [launcher.record() for launcher in self.running]
        clusters.write_private_json(self.folder / launchers.RECORD_FILE, {})  # (mode 0600)
        (self.folder / launchers.RECORD_FILE).write_text(json.dumps(records, indent=1))

    def _emit(self, report: Report | None) -> None:
        if report is not None:
            self.on_report(report)


def _outputs(running: list[Launcher]) -> list[str]:
    """The end of each launcher's own output, for a failed start's message."""
    out = []
    for launcher in running:
        for path in launcher.log_files():
            text = launchers.base.tail(path, 20)
            if text:
                out.append(f"--- {path.name} ---\n{text}")
    return out
