"""The launcher interface: what starts engines, whatever the machinery.

A launcher lives in the controller process, one instance per set of engines it starts
(one ``mpiexec``, one Slurm job). It only starts processes and reports their output and
failure: the engines it starts *register* themselves with the controller
(``python -m kernel_engine.engine.register``, connection info in the environment
variable :data:`~kernel_engine.clusters.CONNECTION_ENV`), asking for the ids the launcher
announced (``first_id`` plus their rank). The local launcher is the exception: its
kernels are started through jupyter_client's kernel manager and the controller connects
to them itself (:attr:`Launcher.registers` is False).

The controller calls, on its own loop (so a launcher needs no thread):

- :meth:`Launcher.start` once: start the processes, return the engine ids they will
  register with; raise :class:`~kernel_engine.errors.LaunchError` with the launcher's
  own message when it fails at once (``sbatch`` refusing an option);
- :meth:`Launcher.poll` every fraction of a second: None while all is well, else why it
  failed, with the tail of its output (``mpiexec`` exiting on a bad argument);
- :meth:`Launcher.stop` when the engines are to go: everything it started is gone when it
  returns (within ``timeout`` s);
- :meth:`Launcher.record` for ``launchers.json`` in the cluster folder, so whoever stops a
  cluster whose controller died can stop what it launched (:func:`stop_recorded`).

Plug-ins subclass :class:`Launcher` in an importable module and are named by
``"package.module:Class"`` (``Cluster(engines=MyLauncher)`` does that).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kernel_engine import processes
from kernel_engine.errors import LaunchError

log = logging.getLogger("kernel_engine.launchers")

OUTPUT_TAIL = 40
"""Lines of a launcher's output quoted when it fails."""


@dataclass
class LaunchContext:
    """What a launcher needs to know of the cluster.

    Parameters
    ----------
    folder
        The cluster folder: logs (``engine-N.log``) and the launcher's own files go there.
    n
        How many engines to start.
    first_id
        The id of the first; the others follow (an MPI rank ``r`` is ``first_id + r``).
    env
        Environment for the engines: connection info, grace period, profile folder.
    cwd
        The engines' working directory.
    options
        The launcher's own options (``mpi_args``, ``slurm_args``, ...).
    """

    folder: Path
    n: int
    first_id: int = 0
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable


class Launcher(ABC):
    """Starts one set of engines and stops it; see the module docstring."""

    name: ClassVar[str] = ""
    registers: ClassVar[bool] = True
    """Whether its engines register themselves (else the controller connects to them)."""
    options: ClassVar[frozenset[str]] = frozenset()
    """The options it takes (others are refused before anything starts)."""

    def __init__(self, context: LaunchContext):
        unknown = set(context.options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TypeError(
                f"the {self.name or type(self).__name__} launcher takes no option "
                f"{', '.join(sorted(unknown))} (it takes: {known})"
            )
        self.context = context
        self.ids = list(range(context.first_id, context.first_id + context.n))

    @abstractmethod
    def start(self) -> list[int]:
        """Start the engines; return the ids they will register with."""

    @abstractmethod
    def poll(self) -> str | None:
        """None while all is well (or it ended cleanly), else why it failed."""

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Stop everything it started; return when it is gone."""

    def record(self) -> dict[str, Any]:
        """What :func:`stop_recorded` needs to stop it from another process."""
        return {"launcher": self.name, "ids": self.ids}

    def log_files(self) -> list[Path]:
        """Files with the launcher's own output (not the engines')."""
        return []

    def start_done(self) -> bool:
        """Whether :meth:`start` has started everything. One that starts in the
        background (its launches can take seconds each, and the controller's loop must
        not wait for them) says False until it is done; its failure comes by
        :meth:`poll`."""
        return True

    def ended(self) -> dict[int, tuple[int | None, str]]:
        """Engines whose process this launcher saw end since the last call, by id: the
        engine's PID (None: unknown) and how it ended. The controller fails an engine
        still registered with that PID at once, with that cause, rather than when its
        heartbeats stop (an ssh session ending)."""
        return {}

    def engine_command(self, extra: Sequence[str] = ()) -> list[str]:
        """The command that runs one registering engine, its log in the cluster folder
        (``{id}`` is filled in by the engine, once it knows its rank)."""
        return [
            self.context.python,
            "-m",
            "kernel_engine.engine.register",
            "--id-from-rank",
            "--id-offset",
            str(self.context.first_id),
            "--log-file",
            str(self.context.folder / "engine-{id}.log"),
            *extra,
        ]


def tail(path: Path, lines: int = OUTPUT_TAIL) -> str:
    """The last ``lines`` lines of a text file ("" if none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if "running over TCP without encryption" not in ln]
    return "\n".join(kept[-lines:])


