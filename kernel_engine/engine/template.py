"""The fork template: a process that has imported what an engine needs and forks engines.

Starting a Python kernel costs about half a second of CPU, most of it importing
ipykernel, IPython, zmq and tornado; eight engines on two cores pay that eight times over.
The template pays it once: it imports the engine's modules (``--preload``), freezes the
garbage collector (so collections in the children do not write to the shared pages),
tells the controller it is ready, and then forks one child per request. Each child
becomes exactly what ``python -m MODULE ARGS...`` would have been: its own session
(process group) as a kernel manager gives a kernel, the stdin/stdout/stderr it was sent,
the cwd and environment it was given, ``sys.argv`` and ``sys.path[0]`` as ``-m`` sets
them. The modules already imported are shared with the template page by page until
written.

A fork is only safe from a process with one thread and no zmq context or event loop:
the template checks that after the preload and refuses to serve otherwise (the
provisioner then starts engines the plain way).

Wire (``AF_UNIX`` ``SOCK_SEQPACKET``, so each message arrives whole): the controller
holds the other end of the template's *control* socket, inherited as file descriptor
``--fd``. The template sends ``ready`` (or ``refused: why``) once. Each request is one
message, a JSON object ``{"argv": [...], "env": {...}, "cwd": "..."}``, carrying four
descriptors: stdin, stdout, stderr, and the child's *status channel*: the template
answers on it ``pid N`` at once, and ``exit CODE`` (the returncode, negative for a
signal, as :class:`subprocess.Popen` gives it) when the child ends. The child is waited
for with ``WNOWAIT`` and reaped only when the controller closes the status channel, so
its PID is not reused while the controller may still signal it (as with a child of its
own that it has not waited for).

The template exits when the control socket's other end closes or its parent changes,
which is when the controller exits, however it exits (SIGKILL included); with
``--idle-exit S`` also when no request came within S seconds (one started ahead of need
that was not needed). Engines it
forked are not stopped with it: like any engine they watch their controller and
outlive it for a grace period (see :mod:`.watch`).

Threads: one, the main thread, running :func:`serve`'s select loop.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE = 1 << 20
"""Largest request accepted (a JSON argv and environment)."""
PARENT_CHECK_S = 1.0
"""How often the template checks that its parent (the controller) is still the same."""


@dataclass
class Child:
    """One forked engine, until the controller closes its status channel."""

    pid: int
    channel: socket.socket
    code: int | None = None


@dataclass
class Template:
    """The serving state: the control socket, the children, the SIGCHLD wake-up pipe."""

    control: socket.socket
    parent: int
    cwd_on_path: bool
    children: dict[int, Child] = field(default_factory=dict)
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    wake_r: int = -1
    wake_w: int = -1
    idle_exit: float | None = None
    forks: int = 0


def preload(modules: list[str]) -> str | None:
    """Import ``modules``; return why forking is not safe afterwards, or None."""
    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threading.active_count() != 1 or threads != 1:
        return f"{threads} threads after importing {modules}"
    zmq = sys.modules.get("zmq")
    if zmq is not None and getattr(zmq.Context, "_instance", None) is not None:
        return "a zmq context exists after the preload"
    return None


def _exit_code(value: Any) -> int:
    """The process exit code for ``SystemExit(value)``, as the interpreter decides it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _become_child(t: Template, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become ``python -m MODULE ARGS`` and never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in {*fds, t.wake_r, t.wake_w}:
            if fd > 2:
                os.close(fd)
        t.control.close()
        for other in t.children.values():
            other.channel.close()
        t.selector.close()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        if t.cwd_on_path:
            sys.path[0] = os.getcwd()
        sys.argv = ["-m", *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
        finally:
            os._exit(code)


def _valid(request: Any) -> bool:
    """Whether a request has the shape the provisioner sends."""
    return (
        isinstance(request, dict)
        and isinstance(request.get("argv"), list)
        and len(request["argv"]) >= 3
        and request["argv"][1] == "-m"
        and all(isinstance(a, str) for a in request["argv"])
        and isinstance(request.get("env"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
        and isinstance(request.get("cwd"), str)
    )


def _fork(t: Template) -> bool:
    """Serve one request from the control socket; False when the controller is gone."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(t.control, MAX_MESSAGE, 4)
    except OSError:
        return False
    if not data:
        for fd in fds:
            os.close(fd)
        return False
    try:
        request = json.loads(data)
    except ValueError:
        request = None
    if len(fds) != 4 or not _valid(request):
        print(f"px fork template: a malformed request ({len(data)} bytes)", file=sys.stderr)
        for fd in fds:
            os.close(fd)
        return True
    channel = socket.socket(fileno=fds[3])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        _become_child(t, request, fds)
    for fd in fds[:3]:
        os.close(fd)
    child = Child(pid, channel)
    t.forks += 1
    t.children[pid] = child
    t.selector.register(channel, selectors.EVENT_READ, child)
    _send(child, b"pid %d" % pid)
    return True


def _send(child: Child, message: bytes) -> None:
    try:
        child.channel.send(message)
    except OSError:
        pass  # (the controller let go of it: it is reaped in _release)


def _collect(t: Template) -> None:
    """Tell the controller of every child that ended (left unreaped, see the docstring)."""
    for child in list(t.children.values()):
        if child.code is not None:
            continue
        try:
            info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
            child.code = -1
        if info is not None:
            if info.si_code == os.CLD_EXITED:
                child.code = info.si_status
            else:  # (killed or dumped core)
                child.code = -info.si_status
        if child.code is not None:
            _send(child, b"exit %d" % child.code)


def _release(t: Template, child: Child) -> None:
    """The controller closed the child's status channel: reap the child once it ends."""
    t.selector.unregister(child.channel)
    child.channel.close()
    if child.code is not None:
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass
        t.children.pop(child.pid, None)
    # (one still running is reaped by _reap_released once it ends)


def _reap_released(t: Template) -> None:
    for child in list(t.children.values()):
        if child.channel.fileno() == -1:
            try:
                pid, _status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid = child.pid
            if pid:
                t.children.pop(child.pid, None)


def serve(t: Template) -> None:
    """The select loop: requests, children ending, channels released, the parent."""
    t.selector.register(t.control, selectors.EVENT_READ, "control")
    t.selector.register(t.wake_r, selectors.EVENT_READ, "sigchld")
    idle_until = None if t.idle_exit is None else time.monotonic() + t.idle_exit
    while True:
        events = t.selector.select(PARENT_CHECK_S)
        if os.getppid() != t.parent:
            return
        if idle_until is not None and t.forks == 0 and time.monotonic() > idle_until:
            return  # (started ahead of need, and not needed)
        for key, _mask in events:
            what = key.data
            if what == "control":
                if not _fork(t):
                    return
            elif what == "sigchld":
                try:
                    os.read(t.wake_r, 512)
                except BlockingIOError:
                    pass
                _collect(t)
                _reap_released(t)
            else:
                try:
                    gone = what.channel.recv(16, socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    _release(t, what)
        # (a SIGCHLD that arrived between the select and now wakes the next select)


def _shutdown(t: Template) -> None:
    """Leave: reap the children that ended; those still running outlive the template."""
    _collect(t)
    for child in list(t.children.values()):
        if child.code is not None:
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def main(argv: list[str] | None = None) -> None:
    """``python -m kernel_engine.engine.template --fd N --preload MODULE...``."""
    parser = argparse.ArgumentParser(prog="python -m kernel_engine.engine.template")
    parser.add_argument("--fd", type=int, required=True, help="the control socket")
    parser.add_argument("--preload", nargs="*", default=[], help="modules to import")
    parser.add_argument(
        "--idle-exit", type=float, default=None, help="exit if no request came within this (s)"
    )
    args = parser.parse_args(argv)
    # debugpy warns on import about frozen modules, for whoever debugs: nobody debugs this
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    control = socket.socket(fileno=args.fd)
    cwd_on_path = bool(sys.path) and sys.path[0] == os.getcwd()
    try:
        why = preload(args.preload)
    except BaseException as exc:
        why = f"the preload failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
    if why is not None:
        print(f"px fork template: {why}", file=sys.stderr)
        try:
            control.send(f"refused: {why}".encode()[:4000])
        except OSError:
            pass
        return
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    t = Template(
        control, os.getppid(), cwd_on_path, wake_r=wake_r, wake_w=wake_w, idle_exit=args.idle_exit
    )
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    try:
        control.send(b"ready")
    except OSError:
        return
    try:
        serve(t)
    finally:
        _shutdown(t)


if __name__ == "__main__":
    main()
