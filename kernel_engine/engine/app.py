"""The engine application: ipykernel's kernel app, binding one more socket, the task lane."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp
from tornado import ioloop
from traitlets import Type

from kernel_engine import wire
from kernel_engine.clusters import CONTROLLER_PID_ENV, PROFILE_DIR_ENV, engine_grace

from . import logs
from .guard import LaneGuard
from .kernel import EngineKernel
from .watch import ControllerWatch

CHANNEL_THREADS_EXIT = 10.0
"""Seconds the main thread waits for each of ipykernel's channel threads to finish when
its event loop has stopped, before the process tears its sockets down anyway."""


class EngineApp(IPKernelApp):
    """Starts an :class:`EngineKernel`; the lane port joins the kernel's connection file."""

    name = "jupyter-px-engine"
    kernel_class = Type(EngineKernel, klass="ipykernel.kernelbase.Kernel")  # type: ignore[assignment]

    lane_socket: Any = None
    lane_port = 0
    lane_auth = ""
    lane_guard: LaneGuard | None = None

    def init_poller(self) -> None:
        """Watch the controller instead of ipykernel's parent poller, which would end the
        engine the moment its launcher is gone: an engine outlives a dead controller for a
        grace period, for a restarted one to adopt it (see :mod:`.watch`)."""
        try:
            pid = int(os.environ.get(CONTROLLER_PID_ENV) or 0)
        except ValueError:
            pid = 0
        pid = pid or int(self.parent_handle or 0)  # (JPY_PARENT_PID, as ipykernel's)
        self.poller = ControllerWatch(
            pid if pid > 1 else None, engine_grace(), self.log, exit=self._leave
        )

    def _leave(self, status: int) -> None:
        """Exit at once (no controller adopted this engine in time), removing the unix
        sockets it listens on: nobody else would."""
        self.remove_socket_files()
        os._exit(status)

    def remove_socket_files(self) -> None:
        """Remove the files of the unix sockets this engine listens on (when it leaves: a
        kernel manager removes only those it chose, and nobody a registered engine's)."""
        for path in self.socket_paths():
            with contextlib.suppress(OSError):
                path.unlink()

    def socket_paths(self) -> list[Path]:
        """The files of the unix sockets this engine listens on (none on TCP)."""
        if self.transport != "ipc":
            return []
        ports = [*self._kernel_ports(), self.lane_port]
        return [Path(f"{self.ip}-{port}") for port in ports if port]

    def _kernel_ports(self) -> list[int]:
        """The ports (socket numbers, on ``ipc``) of ipykernel's five channels."""
        return [self.shell_port, self.iopub_port, self.stdin_port, self.hb_port, self.control_port]

    def init_sockets(self) -> None:
        super().init_sockets()
        assert self.context is not None
        self.lane_socket = self.context.socket(zmq.ROUTER)
        self.lane_socket.linger = 1000
        # replies are never dropped (a ROUTER drops at its send mark)
        self.lane_socket.sndhwm = 0
        # tasks not yet read wait in their sender's memory past this, not in the engine's
        self.lane_socket.rcvhwm = 10_000
        key = self.session.key
        if self.curve_secretkey is not None:  # the kernel's channels encrypt: so does the lane
            self._apply_curve_server_options(self.lane_socket)
        elif key:  # only peers with the key's password for this port connect (see .guard)
            self.lane_socket.plain_server = True
            self.lane_socket.zap_domain = wire.LANE_DOMAIN
        # no router_handover: a peer connecting with an identity already in use is refused,
        # so nobody can take over the controller's (or a client's) place on the lane
        # mandatory: a reply to a peer that is gone raises, so the lane can keep a lost
        # controller's replies for the next one (see lane.py)
        self.lane_socket.router_mandatory = 1
        self.lane_port = self._bind_socket(self.lane_socket, self._requested_lane_port())
        if self.curve_secretkey is None and key:
            # (peers that connect before it runs are refused, and retry)
            password = wire.lane_password(key, self.lane_port, self.session.session)
            self.lane_guard = LaneGuard(self.context, password)
            self.lane_auth = wire.LANE_AUTH
        self.log.debug("task lane ROUTER on port %i", self.lane_port)

    def _requested_lane_port(self) -> int:
        """A lane port the launcher chose, if it put ``lane_port`` in the connection file.

        On unix sockets (``ipc``), the number after the kernel's own: ipykernel would take
        the first whose path is free, which may be the heartbeat's, not bound yet."""
        try:
            info = json.loads(Path(self.abs_connection_file).read_text())
        except (OSError, ValueError):
            info = {}
        port = int(info.get("lane_port", 0) or 0)
        if port or self.transport != "ipc":
            return port
        port = 1 + max(self._kernel_ports())
        while Path(f"{self.ip}-{port}").exists():
            port += 1
        return port

    def write_connection_file(self, **kwargs: Any) -> None:
        super().write_connection_file(**kwargs)
        path = Path(self.abs_connection_file)
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if info.get("lane_port") != self.lane_port:
            info["lane_port"] = self.lane_port
            path.write_text(json.dumps(info, indent=1))
            path.chmod(0o600)

    def start(self) -> None:
        """Run the kernel until its main event loop stops; then let the control and shell
        channel threads finish before anything is torn down.

        A ``shutdown_request`` stops every loop at once from the control thread, and the
        control thread goes on after its handler (flushing the output streams, publishing
        its idle status on IOPub). The main thread's loop returns meanwhile, and the exit's
        teardown (``atexit``: the IOPub thread stopped and its event pipes closed, then
        :meth:`close`) would race that thread on the same zmq sockets: a socket used by
        one thread while another closes it makes libzmq abort
        (``Assertion failed: pfd.revents & POLLIN (src/signaler.cpp)``), or the control
        thread waits for a flush that the stopped IOPub thread never does (``flush_timeout``,
        10 s) while :meth:`close` joins it. So nothing is closed until they have finished.
        """
        # (initialize blocked SIGINT before any thread started; the main thread takes it
        # again once its loop runs, after ipykernel's threads and ours have started)
        ioloop.IOLoop.current().add_callback(_take_sigint)
        try:
            super().start()
        finally:
            self.join_channel_threads(CHANNEL_THREADS_EXIT)

    def join_channel_threads(self, timeout: float) -> None:
        """Stop the control thread, then the shell channel thread (the control thread may
        send to it), and wait up to ``timeout`` s for each to finish."""
        for name in ("control_thread", "shell_channel_thread"):
            thread = getattr(self, name, None)
            if thread is None or not thread.is_alive():
                continue
            try:
                thread.stop()  # (thread-safe; a no-op for a loop stopped already)
            except RuntimeError:  # (its loop is closed: the thread is ending)
                pass
            thread.join(timeout)
            if thread.is_alive():
                self.log.warning("the %s thread did not finish within %.0f s", thread.name, timeout)

    def close(self) -> None:
        """Close the lane socket too, or the zmq context's term() would wait for it forever."""
        if self.lane_socket is not None and not self.lane_socket.closed:
            self.lane_socket.close(linger=0)
            self.remove_socket_files()
        if self.lane_guard is not None:
            self.lane_guard.stop()
        super().close()

    def initialize(self, argv: Any = None) -> None:
        """As ipykernel's, with SIGINT blocked in every thread it starts.

        SIGINT (an interrupt, a time limit) is blocked in every thread but the main one: a
        signal sent to the process goes to any thread that does not block it, and only one
        that reaches the main thread cuts a blocking call there (``time.sleep``, a wait on
        I/O) short. The kernel picks the main thread when it can, but not for a signal sent
        while the engine was stopped (SIGSTOP, a job control's pause): on SIGCONT any thread
        took it, Python's handler waited for the main thread's call to return, and the task
        ran to its end. Threads inherit the mask of the thread that starts them, so it is set
        before ipykernel starts any."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        super().initialize(argv)
        # ipykernel logs every unusable message that anyone sends its channels, at length
        log = self.log
        logs.guard(getattr(log, "logger", log))

    def init_kernel(self) -> None:
        # Cells' history in memory, as IPython Parallel's engines keep it: not in the
        # profile's history.sqlite, which every engine would otherwise open (a writing
        # thread each, lock contention among many) and fill with each cell N times over.
        # A profile that names a file keeps it.
        history = self.config.HistoryManager
        if "hist_file" not in history:
            history.hist_file = ":memory:"
        super().init_kernel()
        kernel = self.kernel
        kernel.lane_socket = self.lane_socket
        kernel.lane_port = self.lane_port
        kernel.lane_auth = self.lane_auth
        kernel.controller_watch = self.poller


def _take_sigint() -> None:
    """Let SIGINT reach the thread that calls this (the main thread)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main() -> None:
    """Run one engine kernel (``python -m kernel_engine.engine -f FILE``)."""
    logging.getLogger("tornado").setLevel(logging.ERROR)
    app = EngineApp.instance()
    argv = sys.argv[1:]
    # the IPython profile the cluster names (Cluster(profile=...)): its config applies
    profile_dir = os.environ.get(PROFILE_DIR_ENV)
    if profile_dir:
        argv = [f"--profile-dir={profile_dir}", *argv]
    app.initialize(argv)
    app.start()
