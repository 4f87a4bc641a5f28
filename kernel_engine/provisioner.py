"""The fork provisioner: engine kernels forked from a template that has imported them.

``jupyter-px-fork`` (entry point group ``jupyter_client.kernel_provisioners``; the engine
kernel spec names it in ``metadata.kernel_provisioner``) is jupyter_client's local
provisioner with one change: the kernel process is not ``Popen([python, "-m", ...])``,
which imports ipykernel, IPython, zmq, tornado and debugpy all over again in every
engine, but a fork of a *template* process (:mod:`kernel_engine.engine.template`) that
imported them once. An engine is then ready in a fraction of the time and CPU, and
shares those modules' memory with the template and the other engines. Everything else
is the local provisioner's: the connection file, ports, CurveZMQ keys, and the kernel's
command line, environment and cwd as the kernel manager prepared them; the process it
gives the kernel manager (:class:`~kernel_engine.templates.ForkedProcess`) answers
``poll``, ``wait`` and signals as a ``Popen`` does, exit codes and signals included.

The plain local path remains whenever a template cannot serve, logged as a warning and
never waited on for long (:attr:`ForkProvisioner.template_timeout`): see
:mod:`kernel_engine.templates`. So does a kernel whose command is not ``[python, "-m",
module, ...]`` or whose standard streams are to be pipes, and any platform but Linux.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner
from traitlets import Float, List, Unicode

from kernel_engine import ports, processes, templates
from kernel_engine.templates import DEFAULT_PRELOAD, ForkedProcess, TemplateError, TemplatePool

log = logging.getLogger("kernel_engine.provisioner")

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")

PROVISIONER_NAME = "jupyter-px-fork"
"""The provisioner's entry point name, as kernel specs name it."""


def _stream_fd(stream: Any, default: int) -> int | None:
    """The file descriptor a kernel's standard stream is to be, as ``Popen`` takes it;
    None if it cannot be passed (a pipe the caller wants to read)."""
    if stream is None:
        return default
    if stream == subprocess.DEVNULL:
        return -1
    if isinstance(stream, int):
        return stream if stream >= 0 else None
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


