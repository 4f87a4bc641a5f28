"""Fork templates, from the side of the process that starts kernels: start one, ask it
for kernels, watch them (see :mod:`kernel_engine.engine.template` for the template's side).

One template serves every kernel started in this process with the same Python, cwd,
preload and start-up environment (the variables the interpreter reads when it starts:
``PYTHON*``, ``LD_*``, ``LC_*``, ``LANG``, ``TZ``); any other difference gets a template
of its own, at most :data:`MAX_TEMPLATES`. Everything else in a kernel's environment is
its own: the child's ``os.environ`` is replaced by it. A module that reads some other
variable when it is imported sees the template's value: only modules that do not are
preloaded (ipykernel, IPython, zmq, tornado: they read theirs when called).

A template that failed (did not start, refused, died, did not answer) is not started
again for the same key: the provisioner takes the plain local path for its kernels from
then on. A kernel already forked from a template that died keeps running; only its exit
code is then unknown (:data:`UNKNOWN_EXIT`, logged).

:func:`prestart` starts the template before it is asked for, so that its imports overlap
the controller's own (the controller calls it first thing); one nobody asks for within
:data:`PRESTART_IDLE_S` exits by itself.

This module imports only the standard library, so that :func:`prestart` is cheap.

Threads: the pool and each template may be used from several threads and event loops
(kernel managers of one process); every state change is made under a lock, and nothing
here awaits on a socket: the provisioner polls.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, ClassVar

from kernel_engine import processes

log = logging.getLogger("kernel_engine.provisioner")

DEFAULT_PRELOAD = (
    "kernel_engine.engine.app",
    "kernel_engine.engine.kernel",
    "kernel_engine.engine.lane",
    "kernel_engine.serialize",
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    # what a kernel's initialisation imports besides (not debugpy: see
    # kernel_engine.engine.kernel.without_debugger)
    "IPython.core.debugger",
    "IPython.core.completerlib",
    "IPython.extensions.storemagic",
    "tornado.queues",
    "psutil",
    "sqlite3",
    "faulthandler",
    "cloudpickle",
)
"""What the template imports by default: what an engine has imported once it is ready
(none of it starts a thread)."""
MAX_TEMPLATES = 4
"""Templates one process keeps (one per Python, cwd, environment and preload)."""
UNKNOWN_EXIT = 255
"""The returncode of a forked kernel whose end its template, gone, could not report."""
_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "LC_")
_STARTUP_ENV = frozenset({"LANG", "TZ", "JUPYTER_PX_ENGINE_DEBUGGER"})
"""What the interpreter (or an engine module, as it is imported: ``ENGINE_DEBUGGER_ENV``
of :mod:`kernel_engine.clusters`, which this module does not import) reads of its
environment when it starts (so a template's and its kernels' must agree)."""
DISABLE_ENV = "JUPYTER_PX_NO_FORK"
"""Set (to anything but empty or ``0``) in the controller's environment: no templates,
every kernel takes the plain local path (to compare, or to rule the fork path out)."""
PRESTART_IDLE_S = 120.0
"""Seconds a template started by :func:`prestart` waits for its first request."""


class TemplateError(Exception):
    """Raised when a template cannot fork a kernel (it is then given up)."""


class ForkedProcess:
    """A kernel forked by a template, with the part of :class:`subprocess.Popen`'s
    interface that a provisioner and the controller use (``pid``, ``returncode``,
    ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``).

    Its status channel receives the returncode from the template; a pidfd tells whether
    it still runs should the template be gone.
    """

    stdin = stdout = stderr = None

    def __init__(self, pid: int, channel: socket.socket):
        self.pid = pid
        self.returncode: int | None = None
        self._channel: socket.socket | None = channel
        self._orphaned = False
        self._lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None

    def poll(self) -> int | None:
        """The returncode if the kernel ended, else None; never blocks."""
        with self._lock:
            if self.returncode is None and self._channel is not None:
                self._read()
            if self.returncode is None and self._orphaned and not self._orphan_runs():
                log.warning(
                    "kernel %d, forked by a template that is gone, has ended; its exit "
                    "code is unknown",
                    self.pid,
                )
                self.returncode = UNKNOWN_EXIT
            return self.returncode

    def _orphan_runs(self) -> bool:
        """Whether the kernel still runs, by its pidfd (readable once it has ended)."""
        return self._pidfd is not None and not processes.readable([self._pidfd], 0)

    def _read(self) -> None:
        assert self._channel is not None
        try:
            message = self._channel.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if message.startswith(b"exit "):
            self.returncode = int(message[5:])
        elif not message:  # (the template closed it without a returncode: it died)
            self._channel.close()
            self._channel = None
            self._orphaned = True

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the kernel to end; its returncode.

        Raises
        ------
        subprocess.TimeoutExpired
            When ``timeout`` s passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                self.close()
                return code
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            waitables = [f for f in (self._channel, self._pidfd) if f is not None]
            processes.readable(waitables, 0.1 if left is None else min(left, 0.1))

    def send_signal(self, signum: int) -> None:
        """Signal the kernel, unless it has ended (its PID may name another process)."""
        if self.poll() is not None:
            return
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)
        else:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Let go of the kernel: its template reaps it (once it has ended)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TemplateProcess:
    """One template process, as its controller side sees it: starting, ready or dead."""

    def __init__(
        self,
        python: str,
        env: dict[str, str],
        cwd: str,
        preload: list[str],
        idle_exit: float | None = None,
    ):
        self.python = python
        self.prestarted = idle_exit is not None
        self.forks = 0
        self.state = "starting"
        self.why = ""
        self._lock = threading.Lock()
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.started_at = time.monotonic()
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    python,
                    "-m",
                    "kernel_engine.engine.template",
                    "--fd",
                    str(theirs.fileno()),
                    *(["--idle-exit", str(idle_exit)] if idle_exit is not None else []),
                    "--preload",
                    *preload,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError as exc:
            self.process = None
            self._dead(f"could not be started: {exc}")
        finally:
            theirs.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _dead(self, why: str) -> None:
        if self.state != "dead":
            self.state = "dead"
            self.why = why
            self.control.close()

    def check(self) -> str:
        """Its state now (``starting``, ``ready``, ``dead``), reading its answer if one
        came; never blocks."""
        with self._lock:
            if self.state == "starting" and processes.readable([self.control], 0):
                try:
                    answer = self.control.recv(4096)
                except OSError:
                    answer = b""
                if answer == b"ready":
                    self.state = "ready"
                else:
                    self._dead(answer.decode(errors="replace") or "exited while importing")
            if self.state != "dead" and self.process is not None:
                code = self.process.poll()
                if code is not None:
                    self._dead(f"exited ({code})")
            return self.state

    async def ready(self, timeout: float) -> bool:
        """Wait (without blocking the event loop) until it is ready; False if it is dead
        or still not ready ``timeout`` s after it was started (then it is stopped)."""
        import asyncio  # (here: this module is imported first thing by the controller)

        while self.check() == "starting":
            if time.monotonic() - self.started_at > timeout:
                self.stop(f"not ready within {timeout:g} s")
                return False
            await asyncio.sleep(0.005)
        return self.state == "ready"

    def fork(
        self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int], timeout: float
    ) -> ForkedProcess:
        """Fork a kernel running ``argv`` (``[python, "-m", module, ...]``).

        Raises
        ------
        TemplateError
            When the template is not ready or does not answer within ``timeout`` s (it
            is then stopped).
        """
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                if self.state != "ready":
                    raise TemplateError(f"the template is {self.state}")
                try:
                    socket.send_fds(self.control, [request], [*fds, theirs.fileno()])
                except OSError as exc:
                    self._dead(f"its control socket failed: {exc}")
                    raise TemplateError(self.why) from exc
        finally:
            theirs.close()
        ready = processes.readable([ours], timeout)
        answer = ours.recv(64) if ready else b""
        if not answer.startswith(b"pid "):
            ours.close()
            self.stop("did not fork" if ready else f"no answer within {timeout:g} s")
            raise TemplateError(self.why)
        self.forks += 1
        return ForkedProcess(int(answer[4:]), ours)

    def stop(self, why: str = "stopped") -> None:
        """Stop it (the kernels it forked keep running)."""
        with self._lock:
            self._dead(why)
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


class TemplatePool:
    """This process's templates, by Python, cwd and environment."""

    _instance: ClassVar[TemplatePool | None] = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.templates: dict[tuple[Any, ...], TemplateProcess] = {}
        self.failed: dict[tuple[Any, ...], str] = {}

    @classmethod
    def instance(cls) -> TemplatePool:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @staticmethod
    def key(python: str, env: dict[str, str], cwd: str, preload: list[str]) -> tuple[Any, ...]:
        """What kernels must share to be forked from one template (see the module)."""
        startup = tuple(
            sorted(
                (k, v)
                for k, v in env.items()
                if k in _STARTUP_ENV or k.startswith(_STARTUP_ENV_PREFIXES)
            )
        )
        return (python, os.path.realpath(cwd), startup, tuple(preload))

    def get(
        self, python: str, env: dict[str, str], cwd: str, preload: list[str]
    ) -> tuple[TemplateProcess | None, str]:
        """The template for these, started if there is none yet; else None and why: a
        template for them failed before (it is not started again: their kernels take the
        plain path from then on), or :data:`MAX_TEMPLATES` run already."""
        key = self.key(python, env, cwd, preload)
        with self._lock:
            template = self.templates.get(key)
            if template is not None and template.check() == "dead":
                self.templates.pop(key)
                if not (template.prestarted and template.forks == 0):
                    log.warning(
                        "the fork template (pid %s) is gone: %s", template.pid, template.why
                    )
                    self.failed[key] = f"the fork template (pid {template.pid}) {template.why}"
                template = None  # (one prestarted for nothing, idle too long: started again)
            if template is not None:
                return template, ""
            if key in self.failed:
                return None, self.failed[key]
            for other_key, other in list(self.templates.items()):
                if other.prestarted and other.forks == 0:  # (prestarted for other kernels)
                    other.stop("not needed")
                    del self.templates[other_key]
            if len(self.templates) >= MAX_TEMPLATES:
                return None, f"({MAX_TEMPLATES} fork templates run already)"
            template = TemplateProcess(python, env, cwd, preload)
            self.templates[key] = template
            return template, ""

    def prestart(
        self, python: str, env: dict[str, str], cwd: str, preload: list[str]
    ) -> TemplateProcess:
        """Start the template for these now, before a kernel asks for it; it exits by
        itself when none has asked within :data:`PRESTART_IDLE_S`."""
        key = self.key(python, env, cwd, preload)
        with self._lock:
            template = self.templates.get(key)
            if template is None or template.check() == "dead":
                template = TemplateProcess(python, env, cwd, preload, PRESTART_IDLE_S)
                self.templates[key] = template
            return template

    def close(self) -> None:
        """Stop every template (their kernels keep running)."""
        with self._lock:
            templates, self.templates = list(self.templates.values()), {}
        for template in templates:
            template.stop()


def disabled() -> bool:
    """Whether :data:`DISABLE_ENV` turns fork templates off in this process."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def prestart(argv: list[str]) -> None:
    """Start the engines' template now if the controller whose command line is ``argv``
    will start local engines (``-n`` more than 0, the local launcher): its imports then
    overlap the controller's own. Never fails: a template that cannot start is the
    provisioner's to find out about and report."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-n", "--n", type=int, default=0)
    parser.add_argument("--engines", default="local")
    parser.add_argument("--cwd", default=None)
    try:
        args, _ = parser.parse_known_args(argv)
    except (SystemExit, ValueError):
        return
    if args.n <= 0 or args.engines != "local" or sys.platform != "linux" or disabled():
        return
    cwd = args.cwd or os.getcwd()
    try:
        TemplatePool.instance().prestart(
            sys.executable, dict(os.environ), cwd, list(DEFAULT_PRELOAD)
        )
    except Exception:
        log.exception("could not prestart the fork template")
