"""The SSH launcher: registering engines started on other hosts through ``ssh``.

``Cluster(engines="ssh", hosts={"node1": 2, "node2": 2}, ip="10.0.0.1")`` runs one ``ssh``
per engine: engine ``first_id + i`` goes to the ``i``-th slot of the hosts, taken in the
order given, each host as many times as its count (more engines than slots go round
again). Each asks for its id (``--id``), so ids follow the hosts' order.

Assumption: **the hosts share this machine's filesystem layout** (a shared home or
software folder, or the same image): the remote command is this controller's own Python
(``sys.executable``, so the same virtual environment) and working directory, by path.
Nothing else is needed there: the cluster's connection info (with its key) and the other
engine settings are written to ssh's standard input as ``NAME=value`` lines, which the
remote shell exports before it ``exec``-s the engine, so they never appear on a command
line (``ps``) on either host. The engine's output comes back through ssh into
``engine-<id>.log`` in the cluster folder, with ssh's own messages, so
``cluster.engine_logs()`` shows it wherever the engine ran.

The controller must be reachable from the hosts: a cluster with a host other than this
one must bind ``ip`` to an address of this machine (never loopback, never a wildcard
address); :func:`address_problem` says which (the one that routes to the first such
host). Everything off-host is encrypted with CurveZMQ (on by default for such an ``ip``;
turning it off is refused).

Failures are reported with ssh's own words: an ``ssh`` that exits with an error before
the start is over (a host refusing the connection, a rejected key, a bad option in
``ssh_args``, a remote command that fails), or that exits before its engine registered
(``ssh_args=["-V"]``), fails the start with the end of its output.

Stopping: the engines were asked to shut down by the controller; those whose ssh session
is still there after a moment are ended by PID through ssh (each remote shell prints its
PID, which is the engine's: it ``exec``-s the engine; the signal goes to its process
group, and a PID is only signalled while its command line is an engine's), then the ssh
sessions themselves. ``launchers.json`` keeps the hosts and log files, so a cluster whose
controller died is stopped the same way (:func:`stop_record`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kernel_engine import clusters, processes, protocol
from kernel_engine.engine.register import REGISTERED
from kernel_engine.errors import LaunchError

from .base import LaunchContext, Launcher, kill_recorded, process_tree, tail
from .mpi import check_args

SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
"""Always given to ssh, after ``ssh_args`` (so an ``-o`` there wins): no terminal, never a
password prompt, a bounded connect."""

WILDCARDS = frozenset({"0.0.0.0", "::", "*", "", "0:0:0:0:0:0:0:0"})
"""Addresses that mean "every interface": never a cluster's with remote engines."""

PID_MARK = "jupyter-px ssh engine pid"
"""What the remote shell prints before it becomes the engine (then its PID)."""

ENGINE_MODULE = "kernel_engine.engine.register"

LOGS_QUOTED = 4
"""How many engines' logs (ssh's output) a start that times out quotes."""

SETTLE = 2.0
"""Seconds stop gives engines asked to shut down to end their ssh sessions themselves."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOST = re.compile(r"[A-Za-z0-9_.:%@\[\]-]+\Z")


# ----- pure decisions


def check_hosts(value: Any) -> dict[str, int]:
    """``hosts``: a mapping of host (``name``, ``user@name``, an address) to how many
    engines go there (at least 1), not empty.

    Raises
    ------
    TypeError, ValueError
        Naming what is wrong.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f'hosts must be a dict like {{"host": 2}}, not {value!r}')
    if not value:
        raise ValueError("hosts is empty: name at least one host")
    out: dict[str, int] = {}
    for host, count in value.items():
        if not isinstance(host, str) or not _HOST.match(host) or host.startswith("-"):
            raise ValueError(f"hosts: {host!r} is not a host name or address")
        out[host] = protocol.check_int(f"hosts[{host!r}]", count, 1, 4096)
    return out


def host_address(host: str) -> str:
    """The host part of ``user@host`` (brackets of ``[v6]`` removed)."""
    return host.rsplit("@", 1)[-1].strip("[]")


def is_local(host: str) -> bool:
    """Whether ``host`` names this machine by loopback (``localhost``, ``127.x``, ``::1``)."""
    addr = host_address(host)
    return addr in protocol.LOCAL_IPS or addr.startswith("127.")


def placement(hosts: Mapping[str, int], n: int) -> list[str]:
    """The host of each of ``n`` engines: the hosts' slots in order, round again if
    ``n`` is larger than their sum."""
    slots = [host for host, count in hosts.items() for _ in range(count)]
    return [slots[i % len(slots)] for i in range(n)] if slots else []