class ForkProvisioner(LocalProvisioner):  # type: ignore[misc]
    """jupyter_client's local provisioner, forking kernels from a template (see the
    module docstring); the plain local path when the template cannot serve."""

    preload = List(
        Unicode(),
        default_value=list(DEFAULT_PRELOAD),
        config=True,
        help="Modules the template imports before it forks kernels.",
    )
    template_timeout = Float(
        30.0,
        config=True,
        help="Seconds to wait for the template to be ready, or to answer a fork request, "
        "before the kernel takes the plain local path.",
    )

    forked = False
    """Whether this kernel was forked from a template (else started the plain way)."""

    _ports: tuple[int, ...] = ()
    _session: tuple[int, str | None] | None = None
    """The kernel's PID (the id of the session it leads) and start time."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """As the local provisioner's, with the kernel's ports taken outside the
        ephemeral range (see :mod:`kernel_engine.ports`): an outgoing connection made
        while engines start cannot take one before the kernel binds it."""
        km = self.parent
        if km is not None and km.transport == "tcp" and not self._ports:
            taken = []
            for name in PORT_NAMES:
                if not getattr(km, name, 0):
                    port = ports.PICKER.take(km.ip)
                    setattr(km, name, port)
                    taken.append(port)
            self._ports = tuple(taken)
            self.ports_cached = True  # (jupyter_client keeps them, and picks none itself)
        result: dict[str, Any] = await super().pre_launch(**kwargs)
        return result

    async def cleanup(self, restart: bool = False) -> None:
        self._end_session()
        if not restart:
            for port in self._ports:
                ports.PICKER.give_back(port)
            self._ports = ()
        await super().cleanup(restart)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Fork the kernel from a template; the plain local launch when that fails."""
        why = self._unforkable(cmd, kwargs)
        process = None
        if why is None:
            process, why = await self._fork(cmd, kwargs)
        if process is None:
            level = logging.INFO if why.startswith("(") else logging.WARNING
            log.log(level, "kernel %s: started without a fork template: %s", self.kernel_id, why)
            self.forked = False
            info: KernelConnectionInfo = await super().launch_kernel(cmd, **kwargs)
            self._session = (self.pid, processes.start_time(self.pid)) if self.pid else None
            return info
        self.forked = True
        self.process = process  # type: ignore[assignment]
        self.pid = process.pid
        self.pgid = process.pid  # (it leads its own session, as a kernel manager's kernel)
        self._session = (process.pid, processes.start_time(process.pid))
        self.cwd = kwargs.get("cwd") or os.getcwd()
        return self.connection_info

    def _end_session(self) -> None:
        """SIGKILL what the kernel, now gone, left in its session: the processes a task
        started, which outlive a kernel that crashed or was killed alone (a forked
        kernel that has ended is not signalled, so neither is its process group)."""
        session, self._session = self._session, None
        if session is None or session[1] is None:
            return
        pid, started = session
        if processes.running(pid) and processes.start_time(pid) == started:
            return  # (it still runs: not ours to end here)
        for member in processes.session_members(pid, started):
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _unforkable(cmd: list[str], kwargs: dict[str, Any]) -> str | None:
        """Why this launch cannot be a fork (in parentheses: by design, not a fault)."""
        if sys.platform != "linux":
            return "(forking kernels is for Linux)"
        if templates.disabled():
            return f"({templates.DISABLE_ENV} is set)"
        if len(cmd) < 3 or cmd[1] != "-m":
            return f"(its command is not `python -m module ...`: {cmd[:3]})"
        extra = set(kwargs) - {"stdin", "stdout", "stderr", "cwd", "env", "kernel_id"}
        if extra:
            return f"(launch options a fork does not take: {sorted(extra)})"
        return None

    async def _fork(
        self, cmd: list[str], kwargs: dict[str, Any]
    ) -> tuple[ForkedProcess | None, str]:
        env = dict(kwargs.get("env") or os.environ)
        env["JPY_PARENT_PID"] = str(os.getpid())  # (what the plain launch sets)
        cwd = os.fspath(kwargs.get("cwd") or os.getcwd())
        fds = [
            _stream_fd(kwargs.get("stdin") or subprocess.DEVNULL, 0),
            _stream_fd(kwargs.get("stdout"), 1),
            _stream_fd(kwargs.get("stderr"), 2),
        ]
        if kwargs.get("stderr") == subprocess.STDOUT:
            fds[2] = fds[1]
        if None in fds:
            return None, "(its stdin, stdout or stderr is a pipe)"
        template, why = TemplatePool.instance().get(cmd[0], env, cwd, list(self.preload))
        if template is None:
            return None, why
        if not await template.ready(self.template_timeout):
            return None, f"the fork template (pid {template.pid}) {template.why}"
        devnull = None
        try:
            if -1 in fds:
                devnull = os.open(os.devnull, os.O_RDWR)
                fds = [devnull if fd == -1 else fd for fd in fds]
            passed = [fd for fd in fds if fd is not None]
            process = template.fork(cmd, env, cwd, passed, self.template_timeout)
        except TemplateError as exc:
            return None, f"the fork template (pid {template.pid}) {exc}"
        finally:
            if devnull is not None:
                os.close(devnull)
        return process, ""

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group; nothing once it ended (see ForkedProcess)."""
        process = self.process
        if isinstance(process, ForkedProcess) and process.poll() is not None:
            return
        await super().send_signal(signum)

    async def wait(self) -> int | None:
        process = self.process
        if not isinstance(process, ForkedProcess):
            return await super().wait()
        while process.poll() is None:
            await asyncio.sleep(0.05)
        code = process.wait()
        self.process = None
        return code
