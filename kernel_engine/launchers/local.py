"""The local launcher: engine kernels on this machine, through jupyter_client.

Each engine is a kernel of the installed engine kernel spec, started by a
``jupyter_client.KernelManager`` (so the spec's provisioner decides how), with its stdout
and stderr in ``engine-N.log`` in the cluster folder. The controller connects to each
kernel itself (they do not register): :meth:`LocalLauncher.kernels` hands them over with
their kernel managers, through which the controller watches, signals and stops them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from jupyter_client import KernelManager

from kernel_engine import clusters
from kernel_engine.kernelspec import KERNEL_NAME

from .base import LaunchContext, Launcher


@dataclass
class LocalKernel:
    """One engine kernel started here."""

    engine_id: int
    km: KernelManager
    connection_info: dict[str, Any]
    log_path: str


class LocalLauncher(Launcher):
    """Engine kernels on this machine (the default launcher).

    Options (in the context): ``ip`` (the interface the kernels bind), ``key`` (the
    cluster's HMAC key), ``curve`` (encrypt the kernels' channels), ``grace`` (seconds
    the engines outlive a dead controller).
    """

    name = "local"
    registers = False
    options = frozenset({"ip", "key", "curve", "grace"})

    def __init__(self, context: LaunchContext):
        super().__init__(context)
        self.started: list[LocalKernel] = []

    def start(self) -> list[int]:
        self.started = [self.start_kernel(eid) for eid in self.ids]
        return self.ids

    def kernels(self) -> list[LocalKernel]:
        """The kernels :meth:`start` started, for the controller to connect to."""
        return list(self.started)

    def start_kernel(self, eid: int) -> LocalKernel:
        """Start engine ``eid``'s kernel; it becomes ready (or dies) asynchronously."""
        ctx = self.context
        opts = ctx.options
        folder = ctx.folder
        log_path = folder / f"engine-{eid}.log"
        key: bytes = opts["key"]
        km = KernelManager(
            kernel_name=KERNEL_NAME,
            connection_file=str(folder / f"engine-{eid}.json"),
            ip=opts.get("ip", "127.0.0.1"),
            transport_encryption="required" if opts.get("curve") else "disabled",
        )
        km.session.key = key
        env = {
            **os.environ,
            **ctx.env,
            clusters.CONTROLLER_PID_ENV: str(os.getpid()),
            clusters.ENGINE_GRACE_ENV: str(opts.get("grace", clusters.DEFAULT_ENGINE_GRACE)),
        }
        with open(log_path, "ab") as logf:
            km.start_kernel(stdout=logf, stderr=logf, cwd=ctx.cwd, env=env)
        info = km.get_connection_info(session=False)
        info["key"] = key.decode()
        return LocalKernel(eid, km, dict(info), str(log_path))

    def poll(self) -> str | None:
        return None  # (the controller watches each kernel through its manager)

    def stop(self, timeout: float = 5.0) -> None:
        return None  # (the controller stops each kernel through its manager)

    def record(self) -> dict[str, Any]:
        return {}
