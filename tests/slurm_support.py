"""A one-node Slurm for tests: munged, slurmctld and slurmd started by hand (no systemd).

Everything lives in one temporary folder: a munge key and socket, ``slurm.conf`` (the
node is this host at 127.0.0.1, ports chosen free), state, spool, logs and pid files.
Daemons run in the foreground as our children and are stopped by PID. Clients (sbatch,
squeue, scancel) find the cluster through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kernel_engine import ports

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel")


def missing() -> str | None:
    """Why Slurm cannot run here (None: it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (make system-deps installs them)"
    if os.geteuid() != 0:
        return "slurmd must run as root here"
    return None


def _free_port() -> int:
    """A free port outside the ephemeral range (see kernel_engine.ports)."""
    return ports.PICKER.take("127.0.0.1")


class SlurmNode:
    """munged + slurmctld + slurmd on this host; :meth:`stop` ends them by PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="px-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.host = socket.gethostname()

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 20.0) -> None:
        d = self.dir
        (d / "state").mkdir()
        (d / "spool").mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge.sock"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=pxtest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={sock}",
                    "CredType=cred/munge",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SlurmdParameters=config_overrides",
                    "KillWait=5",
                    # (the main scheduling loop every second: a job with --begin runs on time)
                    "SchedulerParameters=sched_interval=1",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=60 State=UP",
                    "",
                ]
            )
        )
        env = {**os.environ, **self.env}
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munge.seed'}",
            ],
            env,
        )
        self._wait(lambda: sock.exists(), timeout, "munged")
        self._spawn(["slurmctld", "-D", "-i"], env)
        self._spawn(["slurmd", "-D"], env)
        self._wait(self._idle, timeout, "the node to be idle")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.dir / f"{cmd[0]}.out", "ab")  # noqa: SIM115 (kept by the child)
        with log:
            self.processes.append(
                subprocess.Popen(
                    cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=self.dir
                )
            )

    def _idle(self) -> bool:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"],
                capture_output=True,
                text=True,
                timeout=5,
                env={**os.environ, **self.env},
            ).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                    for f in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log"))
                )
                self.stop()
                raise RuntimeError(f"Slurm did not start ({what}):\n{logs}")
            time.sleep(0.05)

    def jobs(self) -> list[str]:
        """The jobs Slurm lists (id and state)."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, **self.env},
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        """SIGTERM slurmd, slurmctld and munged (in that order), SIGKILL after 10 s."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
