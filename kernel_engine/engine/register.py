"""An engine that joins a running cluster by itself: ``jupyter px engine``.

Whatever starts it (a person, ``mpiexec``, ``srun``, ``ssh``), the engine needs only the
cluster's connection info, from one of:

- ``--file CLIENT_FILE``: the cluster's client connection file (``client.json``);
- ``--cluster-id ID``: the cluster's folder, on this machine or a shared filesystem;
- the environment variable :data:`~kernel_engine.clusters.CONNECTION_ENV` (JSON), which
  launchers set, so no shared filesystem is needed.

A kernel manager can run it as a kernel spec's command (the ``"provisioner"`` launcher,
:mod:`kernel_engine.launchers.provisioner`): with ``-f {connection_file}`` the engine binds
the address and ports that file names (those the spec's provisioner chose), signing with
the cluster's key, and it asks for the id in :data:`ID_ENV` when given no ``--id``.

It starts its kernel (ipykernel's sockets and the task lane, bound to ``--ip``: by default
the address this host reaches the controller from; for a controller on loopback whose
cluster folder is here, unix sockets in that folder, as the engines a cluster starts
itself use, which other users cannot reach, else loopback), then sends a signed
:data:`~kernel_engine.protocol.REGISTER_REQUEST` with its connection info to the
controller's client port and waits for the id it is given. The
controller then connects to it and sets it up as it does the engines it starts. The id
asked for is ``--id``, or with ``--id-from-rank`` the process's MPI or Slurm rank plus
``--id-offset``; an engine that comes back asks for the id it had.

Failures say why and exit with code 1 (to the launcher's output too, when the engine's own
output goes to ``--log-file``): connection info naming a controller of this host that is
gone (a stale ``client.json``: said at once), no controller answering within
``--timeout`` seconds, a refusal (an id held by a live engine is retried until then), or a
controller that never sets the engine up after accepting it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from kernel_engine import clusters, processes, protocol, wire
from kernel_engine.errors import RegistrationError

RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")
"""Where MPI implementations and Slurm say a process's rank, in the order looked at."""

RETRY_INTERVAL = 0.5
"""Seconds between registration attempts (no answer, or an id still held)."""

ID_ENV = "JUPYTER_PX_ENGINE_ID"
"""The engine id to ask for when the command line names none (launchers that start
engines through a kernel spec's command set it in the environment)."""

SETUP_TIMEOUT = 60.0
"""Seconds an accepted engine waits for the controller to set it up before it leaves."""

