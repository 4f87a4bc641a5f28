"""The local launcher: engine kernels on this machine, through jupyter_client.

Each engine is a kernel of the installed engine kernel spec, started by a
``jupyter_client.KernelManager`` (so the spec's provisioner decides how), with its stdout
and stderr in ``engine-N.log`` in the cluster folder. The controller connects to each
kernel itself (they do not register): :meth:`LocalLauncher.kernels` hands them over with
their kernel managers, through which the controller watches, signals and stops them.

The kernels of a cluster on loopback listen on unix sockets (zmq's ``ipc`` transport),
``e<id>-<n>`` in the cluster's folder, which only its owner can enter (mode 0700): other
users' processes are refused by the operating system before zmq reads a byte from them,
on every channel, ipykernel's own included. Over TCP, any local process could connect
and make a busy engine hold whatever it sent (a handshake of any size, or unsigned
messages to ipykernel's shell, control and stdin channels) before a signature or login
was checked. The kernels use TCP when the cluster binds another address (it was asked
to be reachable there), when the folder could be entered by others, or replaced through
a folder above it (:func:`unsafe_ancestor`), or cannot hold unix sockets, when its path
is too long for one (about 100 characters), or when ``JUPYTER_PX_IPC=0``. Socket files
go with their engine: the engine removes them when it leaves for want of a controller,
the controller (or ``stop_engines``) those of an engine that died or was stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager

from kernel_engine import clusters, protocol
from kernel_engine.kernelspec import KERNEL_NAME

from .base import LaunchContext, Launcher

log = logging.getLogger("kernel_engine.launchers")

IPC_ENV = "JUPYTER_PX_IPC"
"""``0`` (or ``no``, ``off``, ``false``) makes local engines listen on TCP, not unix sockets."""

IPC_PATH_MAX = 100
"""The longest unix socket path used (the system's limit is 107 bytes); the kernel's
sockets are ``<prefix>-<n>``, with ``n`` small, so the prefix must leave room."""


def ipc_unusable(folder: Path) -> str | None:
    """Why engines in ``folder`` cannot listen on unix sockets there (None: they can)."""
    if os.environ.get(IPC_ENV, "1").lower() in ("0", "no", "off", "false"):
        return f"{IPC_ENV}={os.environ[IPC_ENV]}"
    if not hasattr(socket, "AF_UNIX"):
        return "no unix sockets on this platform"
    try:
        st = folder.stat()
    except OSError as exc:
        return f"the cluster folder is unusable: {exc}"
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"the cluster folder {folder} is not private (owner and mode 0700)"
    unsafe = unsafe_ancestor(folder)
    if unsafe is not None:
        return f"another user could replace the cluster folder: {unsafe}"
    if len(os.fsencode(ipc_prefix(folder, 2**20))) + 8 > IPC_PATH_MAX:
        return f"the cluster folder's path is too long for a unix socket: {folder}"
    probe = folder / f".ipc-probe-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(probe))
    except OSError as exc:
        return f"the cluster folder cannot hold unix sockets: {exc}"
    finally:
        sock.close()
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def unsafe_ancestor(folder: Path) -> str | None:
    """A folder above ``folder`` (as named, and as resolved) through which another user
    could rename it away and put one of theirs in its place, between this check and the
    engines' bind (None: none): one that is not owned by this user or root, or that
    others may write to without the sticky bit."""
    mine = (0, os.geteuid())
    names = [Path(os.path.abspath(folder)), Path(os.path.realpath(folder))]
    for path in {p for name in names for p in name.parents}:
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"{path}: {exc}"
        if st.st_uid not in mine:
            return f"{path} belongs to uid {st.st_uid}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if stat.S_ISDIR(st.st_mode) and writable and not st.st_mode & stat.S_ISVTX:
            return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def ipc_prefix(folder: Path, eid: int) -> str:
    """The path engine ``eid``'s unix sockets start with (``<prefix>-<n>`` each),
    absolute: the engines and the client may run in other working directories."""
    return os.path.join(os.path.abspath(folder), f"e{eid}")


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
        self._ipc: bool | None = None

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
        ip = opts.get("ip", "127.0.0.1")
        where = {"ip": ip}
        if self.use_ipc(ip):
            where = {"transport": "ipc", "ip": ipc_prefix(folder, eid)}
        km = KernelManager(
            kernel_name=KERNEL_NAME,
            connection_file=str(folder / f"engine-{eid}.json"),
            transport_encryption="required" if opts.get("curve") else "disabled",
            **where,
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

    def use_ipc(self, ip: str) -> bool:
        """Whether this cluster's kernels listen on unix sockets (decided once; see the
        module docstring)."""
        if self._ipc is None:
            if ip not in protocol.LOCAL_IPS:  # (asked to be reachable there)
                self._ipc = False
                return False
            why = ipc_unusable(self.context.folder)
            if why is not None:
                log.warning("engines listen on TCP at %s, not on unix sockets: %s", ip, why)
            self._ipc = why is None
        return self._ipc

    def poll(self) -> str | None:
        return None  # (the controller watches each kernel through its manager)

    def stop(self, timeout: float = 5.0) -> None:
        return None  # (the controller stops each kernel through its manager)

    def record(self) -> dict[str, Any]:
        return {}