def run(cmd: Sequence[str], timeout: float = 30.0, env: dict[str, str] | None = None) -> str:
    """Run a short command (``sbatch``, ``scancel``); its stdout, or LaunchError with its
    stderr."""
    try:
        done = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except FileNotFoundError:
        raise LaunchError(f"{cmd[0]} is not installed (not found on PATH)") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or "(no output)"
        raise LaunchError(f"{shlex.join(cmd)} failed (exit code {done.returncode}):\n{said}")
    return done.stdout


def children(pid: int) -> list[int]:
    """The PIDs of every descendant of ``pid`` (Linux ``/proc``; elsewhere none)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(process: subprocess.Popen[bytes], timeout: float, started: str | None = None) -> None:
    """Stop a launcher process and everything under it: SIGTERM to it (``mpiexec``
    passes it on to its ranks, which lead process groups of their own), ``timeout`` s,
    then SIGKILL to whatever of the tree is left (each checked by its start time).

    The tree is its descendants and the members of the session it leads (a launcher
    process is started in a session of its own): what a wrapper that does not ``exec``
    its ``mpiexec`` leaves when SIGTERM ends it is reparented away from it, but stays in
    its session. Those get SIGTERM themselves once it is gone (nothing passes it on).

    ``started`` is its start time, taken when it was started: once it has been reaped
    (``poll`` does that) its PID may be another process's, and without it only what
    runs under a process not reaped yet is taken for its tree."""
    if started is None and process.returncode is None:
        started = processes.start_time(process.pid)  # (not reaped: still that process)
    tree = process_tree(process.pid, started) if started else {}
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    orphans_told = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if not _alive(tree):
                break
            if not orphans_told:
                signal_recorded(tree, signal.SIGTERM)
                orphans_told = True
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    kill_recorded(tree)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        log.warning("launcher process %i does not exit", process.pid)


def process_tree(pid: int, started: str | None = None) -> dict[int, str | None]:
    """Process ``pid``'s descendants and the members of the session it leads (if it
    does), with their start times; ``started`` is its own when it may be gone already
    (then its PID's descendants are another process's, and are left out)."""
    started = started or processes.start_time(pid)
    tree: dict[int, str | None] = {}
    if processes.start_time(pid) == started:
        tree = {p: processes.start_time(p) for p in children(pid)}
    tree.update(processes.session_members(pid, started))
    tree.pop(pid, None)
    return tree


def _alive(tree: dict[int, str | None]) -> bool:
    return any(_same(pid, started) for pid, started in tree.items())


def _same(pid: int, started: str | None) -> bool:
    return processes.running(pid) and (started is None or processes.start_time(pid) == started)


def signal_recorded(tree: dict[int, str | None], signum: int) -> None:
    """Send ``signum`` to the recorded processes still running (each the one recorded)."""
    for pid, started in tree.items():
        if _same(pid, started):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def kill_recorded(tree: dict[int, str | None], wait: float = 5.0) -> None:
    """SIGKILL the recorded processes still running (each the one recorded) and wait
    for them to go."""
    signal_recorded(tree, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.02)