REGISTERED = "registered with cluster"
"""What an engine's output says once the controller took it in (launchers look for it)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jupyter px engine",
        description="Start an engine that joins a running cluster by itself.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--file", help="the cluster's client connection file (client.json)")
    where.add_argument("--cluster-id", help="the cluster's id (its folder on this host)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--id", type=int, default=None, help="the engine id to ask for")
    which.add_argument(
        "--id-from-rank",
        action="store_true",
        help="ask for the id --id-offset + this process's MPI or Slurm rank",
    )
    p.add_argument("--id-offset", type=int, default=0, help="added to the rank")
    p.add_argument(
        "-f",
        "--connection-file",
        default=None,
        help="a kernel connection file whose address and ports the engine binds "
        "(a kernel spec's {connection_file}); its key is replaced by the cluster's",
    )
    p.add_argument("--ip", default=None, help="the interface the engine binds")
    p.add_argument("--log-file", default=None, help="the engine's output ({id}: its id)")
    p.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds to wait for the controller"
    )
    return p


def _seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0 (``nan`` or ``-1`` started the
    kernel, then gave up at once with 'not registered ... in nan s')."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def connection_info(file: str | None, cluster_id: str | None) -> dict[str, Any]:
    """The cluster's connection info from ``file``, ``cluster_id`` or the environment.

    Raises
    ------
    RegistrationError
        When none is given or it is unusable (no key, no address, no port).
    """
    if file or cluster_id:
        try:
            path = clusters.find_connection_file(file or cluster_id)
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistrationError(f"cannot read the cluster's connection info: {exc}") from None
        source = str(path)
    elif os.environ.get(clusters.CONNECTION_ENV):
        source = f"${clusters.CONNECTION_ENV}"
        try:
            info = json.loads(os.environ[clusters.CONNECTION_ENV])
        except ValueError as exc:
            raise RegistrationError(f"{source} is not JSON: {exc}") from None
    else:
        raise RegistrationError(
            f"which cluster? give --file CLIENT_FILE, --cluster-id ID or ${clusters.CONNECTION_ENV}"
        )
    if not isinstance(info, dict):
        raise RegistrationError(f"{source} does not hold a connection info object")
    try:
        protocol.check_host("ip", info.get("ip"))
        protocol.check_int("client_port", info.get("client_port"), 1, 65535)
        if not isinstance(info.get("key"), str) or not info["key"]:
            raise ValueError("it has no key")
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"unusable connection info in {source}: {exc}") from None
    # (a file only: what a launcher hands its engines comes from a running controller,
    # and may reach a container of this host's name whose PIDs are not this host's)
    gone = controller_gone(info) if file or cluster_id else None
    if gone:
        raise RegistrationError(f"{source} is stale: {gone}")
    return info


def controller_gone(info: dict[str, Any]) -> str | None:
    """Why the controller that ``info`` names surely is not running (None: it may be):
    it ran on this host, and its process (PID and start time) is gone. Waiting
    ``--timeout`` seconds for its answer would only end in 'no answer'."""
    pid, started = info.get("controller_pid"), info.get("controller_started")
    if info.get("hostname") != socket.gethostname():
        return None
    if not (isinstance(pid, int) and pid > 0 and isinstance(started, str) and started):
        return None
    if processes.start_time(pid) == started:
        return None
    return (
        f"the controller of cluster {info.get('cluster_id')} (pid {pid} on this host) "
        "is not running"
    )


def requested_id(args: argparse.Namespace) -> int | None:
    """The id to ask for: ``--id``, the rank plus the offset, :data:`ID_ENV`, or None
    (any)."""
    if args.id is not None:
        return protocol.check_int("--id", args.id, 0, protocol.MAX_ENGINE_ID)
    if not args.id_from_rank:
        # (not left for what the engine starts: another engine would ask for this id)
        given = os.environ.pop(ID_ENV, "")
        if not given:
            return None
        if not (given.isascii() and given.isdigit()):
            raise RegistrationError(f"${ID_ENV} must be an engine id, not {given!r}")
        return protocol.check_int(f"${ID_ENV}", int(given), 0, protocol.MAX_ENGINE_ID)
    for name in RANK_ENV:
        value = os.environ.get(name, "")
        if value.isdigit():
            return protocol.check_int("rank + offset", args.id_offset + int(value), 0)
    raise RegistrationError(f"--id-from-rank: no rank in the environment (looked at {RANK_ENV})")


def bind_address(controller_ip: str) -> str:
    """The address to bind so the controller reaches us: loopback for a controller on
    loopback, else the address of the interface that routes to it (no packet is sent)."""
    if controller_ip in protocol.LOCAL_IPS or controller_ip.startswith("127."):
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in controller_ip else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect((controller_ip, 9))  # a datagram socket's connect only picks a route
        return str(probe.getsockname()[0])
    except OSError:
        return controller_ip
    finally:
        probe.close()


KERNEL_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def given_ports(path: str) -> tuple[str | None, dict[str, int]]:
    """The address and ports a kernel connection file (``-f``) names.

    Raises
    ------
    RegistrationError
        When it cannot be read, or is not a TCP kernel's.
    """
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RegistrationError(f"cannot read the kernel connection file {path}: {exc}") from None
    if not isinstance(given, dict) or given.get("transport", "tcp") != "tcp":
        raise RegistrationError(f"{path} is not the connection file of a TCP kernel")
    ports = {}
    for name in KERNEL_PORTS:
        value = given.get(name, 0)
        try:
            ports[name] = protocol.check_int(name, value, 0, 65535)
        except (TypeError, ValueError) as exc:
            raise RegistrationError(f"{path}: {exc}") from None
    ip = given.get("ip")
    return (ip if isinstance(ip, str) and ip else None), ports


def socket_prefix(cluster: dict[str, Any], file: str | None = None) -> str | None:
    """Where this engine's unix sockets go (``<prefix>-<n>``), or None for TCP.

    Unix sockets in the cluster's folder, which other users cannot enter (see
    :func:`kernel_engine.launchers.local.ipc_unusable`), when the controller is on
    loopback (so on this host) and that folder is here: it holds the cluster's client
    file, with the same key, naming this hostname. Else (another host, a container with
    a filesystem or a hostname of its own, another user) TCP, as the controller would
    otherwise not reach the sockets, or refuse them."""
    from kernel_engine.launchers.local import ipc_unusable

    if bind_address(str(cluster["ip"])) != "127.0.0.1":
        return None
    try:
        # (absolute: a relative JUPYTER_RUNTIME_DIR names it from this process's cwd)
        folder = Path(os.path.abspath(clusters.cluster_folder(str(cluster.get("cluster_id")))))
        client = json.loads((folder / clusters.CLIENT_FILE).read_text())
        here = folder / clusters.CLIENT_FILE
        if file is not None and not os.path.samefile(clusters.find_connection_file(file), here):
            return None  # (a copy of the cluster's folder, not the one it serves: TCP)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(client, dict) or client.get("key") != cluster.get("key"):
        return None
    if client.get("hostname") not in (None, socket.gethostname()):
        return None  # (a hostname of its own: the controller would take it for elsewhere)
    if ipc_unusable(folder) is not None:
        return None
    prefix = str(folder / f"r{os.getpid()}")
    try:
        return protocol.check_socket_prefix("prefix", prefix)
    except ValueError:
        return None


def kernel_connection_file(
    folder: Path,
    ip: str,
    info: dict[str, Any],
    ports: dict[str, int] | None = None,
    transport: str = "tcp",
) -> Path:
    """A connection file for our kernel: the cluster's key, ``ports`` (else ports chosen
    by the kernel), and a keypair of its own when the cluster encrypts; ``ip`` is the
    sockets' path prefix for ``transport="ipc"``."""
    conn: dict[str, Any] = {
        "ip": ip,
        "transport": transport,
        "key": info["key"],
        "signature_scheme": "hmac-sha256",
        **(ports or {}),
    }
    if info.get("curve_serverkey"):
        public, secret = zmq.curve_keypair()
        conn["curve_publickey"], conn["curve_secretkey"] = public.decode(), secret.decode()
    path = folder / "engine.json"
    clusters.write_private_json(path, conn)
    return path