def address_problem(
    ip: str, hosts: Mapping[str, int], suggestion: str | None = None, curve: bool | None = None
) -> str | None:
    """Why a controller bound to ``ip`` cannot serve engines on ``hosts`` (None: it can).

    ``suggestion`` is the address of this machine that the remote hosts reach, for the
    message; ``curve`` the cluster's choice (None: the default).
    """
    remote = [h for h in hosts if not is_local(h)]
    if ip in WILDCARDS:
        return f"ip={ip!r} binds every interface: an ssh cluster binds one address, " + _use(
            suggestion, remote
        )
    if not remote:
        return None
    if ip in protocol.LOCAL_IPS or ip.startswith("127."):
        return (
            f"engines on {', '.join(remote[:3])}{' ...' if len(remote) > 3 else ''} cannot "
            f"reach a controller bound to loopback ({ip}): " + _use(suggestion, remote)
        )
    if curve is False:
        return (
            f"curve=False with engines on other hosts ({remote[0]}): traffic off this "
            "host is always encrypted (leave curve unset)"
        )
    return None


def _use(suggestion: str | None, remote: Sequence[str]) -> str:
    if suggestion:
        return (
            f"give ip={suggestion!r}, the address of this machine that "
            f"{remote[0] if remote else 'the hosts'} reaches"
        )
    return "give ip= the address of this machine that the hosts reach"


def env_lines(env: Mapping[str, str]) -> bytes:
    """The engine's environment as ``NAME=value`` lines for the remote shell to export,
    ended by an empty line."""
    out = []
    for name, value in env.items():
        if not _NAME.match(name) or "\n" in value or "\0" in value or "\r" in value:
            raise ValueError(f"cannot pass {name!r} to a remote engine (bad name or value)")
        out.append(f"{name}={value}\n")
    return ("".join(out) + "\n").encode()


def remote_command(python: str, eid: int, cwd: str | None, extra: Sequence[str] = ()) -> str:
    """What ssh runs on the host: a POSIX shell that prints its PID, exports the lines
    read from stdin, goes to ``cwd`` and becomes the engine (same PID)."""
    engine = shlex.join([python, "-m", ENGINE_MODULE, "--id", str(eid), *extra])
    script = (
        f'echo "{PID_MARK} $$" >&2; '
        'while IFS= read -r kv && [ -n "$kv" ]; do export "$kv"; done; '
        + (f"cd {shlex.quote(cwd)} || exit 1; " if cwd else "")
        + f"exec {engine}"
    )
    return f"exec /bin/sh -c {shlex.quote(script)}"


def pid_from_output(text: str) -> int | None:
    """The engine's PID, from what its remote shell printed."""
    for line in text.splitlines():
        if line.startswith(PID_MARK):
            value = line[len(PID_MARK) :].strip()
            return int(value) if value.isdigit() else None
    return None


def stop_command(engines: Mapping[int, int], wait: float) -> str:
    """A remote shell command that ends engines (``{pid: engine id}``): SIGTERM to each
    one's process group while its PID still runs that engine (its command line says so),
    ``wait`` s for them to go, then SIGKILL."""
    pairs = " ".join(f"{int(pid)}:{int(eid)}" for pid, eid in engines.items())
    rounds = max(1, int(wait * 10))
    script = (
        "mine=; "
        f"for pe in {pairs}; do p=${{pe%%:*}}; e=${{pe#*:}}; "
        "[ -r /proc/$p/cmdline ] || continue; "
        f"tr '\\0' ' ' </proc/$p/cmdline | grep -qF \"{ENGINE_MODULE} --id $e \" || continue; "
        'mine="$mine $p"; done; '
        '[ -z "$mine" ] && exit 0; '
        "for p in $mine; do kill -TERM -$p 2>/dev/null || kill -TERM $p 2>/dev/null; done; "
        "i=0; "
        f"while [ $i -lt {rounds} ]; do alive=; "
        # (gone: no such process, or a zombie that nobody reaps yet)
        "for p in $mine; do s=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -c1); "
        '[ -n "$s" ] && [ "$s" != Z ] && alive=1; done; '
        '[ -z "$alive" ] && exit 0; sleep 0.1; i=$((i+1)); done; '
        "for p in $mine; do kill -KILL -$p 2>/dev/null; kill -KILL $p 2>/dev/null; done; "
        "exit 0"
    )
    return f"exec /bin/sh -c {shlex.quote(script)}"


# ----- looking at this machine


def route_address(host: str) -> str | None:
    """The address of this machine that packets to ``host`` leave from (a datagram
    socket's connect picks a route and sends nothing); None if unknown."""
    addr = host_address(host)
    try:
        family, _, _, _, target = socket.getaddrinfo(addr, 22, proto=socket.IPPROTO_UDP)[0]
        probe = socket.socket(family, socket.SOCK_DGRAM)
    except (OSError, IndexError):
        return None
    try:
        probe.connect(target)
        return str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()


