"""The Slurm launcher: one batch job (``sbatch``) whose ``srun`` runs N registering engines.

The job script (``slurm-engines-<first id>.sh`` in the cluster folder) is one line,
``srun <engine>``; ``--ntasks=N`` and the job's name and output file are given to sbatch,
then ``slurm_args`` (which win over ours: ``--time``, ``--ntasks-per-node``,
``--partition``...). Task ``t`` asks for engine id ``first_id + t`` (``SLURM_PROCID``). The
cluster's connection info reaches the tasks in their environment (sbatch exports the
submitter's by default), so no shared filesystem is needed, though the engines' output
files (``engine-<id>.log``) and the job's (``slurm-<job id>.out``) are in the cluster folder
when it is shared.

sbatch refusing the job (a bad option) raises at once with sbatch's own message. A job
waiting in the queue is not a failure: its engines join when it runs (see
``Cluster(min_engines=...)``); a job that ends failed, cancelled or at its time limit
(walltime, ``--time``) is reported with its state, its reason and the end of its output.
The launcher's own account (the sbatch command, the job id, each state the job was seen
in with Slurm's reason) goes to ``slurm-engines-<first id>.out``: a start that times out
on a job still queued quotes it, so the message says why the job waits.
Stopping cancels the job and returns once Slurm no longer lists it.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from kernel_engine.errors import LaunchError

from .base import LaunchContext, Launcher, run, tail
from .mpi import check_args

POLL_EVERY = 2.0
"""Seconds between two looks at the job's state (each one asks slurmctld)."""

ENDED_BADLY = frozenset(
    {
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
GONE = frozenset({"COMPLETED", *ENDED_BADLY})


class SlurmLauncher(Launcher):
    """One Slurm batch job of N engines.

    Options: ``slurm_args`` (more sbatch arguments), ``walltime`` (the job's time limit,
    as sbatch's ``--time`` takes it: minutes, or ``"HH:MM:SS"``).
    """

    name = "slurm"
    options = frozenset({"slurm_args", "walltime"})

    def __init__(self, context: LaunchContext):
        super().__init__(context)
        self.slurm_args = check_args("slurm_args", context.options.get("slurm_args"))
        walltime = context.options.get("walltime")
        if walltime is not None:
            if isinstance(walltime, bool) or not isinstance(walltime, (int, str)):
                raise TypeError(f"walltime must be minutes or 'HH:MM:SS', not {walltime!r}")
            self.slurm_args.insert(0, f"--time={walltime}")
        self.job_id: str | None = None
        self.state = ""
        self.script = context.folder / f"slurm-engines-{context.first_id}.sh"
        self.account_path = context.folder / f"slurm-engines-{context.first_id}.out"
        self._seen = ("", "")  # (the state and reason last written to the account)
        self._checked = 0.0
        self._reported = False
        self._stopping = False

    @property
    def output_path(self) -> Path:
        return self.context.folder / f"slurm-{self.job_id}.out"

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.context.env}

    def _say(self, text: str) -> None:
        with open(self.account_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def start(self) -> list[int]:
        ctx = self.context
        self.script.write_text(f"#!/bin/sh\nexec srun {shlex.join(self.engine_command())}\n")
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name=px-{ctx.folder.name}"[:100],
            f"--ntasks={ctx.n}",
            f"--output={ctx.folder / 'slurm-%j.out'}",
            *([f"--chdir={ctx.cwd}"] if ctx.cwd else []),
            *self.slurm_args,
            str(self.script),
        ]
        self._say(f"$ {shlex.join(cmd)}")
        said = run(cmd, env=self._env()).strip()
        job = said.split(";", 1)[0].strip()
        if not job.isdigit():
            raise LaunchError(f"sbatch did not give a job id: {said[:500]!r}")
        self.job_id = job
        self.state = "PENDING"
        self._say(f"submitted Slurm job {job}")
        return self.ids

    def job_state(self) -> tuple[str, str]:
        """The job's state and reason, as Slurm says them ("" once it forgot the job)."""
        if self.job_id is None:
            return "", ""
        try:
            out = run(["squeue", "-h", "-j", self.job_id, "-o", "%T|%r"], env=self._env())
        except LaunchError:
            out = ""
        line = out.strip().splitlines()[0] if out.strip() else ""
        if line:
            state, _, reason = line.partition("|")
            return state.strip(), reason.strip()
        try:  # finished: scontrol still knows it for a while (MinJobAge)
            out = run(["scontrol", "show", "job", "-o", self.job_id], env=self._env())
        except LaunchError:
            return "", ""
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", ""), fields.get("Reason", "")

    def poll(self) -> str | None:
        if self.job_id is None or self._stopping or self._reported:
            return None
        now = time.monotonic()
        if now - self._checked < POLL_EVERY:
            return None
        self._checked = now
        state, reason = self.job_state()
        if state:
            self.state = state
        if state and (state, reason) != self._seen:
            self._seen = (state, reason)
            why = f" ({reason})" if reason and reason != "None" else ""
            self._say(f"Slurm job {self.job_id}: {state}{why}")
        if state not in ENDED_BADLY:
            return None
        self._reported = True
        said = tail(self.output_path) or "(no output)"
        return (
            f"Slurm job {self.job_id} ended: {state}"
            + (f" ({reason})" if reason and reason != "None" else "")
            + f"; its output:\n{said}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self.job_id is None:
            return
        cancel(self.job_id, timeout, self._env())

    def record(self) -> dict[str, Any]:
        return {"launcher": self.name, "ids": self.ids, "job_id": self.job_id}

    def log_files(self) -> list[Path]:
        return [self.account_path, *([self.output_path] if self.job_id else [])]


def cancel(job_id: str, timeout: float, env: dict[str, str] | None = None) -> None:
    """Cancel Slurm job ``job_id``; return once Slurm lists it no more (or as ended),
    SIGKILLing its processes if it is still there after ``timeout`` s."""
    try:
        run(["scancel", job_id], env=env)
    except LaunchError:
        return  # (no such job any more)
    for signal_first in (False, True):
        if signal_first:
            try:
                run(["scancel", "--signal=KILL", "--full", job_id], env=env)
            except LaunchError:
                return
        deadline = time.monotonic() + (timeout if not signal_first else 5.0)
        while time.monotonic() < deadline:
            try:
                out = run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env).strip()
            except LaunchError:
                return  # (Slurm forgot it: long gone)
            if not out or out in GONE:
                return
            time.sleep(0.1)
    raise LaunchError(f"Slurm job {job_id} is still there after scancel")