def kernel_info(app: Any) -> dict[str, Any]:
    """The bound kernel's connection info, as the registration carries it."""
    info: dict[str, Any] = {
        "ip": app.ip,
        "transport": app.transport,
        "signature_scheme": "hmac-sha256",
        "shell_port": app.shell_port,
        "control_port": app.control_port,
        "iopub_port": app.iopub_port,
        "hb_port": app.hb_port,
        "stdin_port": app.stdin_port,
        "lane_port": app.lane_port,
    }
    if app.curve_secretkey is not None:
        info["curve_publickey"] = app.curve_publickey.decode()
        info["curve_secretkey"] = app.curve_secretkey.decode()
    return info


def register(
    cluster: dict[str, Any],
    request: protocol.RegisterRequest,
    timeout: float,
    say: Any = None,
) -> dict[str, Any]:
    """Send ``request`` to the controller until it answers (``timeout`` s in all); the
    reply's content (with the ``engine_id`` given).

    Raises
    ------
    RegistrationError
        When refused (an id held by a live engine only once ``timeout`` has passed) or
        when no controller answered.
    """
    key = str(cluster["key"]).encode()
    w = wire.Wire(key, username="engine")
    url = protocol.endpoint({"ip": cluster["ip"], "transport": "tcp"}, cluster["client_port"])
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    server = cluster.get("curve_serverkey")
    if server:
        wire.curve_client(sock, str(server).encode())
    sock.connect(url)
    deadline = time.monotonic() + timeout
    last = "no answer"
    try:
        while time.monotonic() < deadline:
            header = w.send(
                sock, protocol.REGISTER_REQUEST, request.to_content(), idents=[protocol.HUB_ROUTE]
            )
            content = _await_reply(sock, w, header["msg_id"], min(5.0, deadline - time.monotonic()))
            if content is None:
                continue  # (no controller yet, or a lost message: a new msg_id each time)
            if content.get("status") == "ok":
                return content
            last = str(content.get("evalue", "refused"))[:2000]
            if not content.get("retry"):
                raise RegistrationError(f"the controller at {url} refused this engine: {last}")
            if say is not None:
                say(f"not yet registered ({last}); trying again")
            time.sleep(min(RETRY_INTERVAL, max(0.0, deadline - time.monotonic())))
    finally:
        sock.close(linger=0)
        context.term()
    raise RegistrationError(
        f"not registered with the controller at {url} in {timeout:.0f} s: {last}"
    )