def check_address(ip: str, hosts: Mapping[str, int], curve: bool | None = None) -> None:
    """Raise ValueError saying which address to use when a controller on ``ip`` cannot
    serve engines on ``hosts`` (see :func:`address_problem`)."""
    if address_problem(ip, hosts, None, curve) is None:
        return
    remote = [h for h in hosts if not is_local(h)]
    suggestion = route_address(remote[0]) if remote else None
    problem = address_problem(ip, hosts, suggestion, curve)
    if problem:
        raise ValueError(problem)


# ----- the launcher


class SSHLauncher(Launcher):
    """One ``ssh`` per engine (see the module docstring).

    Options: ``hosts`` (``{"host": n}``, required), ``ssh_args`` (more ssh arguments:
    ``["-F", "config"]``, ``["-i", "key", "-p", "2222"]``), ``ssh`` (the command, default
    ``ssh``).
    """

    name = "ssh"
    options = frozenset({"hosts", "ssh_args", "ssh"})

    def __init__(self, context: LaunchContext):
        super().__init__(context)
        if "hosts" not in context.options:
            raise ValueError('engines="ssh" needs hosts={"host": n, ...}')
        self.hosts = check_hosts(context.options["hosts"])
        self.ssh_args = check_args("ssh_args", context.options.get("ssh_args"))
        self.ssh = str(context.options.get("ssh") or "ssh")
        self.placed = placement(self.hosts, context.n)
        self.sessions: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, str | None] = {}  # (each session's start time)
        self._ended: set[int] = set()
        self._seen_registered: set[int] = set()
        self._stopping = False

    def ssh_command(self, host: str, remote: str) -> list[str]:
        return [self.ssh, *self.ssh_args, *SSH_OPTIONS, host, remote]

    def log_path(self, eid: int) -> Path:
        return self.context.folder / f"engine-{eid}.log"

    def engine_env(self) -> dict[str, str]:
        env = dict(self.context.env)
        profile = os.environ.get(clusters.PROFILE_DIR_ENV)
        if profile and clusters.PROFILE_DIR_ENV not in env:
            env[clusters.PROFILE_DIR_ENV] = profile
        return env

    def start(self) -> list[int]:
        env = self.engine_env()
        info = env.get(clusters.CONNECTION_ENV)
        if info:  # (a controller started without Cluster's checks: the same ones)
            cluster = json.loads(info)
            curve = bool(cluster.get("curve_serverkey"))
            problem = address_problem(str(cluster.get("ip", "")), self.hosts, curve=curve)
            if problem:
                raise LaunchError(problem)
        lines = env_lines(env)
        for eid, host in zip(self.ids, self.placed):
            cmd = self.ssh_command(host, remote_command(self.context.python, eid, self.context.cwd))
            with open(self.log_path(eid), "ab") as log:
                log.write(f"$ {shlex.join(cmd[:-1])} <engine {eid}>\n".encode())
                log.flush()
                try:
                    process = subprocess.Popen(
                        cmd,
                        stdin=subprocess.PIPE,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                except FileNotFoundError:
                    self.stop(1.0)
                    raise LaunchError(f"{self.ssh} is not installed (not found on PATH)") from None
            self.sessions[eid] = process
            self._started[eid] = processes.start_time(process.pid)
            assert process.stdin is not None
            try:
                process.stdin.write(lines)
                process.stdin.close()
            except OSError:
                pass  # (ssh failed already: poll reports it with its message)
        return self.ids

    def poll(self) -> str | None:
        if self._stopping:
            return None
        for eid, process in self.sessions.items():
            code = process.poll()
            if code is None or (code == 0 and self._registered(eid)):
                continue
            host = self.placed[self.ids.index(eid)]
            said = tail(self.log_path(eid)) or "(no output)"
            why = " before its engine registered" if code == 0 else ""
            return f"ssh {host} (engine {eid}) exited with code {code}{why}; its output:\n{said}"
        return None

    def _registered(self, eid: int) -> bool:
        """Whether engine ``eid`` said it registered (its output comes back through ssh;
        remembered once seen)."""
        if eid not in self._seen_registered and REGISTERED in _head(self.log_path(eid), 1 << 20):
            self._seen_registered.add(eid)
        return eid in self._seen_registered

    def ended(self) -> dict[int, tuple[int | None, str]]:
        out: dict[int, tuple[int | None, str]] = {}
        for eid, process in self.sessions.items():
            code = process.poll()
            if code is None or eid in self._ended:
                continue
            self._ended.add(eid)
            if self._stopping:
                continue
            host = self.placed[self.ids.index(eid)]
            last = tail(self.log_path(eid), 1).strip()
            out[eid] = (
                pid_from_output(_head(self.log_path(eid))),
                f"ended on {host}: its ssh session exited with code {code}"
                + (f" (its last words: {last[:300]})" if last else "")
                + f" (output in {self.log_path(eid).name})",
            )
        return out

    def log_files(self) -> list[Path]:
        # (ssh's own output is in its engine's log: a start that times out quotes those
        # of a few engines not registered yet, a host that hangs, say)
        waiting = [self.log_path(eid) for eid in self.ids if not self._registered(eid)]
        return waiting[:LOGS_QUOTED]

    def remote_pids(self) -> dict[str, dict[int, int]]:
        """``{pid: engine id}`` of the engines whose ssh session still runs, by host."""
        out: dict[str, dict[int, int]] = {}
        for eid, host in zip(self.ids, self.placed):
            process = self.sessions.get(eid)
            if process is None or process.poll() is not None:
                continue
            pid = pid_from_output(_head(self.log_path(eid)))
            if pid is not None:
                out.setdefault(host, {})[pid] = eid
        return out

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + min(SETTLE, timeout)
        while time.monotonic() < deadline and any(p.poll() is None for p in self.sessions.values()):
            time.sleep(0.05)
        kill_remote(self.remote_pids(), [self.ssh, *self.ssh_args], timeout)
        for eid, process in self.sessions.items():
            _end(process, timeout, self._started.get(eid))

    def record(self) -> dict[str, Any]:
        engines = []
        for eid, host in zip(self.ids, self.placed):
            process = self.sessions.get(eid)
            engines.append(
                {
                    "id": eid,
                    "host": host,
                    "log": str(self.log_path(eid)),
                    "ssh_pid": process.pid if process else None,
                    "ssh_started": self._started.get(eid),
                }
            )
        return {
            "launcher": self.name,
            "ids": self.ids,
            "ssh": [self.ssh, *self.ssh_args],
            "engines": engines,
        }


def _head(path: Path, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode(errors="replace")
    except OSError:
        return ""


def _end(process: subprocess.Popen[bytes], timeout: float, started: str | None) -> None:
    """End a local ssh session: SIGTERM, then SIGKILL; reaped. Then SIGKILL to what it
    left in its session (``started``: its start time; None: unknown, nothing more):
    ssh does not end its ``ProxyCommand`` when SIGTERM ends it."""
    tree = process_tree(process.pid, started) if started else {}
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(min(2.0, timeout))
        except (ProcessLookupError, subprocess.TimeoutExpired):
            process.kill()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
    kill_recorded(tree, 2.0)


def kill_remote(
    pids: Mapping[str, Mapping[int, int]], ssh: Sequence[str], timeout: float
) -> list[str]:
    """End engine PIDs on each host through ssh, all hosts at once, within about
    ``timeout`` s (SIGTERM, then SIGKILL half-way); the hosts where that failed, with
    ssh's words."""
    running: dict[str, subprocess.Popen[bytes]] = {}
    for host, host_pids in pids.items():
        if not host_pids:
            continue
        connect = ("-o", f"ConnectTimeout={max(1, int(timeout / 2))}")
        cmd = [*ssh, *connect, *SSH_OPTIONS, host, stop_command(host_pids, timeout / 2)]
        running[host] = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    failed = []
    deadline = time.monotonic() + timeout + 1.0
    for host, process in running.items():
        try:
            _, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if process.returncode != 0:
            failed.append(f"{host}: {err.decode(errors='replace').strip()}")
    return failed


def stop_record(record: Mapping[str, Any], timeout: float) -> None:
    """Stop what an SSH launcher's record says it started (its controller died)."""
    ssh = record.get("ssh")
    if not isinstance(ssh, list) or not all(isinstance(a, str) for a in ssh) or not ssh:
        return
    pids: dict[str, dict[int, int]] = {}
    sessions = []
    for engine in record.get("engines") or []:
        if not isinstance(engine, dict):
            continue
        host, log, eid = engine.get("host"), engine.get("log"), engine.get("id")
        if isinstance(host, str) and _HOST.match(host) and isinstance(log, str):
            pid = pid_from_output(_head(Path(log)))
            if pid is not None and isinstance(eid, int):
                pids.setdefault(host, {})[pid] = eid
        pid, started = engine.get("ssh_pid"), engine.get("ssh_started")
        if isinstance(pid, int) and pid > 1 and isinstance(started, str):
            sessions.append((pid, started))
    kill_remote(pids, ssh, timeout)
    for pid, started in sessions:
        _end_recorded(pid, started, timeout)


def _end_recorded(pid: int, started: str, timeout: float) -> None:
    """End the recorded local process ``pid`` if it still is the one recorded."""

    def same() -> bool:
        return processes.start_time(pid) == started

    tree = process_tree(pid, started)  # (its ProxyCommand, say: see _end)
    if same():
        try:
            processes.terminate(pid, timeout, same)
        except TimeoutError:
            pass
    kill_recorded(tree, 2.0)
