"""The MPI launcher: ``mpiexec -n N`` runs N registering engines, engine id = MPI rank.

Each rank runs ``python -m kernel_engine.engine.register --id-from-rank``: it asks for
``first_id + rank`` (so a cluster's first MPI set has ids equal to ranks), and mpi4py
works inside the engines (``%px from mpi4py import MPI``: every engine runs the cell, so
collectives such as ``allreduce`` meet). The cluster's connection info reaches the
ranks in their environment (Open MPI's ``-x``; MPICH's Hydra passes the whole
environment), and each rank's output goes to ``engine-<id>.log`` in the cluster folder;
mpiexec's own output, to ``mpiexec-<first id>.log``.

A failing mpiexec (a bad ``mpi_args`` option, too few slots) exits at once: :meth:`poll`
reports its exit code with its own messages. So does one that exits with code 0 before any
of its engines registered (``mpi_args=["--version"]``, an ``mpiexec`` wrapper that only
submits): its engines will never come. Stopping sends mpiexec SIGTERM (Open MPI
passes it on to its ranks, which lead their own process groups), then SIGKILL to
whatever of its process tree is left. MPI semantics apply: a rank that exits with an
error makes mpiexec end the others.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from kernel_engine import processes
from kernel_engine.engine.register import REGISTERED
from kernel_engine.errors import LaunchError

from .base import LaunchContext, Launcher, stop_tree, tail


def check_args(name: str, value: Any) -> list[str]:
    """A launcher's extra arguments: a list of strings (a string is split as a shell
    would)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:  # (an unclosed quote: name the option, not just shlex)
            raise ValueError(f"{name} {value!r} cannot be split as a shell would: {exc}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise TypeError(f"{name} must be a list of strings, not {value!r}")
    return list(value)


class MPILauncher(Launcher):
    """``mpiexec -n N [mpi_args] <engine>``.

    Options: ``mpi_args`` (more mpiexec arguments: ``["--oversubscribe"]``,
    ``["--hostfile", "hosts"]``), ``mpiexec`` (the command, default ``mpiexec``).
    """

    name = "mpi"
    options = frozenset({"mpi_args", "mpiexec"})

    def __init__(self, context: LaunchContext):
        super().__init__(context)
        self.mpi_args = check_args("mpi_args", context.options.get("mpi_args"))
        self.mpiexec = str(context.options.get("mpiexec") or "mpiexec")
        self.process: subprocess.Popen[bytes] | None = None
        self.started: str | None = None  # (its start time, taken at once: see stop_tree)
        self.log_path = context.folder / f"mpiexec-{context.first_id}.log"
        self._stopping = False
        self._seen_registered = False

    def command(self) -> list[str]:
        """The mpiexec command line."""
        cmd = [self.mpiexec]
        if self._open_mpi():
            if os.geteuid() == 0:
                cmd.append("--allow-run-as-root")
            for name in sorted(self.context.env):
                cmd += ["-x", name]
        cmd += ["-n", str(self.context.n), *self.mpi_args]
        return cmd + self.engine_command()

    def _open_mpi(self) -> bool:
        try:
            done = subprocess.run(
                [self.mpiexec, "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise LaunchError(f"{self.mpiexec} is not installed (not found on PATH)") from None
        except subprocess.TimeoutExpired:
            return False
        said = done.stdout + done.stderr
        return "Open MPI" in said or "OpenRTE" in said

    def start(self) -> list[int]:
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.context.cwd,
                env={**os.environ, **self.context.env},
                start_new_session=True,
            )
        self.started = processes.start_time(self.process.pid)
        return self.ids

    def poll(self) -> str | None:
        process = self.process
        if process is None or self._stopping:
            return None
        code = process.poll()
        if code is None or (code == 0 and self._registered()):
            return None
        said = tail(self.log_path) or "(no output)"
        why = " before any of its engines registered" if code == 0 else ""
        return f"mpiexec exited with code {code}{why}; its output:\n{said}"

    def _registered(self) -> bool:
        """Whether one of its engines said it registered (in its log; remembered once
        seen, as each poll asks)."""
        if not self._seen_registered:
            for eid in self.ids:
                try:
                    with open(self.context.folder / f"engine-{eid}.log", "rb") as f:
                        if REGISTERED.encode() in f.read(1 << 20):
                            self._seen_registered = True
                            break
                except OSError:
                    continue
        return self._seen_registered

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self.process is not None:
            stop_tree(self.process, timeout, self.started)

    def record(self) -> dict[str, Any]:
        pid = self.process.pid if self.process is not None else None
        return {"launcher": self.name, "ids": self.ids, "pid": pid, "pid_started": self.started}

    def log_files(self) -> list[Path]:
        return [self.log_path]