def _await_reply(
    sock: zmq.Socket[Any], w: wire.Wire, msg_id: str, timeout: float
) -> dict[str, Any] | None:
    """The content of the reply to ``msg_id`` within ``timeout`` s (None: none came)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        frames = sock.recv_multipart()
        try:
            msg = w.recv(frames)
        except wire.MessageError:
            continue
        if msg.msg_type == protocol.REGISTER_REPLY and msg.parent_id == msg_id:
            return msg.content
    return None


class _Output:
    """Where the engine's fatal messages go: its log, and the launcher's output."""

    def __init__(self) -> None:
        self.launcher_fd: int | None = None

    def redirect(self, path: str) -> None:
        """Send this process's stdout and stderr (fds 1 and 2) to ``path``, keeping the
        launcher's stderr for fatal messages."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.launcher_fd = os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def fatal(self, text: str) -> None:
        line = f"jupyter px engine: {text}\n".encode(errors="replace")
        for fd in {2, *([self.launcher_fd] if self.launcher_fd is not None else [])}:
            try:
                os.write(fd, line)
            except OSError:
                pass


def _watch_setup(app: Any, output: _Output, timeout: float) -> None:
    """Leave if the controller that accepted us never sets us up."""

    def check() -> None:
        if getattr(app.kernel, "engine_id", None) is None:
            output.fatal(f"the controller did not set this engine up within {timeout:.0f} s")
            app._leave(1)  # (os._exit, once its unix socket files are removed)

    timer = threading.Timer(timeout, check)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    """Run one registering engine until it is shut down (see the module docstring)."""
    args, rest = parser().parse_known_args(argv)
    output = _Output()
    try:
        cluster = connection_info(args.file, args.cluster_id)
        wanted = requested_id(args)
        given_ip, ports = given_ports(args.connection_file) if args.connection_file else (None, {})
    except (RegistrationError, TypeError, ValueError) as exc:
        output.fatal(str(exc))
        return 1
    if args.log_file:
        output.redirect(args.log_file.replace("{id}", str(wanted if wanted is not None else "")))
    logging.getLogger("tornado").setLevel(logging.ERROR)
    from .app import EngineApp  # (ipykernel: imported once the cheap checks passed)

    folder = Path(tempfile.mkdtemp(prefix="px-engine-"))
    atexit.register(shutil.rmtree, folder, True)
    ip = args.ip or given_ip or bind_address(cluster["ip"])
    prefix = None if args.ip or given_ip or ports else socket_prefix(cluster, args.file)
    if prefix is not None:
        conn = kernel_connection_file(folder, prefix, cluster, transport="ipc")
    else:
        conn = kernel_connection_file(folder, ip, cluster, ports)
    app = EngineApp.instance()
    kernel_argv = ["-f", str(conn), *rest]
    profile_dir = os.environ.get(clusters.PROFILE_DIR_ENV)
    if profile_dir:
        kernel_argv.insert(0, f"--profile-dir={profile_dir}")
    app.initialize(kernel_argv)
    request = protocol.RegisterRequest(
        kernel_info(app),
        os.getpid(),
        socket.gethostname(),
        str(app.session.session),
        wanted,
    )
    try:
        reply = register(cluster, request, args.timeout, say=app.log.info)
    except RegistrationError as exc:
        output.fatal(str(exc))
        return 1
    print(
        f"{REGISTERED} {cluster.get('cluster_id')} as engine {reply['engine_id']}",
        file=sys.__stderr__,
        flush=True,
    )
    _watch_setup(app, output, SETUP_TIMEOUT)
    app.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
