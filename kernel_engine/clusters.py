"""Cluster folders: where clusters live, starting and stopping their controllers, cleanup.

A cluster is a folder, ``<jupyter runtime dir>/px/<cluster id>/``, and the controller
process serving it. The folder holds the client connection file (``client.json``, with the
cluster's HMAC key), each engine kernel's connection file (``engine-N.json``, also with the
key), ``cluster.json`` (engine info, kept up to date by the controller), ``launch.json``
(the launcher's record of the controller process, no secrets) and logs.

A controller that exits normally stops its engines and removes its key files; one that is
SIGKILLed leaves them, and its engines outlive it for a grace period
(:data:`ENGINE_GRACE_ENV`), so that a controller restarted on the folder (``--restore``)
can adopt them with the same key and ports. So whoever reads the folders next (a cluster
start, ``jupyter px stop`` or ``list``) removes the key files of clusters whose controller
is dead and whose engines are gone too; stopping a dead cluster stops its orphaned engines
(:func:`stop_engines`); ``jupyter px clean`` removes dead clusters' folders. A controller
counts as running only if its PID runs, is not a zombie, and is that cluster's controller:
the same process start time as recorded (boot id and start tick, so a reused PID never
matches), or, for records without one, a command line naming ``--folder`` this folder.
Engines are recognised the same way (:func:`is_engine`). Both :mod:`kernel_engine.cli` and
``jupyter_ext.Cluster`` use this module; it knows nothing of clients.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from kernel_engine import processes
from kernel_engine.errors import ClusterError

log = logging.getLogger("kernel_engine.clusters")

CLIENT_FILE = "client.json"
CLUSTER_FILE = "cluster.json"
LAUNCH_FILE = "launch.json"
CONTROLLER_SECRET_FILE = "controller-secret.json"
"""The controller's CurveZMQ secret key (encrypted clusters only), for a restarted
controller to serve clients that know its public key."""
KEY_FILE_PATTERNS = (
    CLIENT_FILE,
    CLUSTER_FILE,
    CONTROLLER_SECRET_FILE,
    "engine-*.json",
    "*.tmp",
    ".*.tmp",
)
_KEY_FILE = re.compile("|".join(fnmatch.translate(p) for p in KEY_FILE_PATTERNS))
STARTING_GRACE = 10.0
"""Seconds a folder with no controller record yet counts as starting, not dead."""


def clusters_dir() -> Path:
    """The folder holding one folder per cluster."""
    return Path(jupyter_runtime_dir()) / "px"


_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def check_cluster_id(cluster_id: Any) -> str:
    """``cluster_id`` if it is a usable name (letters, digits, ``._-``; no path), else
    TypeError/ValueError."""
    if not isinstance(cluster_id, str):
        raise TypeError(f"cluster_id must be a string, not {type(cluster_id).__name__}")
    if not _CLUSTER_ID.match(cluster_id):
        raise ValueError(
            f"cluster_id {cluster_id!r} is not a name: use up to 128 letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return cluster_id


def cluster_folder(cluster_id: str) -> Path:
    """The folder of the cluster named ``cluster_id`` (a name, never a path elsewhere)."""
    return clusters_dir() / check_cluster_id(cluster_id)


def new_cluster_id() -> str:
    """A fresh cluster id: ``px-<date>-<time>-<6 hex digits>``."""
    return f"px-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def find_connection_file(spec: str | os.PathLike[str] | None = None) -> Path:
    """The client connection file for ``spec``: a path, a cluster id, or None (newest running).

    A bare name (no folder in it) that is the id of a cluster with a connection file means
    that cluster, even when a file of that name is in the working folder (a script called
    ``demo`` beside a notebook using cluster ``demo``): ``./demo`` names the file.

    Raises
    ------
    FileNotFoundError
        When there is no such file, or (``spec=None``) no running cluster.
    """
    if spec is not None:
        text = os.fspath(spec)
        if isinstance(text, str) and os.sep not in text and _CLUSTER_ID.match(text):
            by_id = cluster_folder(text) / CLIENT_FILE
            if by_id.is_file():
                return by_id
        path = Path(spec)
        if path.is_file():
            return path
        if path.is_dir() and (path / CLIENT_FILE).is_file():
            return path / CLIENT_FILE
        raise FileNotFoundError(f"no cluster connection file at {spec!r} (nor cluster id)")
    running = [c for c in list_clusters() if c.connection_file.is_file()]
    if not running:
        raise FileNotFoundError(
            f"no running cluster found in {clusters_dir()}; start one with "
            "jupyter_ext.Cluster(n=...) or `jupyter px start -n N`"
        )
    return running[-1].connection_file


def read_connection_file(path: str | os.PathLike[str], *keys: str) -> dict[str, Any]:
    """The contents of a client connection file, with ``keys`` (and ``key``, the cluster's
    signing key) present; else ValueError naming the file (not a bare JSONDecodeError or
    KeyError from deep inside a client)."""
    try:
        info = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a cluster connection file: {exc}") from None
    missing = [k for k in ("key", *keys) if k not in info] if isinstance(info, dict) else ["key"]
    if missing or not isinstance(info["key"], str):
        what = ", ".join(missing) or "key"
        raise ValueError(f"{os.fspath(path)!r} is not a cluster connection file: no {what}")
    return info


def controller_record(pid: int | None = None) -> dict[str, Any]:
    """What identifies a controller process: to merge into the files naming it.

    Parameters
    ----------
    pid
        The controller's PID (default: this process).
    """
    pid = os.getpid() if pid is None else pid
    return {
        "controller_pid": pid,
        "controller_started": processes.start_time(pid),
        "hostname": socket.gethostname(),
    }


def make_private_folder(folder: Path) -> None:
    """Make ``folder`` and each missing folder above it, each mode 0700: ``mkdir(parents=
    True)`` gives the ones above the umask's mode (0777 under umask 0), and another user
    who can write to the folder above a cluster's can put a folder of theirs in its
    place (see :func:`kernel_engine.launchers.local.ipc_unusable`)."""
    for level in (*reversed(folder.parents), folder):
        if not level.is_dir():
            level.mkdir(exist_ok=True, mode=0o700)


def write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_controller(pid: int, folder: Path, started: str | None = None) -> bool:
    """Whether ``pid`` runs and is the controller of ``folder`` (not a reuse of its PID)."""
    return _is_process(pid, started, ("--folder",), folder)


def is_engine(pid: int, folder: Path, engine_id: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs and is engine ``engine_id`` of ``folder`` (not a reuse of its
    PID): the same start time as recorded, or a command line naming its connection file."""
    return _is_process(pid, started, ("-f", "--f"), Path(folder) / f"engine-{engine_id}.json")


def _is_process(pid: int, started: str | None, options: tuple[str, ...], path: Path) -> bool:
    """Whether ``pid`` runs and is the process meant: started at ``started`` if that is
    known, else one whose command line gives ``path`` to one of ``options``."""
    if not processes.running(pid):
        return False
    if started is not None:
        now = processes.start_time(pid)
        return now == started if now is not None else not os.path.exists("/proc/self/stat")
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return not os.path.exists("/proc/self/cmdline")  # no /proc: trust the PID
    named = [b for a, b in itertools.pairwise(argv) if a in options]
    named += [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in options and "=" in a]
    target = os.path.realpath(path)
    return any(os.path.realpath(os.path.join(cwd, f)) == target for f in named)


def engine_records(folder: Path) -> dict[int, dict[str, Any]]:
    """The engines ``folder``'s ``cluster.json`` lists on this host, by id (each with its
    ``pid`` and, when known, ``pid_started``).

    An engine whose host is not known yet (empty: one that has not answered its first
    request, busy from its start or when adopted) is this host's: only engines that
    registered themselves come from elsewhere, and they name their host. (Those were
    left out: a restore after an interrupted one adopted none of its engines, and
    stopping the cluster left them running.)"""
    info = read_json(Path(folder) / CLUSTER_FILE) or {}
    engines = info.get("engines")
    host = socket.gethostname()
    out: dict[int, dict[str, Any]] = {}
    for key, record in engines.items() if isinstance(engines, dict) else ():
        if not isinstance(record, dict) or (record.get("hostname") or host) != host:
            continue
        try:
            eid, pid = int(key), int(record["pid"])
        except (KeyError, TypeError, ValueError):
            continue
        if eid >= 0 and pid > 0:
            out[eid] = record
    return out


def live_engines(folder: Path) -> dict[int, int]:
    """The engines of ``folder`` that still run, checked by :func:`is_engine`: id -> pid."""
    out = {}
    for eid, record in engine_records(folder).items():
        pid = int(record["pid"])
        if is_engine(pid, folder, eid, _text(record.get("pid_started"))):
            out[eid] = pid
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def stop_engines(folder: Path, timeout: float = 3.0) -> list[int]:
    """Stop the engines of ``folder`` that outlived their controller: SIGTERM, ``timeout``
    s, SIGKILL; each PID is checked to be that engine first. Returns the PIDs signalled."""
    stopped = []
    for eid, record in engine_records(folder).items():
        started = record.get("pid_started")
        pid = int(record["pid"])

        def target(pid: int = pid, eid: int = eid, started: str | None = _text(started)) -> bool:
            return is_engine(pid, folder, eid, started)

        try:
            if processes.terminate(pid, timeout, target):
                stopped.append(pid)
        except TimeoutError as exc:
            raise ClusterError(f"engine {eid} of {folder}: {exc}") from None
        remove_dead_engine_files(folder, eid, keep=True)
    return stopped


def remove_dead_engine_files(
    folder: Path, eid: int, info: dict[str, Any] | None = None, keep: bool = False
) -> None:
    """Remove the unix socket files of ``folder``'s engine ``eid``, which is gone (by its
    connection ``info``, else its connection file's, else ``e<id>-*``), and unless
    ``keep`` its connection file."""
    info = info or read_json(Path(folder) / f"engine-{eid}.json")
    remove_engine_sockets(folder, info or {"transport": "ipc", "ip": str(folder / f"e{eid}")})
    if not keep:
        with contextlib.suppress(OSError):
            (Path(folder) / f"engine-{eid}.json").unlink()


def remove_engine_sockets(folder: Path, connection_info: dict[str, Any]) -> None:
    """Remove the unix socket files (``<prefix>-<n>``) of an engine that is gone, if its
    kernel's ``connection_info`` puts them in ``folder``: nothing else would remove them
    all (a kernel manager removes only the ones it chose). A prefix is one engine's alone
    (``e<id>``, ids never reused in a folder, or ``r<pid>`` of a registering engine)."""
    prefix = connection_info.get("ip")
    if connection_info.get("transport") != "ipc" or not isinstance(prefix, str):
        return
    where = Path(prefix)
    try:
        if where.parent.resolve() != Path(folder).resolve():
            return
        for path in where.parent.glob(f"{glob.escape(where.name)}-*"):
            if path.is_socket():
                path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("the unix sockets %s-* were not all removed: %s", prefix, exc)


@dataclass
class ClusterState:
    """What a cluster folder says about its cluster, and whether its controller runs."""

    folder: Path
    state: str
    """``running``, ``dead``, ``starting`` (no record yet) or ``elsewhere`` (another host)."""
    controller_pid: int | None = None
    controller_started: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """``cluster.json``: engines (id, pid, hostname, state...), ready ids."""

    @property
    def cluster_id(self) -> str:
        return str(self.info.get("cluster_id") or self.folder.name)

    @property
    def connection_file(self) -> Path:
        return self.folder / CLIENT_FILE

    @property
    def running(self) -> bool:
        return self.state == "running"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``cluster.json`` plus folder, state and connection file."""
        return {
            **self.info,
            "cluster_id": self.cluster_id,
            "controller_pid": self.controller_pid,
            "state": self.state,
            "folder": str(self.folder),
            "connection_file": str(self.connection_file),
        }


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_cluster(folder: Path) -> ClusterState:
    """The state of the cluster in ``folder``, from its records and its controller process."""
    folder = Path(folder)
    info = read_json(folder / CLUSTER_FILE) or {}
    # The controller's own files first: a controller run by hand has no launch.json, and a
    # folder reused by a new launch has a new launch.json.
    records = [r for r in (info, read_json(folder / CLIENT_FILE)) if r]
    records.append(read_json(folder / LAUNCH_FILE) or {})
    named = []
    for record in records:
        try:
            pid = int(record["controller_pid"])
        except (KeyError, TypeError, ValueError):
            continue
        started = record.get("controller_started")
        named.append((pid, started if isinstance(started, str) else None, record))
    if not named:
        return ClusterState(folder, "starting" if _recent(folder) else "dead", info=info)
    host = socket.gethostname()
    for pid, started, record in named:
        if record.get("hostname", host) != host:
            return ClusterState(folder, "elsewhere", pid, started, info)
        if is_controller(pid, folder, started):
            return ClusterState(folder, "running", pid, started, info)
    pid, started, _ = named[0]
    return ClusterState(folder, "dead", pid, started, info)


def _recent(folder: Path) -> bool:
    """Whether anything in ``folder`` changed within :data:`STARTING_GRACE` seconds."""
    try:
        paths = [folder, *folder.iterdir()]
        newest = max(p.stat().st_mtime for p in paths)
    except OSError:
        return False
    return time.time() - newest < STARTING_GRACE


def list_clusters(states: tuple[str, ...] = ("running",)) -> list[ClusterState]:
    """Clusters in :func:`clusters_dir` in these states, oldest start first."""
    found = []
    root = clusters_dir()
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.is_dir():
            cluster = read_cluster(folder)
            if cluster.state in states:
                found.append(cluster)
    return sorted(found, key=_started_at)


def _started_at(cluster: ClusterState) -> float:
    for name in (CLIENT_FILE, LAUNCH_FILE):
        try:
            return (cluster.folder / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


def key_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that hold (or may hold) the cluster's key (one listing of
    the folder: a start looks at every old cluster's)."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return []
    return sorted(Path(folder, name) for name in names if _KEY_FILE.match(name))


def remove_key_files(folder: Path) -> list[Path]:
    """Remove the files of ``folder`` that hold the cluster's key; returns those removed."""
    removed = []
    for path in key_files(folder):
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def clean_dead_clusters(
    remove_folders: bool = False, keep: Path | None = None
) -> list[ClusterState]:
    """Remove the key files (or whole folders) of dead clusters; returns the clusters cleaned.

    A dead cluster whose engines still run (within their grace period) keeps its key
    files, so that its controller can be restarted; its engines leave by themselves.

    Parameters
    ----------
    remove_folders
        Remove dead clusters' folders with their logs, not just their key files (their
        orphaned engines are stopped first).
    keep
        A folder to leave alone (the one a controller is being restored in).
    """
    cleaned = []
    kept = None if keep is None else os.path.realpath(keep)
    if not remove_folders:
        # (every start does this: a folder with no key file left is passed over unread)
        root = clusters_dir()
        for folder in root.iterdir() if root.is_dir() else []:
            if not key_files(folder) or (kept and os.path.realpath(folder) == kept):
                continue
            cluster = read_cluster(folder)
            if cluster.state == "dead" and not live_engines(folder):
                # (their connection files, which name their sockets, go with the key files)
                for eid in engine_records(folder):
                    remove_dead_engine_files(folder, eid, keep=True)
                if remove_key_files(folder):
                    cleaned.append(cluster)
        return sorted(cleaned, key=_started_at)
    for cluster in list_clusters(states=("dead",)):
        if kept is not None and os.path.realpath(cluster.folder) == kept:
            continue
        # checked again just before: a new start may have taken the folder over
        if read_cluster(cluster.folder).state == "dead":
            stop_engines(cluster.folder)
            shutil.rmtree(cluster.folder, ignore_errors=True)
            cleaned.append(cluster)
    return cleaned


PROFILE_DIR_ENV = "JUPYTER_PX_PROFILE_DIR"
"""The IPython profile folder engines load their configuration from (else IPython's
default profile, as any kernel's)."""

CONNECTION_ENV = "JUPYTER_PX_CONNECTION_INFO"
"""The cluster's connection info (JSON), for engines that register themselves
(``jupyter px engine``): what launchers put in their engines' environment, so that no
shared filesystem is needed. It holds the cluster's key."""

ENGINE_CONNECTION_KEYS = (
    "cluster_id",
    "ip",
    "transport",
    "client_port",
    "key",
    "signature_scheme",
    "curve_serverkey",
    "controller_pid",
    "hostname",
)
"""What of the client connection info an engine needs to register."""


def engine_connection(info: dict[str, Any]) -> dict[str, Any]:
    """The part of a client connection info that a registering engine needs."""
    return {k: info[k] for k in ENGINE_CONNECTION_KEYS if k in info}


CONTROLLER_PID_ENV = "JUPYTER_PX_CONTROLLER_PID"
"""Set by a controller for the engines it starts: its PID, which they watch."""

ENGINE_DEBUGGER_ENV = "JUPYTER_PX_ENGINE_DEBUGGER"
"""Set to ``1`` where a cluster starts (engines inherit it): its engines import debugpy and
offer the Jupyter debugger to a frontend attached to one (see
:func:`kernel_engine.engine.kernel.without_debugger`)."""

ENGINE_GRACE_ENV = "JUPYTER_PX_ENGINE_GRACE"
"""Seconds an engine outlives its controller, waiting for a restarted one to adopt it.
A controller sets it for its engines (``Cluster(engine_grace=...)``, ``--engine-grace``);
in a controller's own environment it is that controller's default."""

DEFAULT_ENGINE_GRACE = 60.0
"""The grace period when nobody chose one."""


def engine_grace() -> float:
    """The grace period this process's environment asks for (:data:`ENGINE_GRACE_ENV`),
    else :data:`DEFAULT_ENGINE_GRACE`."""
    try:
        grace = float(os.environ.get(ENGINE_GRACE_ENV, DEFAULT_ENGINE_GRACE))
    except ValueError:
        return DEFAULT_ENGINE_GRACE
    return grace if 0 <= grace < 1e9 else DEFAULT_ENGINE_GRACE


def launch_controller(
    folder: Path,
    n: int,
    cluster_id: str,
    ip: str = "127.0.0.1",
    cwd: str | None = None,
    log_level: str = "INFO",
    parent_pid: int | None = None,
    controller_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    restore: bool = False,
    cleaned: Callable[[list[ClusterState]], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a controller for ``folder`` and ``n`` engines; wait with :func:`wait_ready`.

    Cleans up after dead clusters too, once the controller runs (their folders are many
    after a while: the controller need not wait for that), and tells ``cleaned`` which
    it cleaned (the engine kernel spec is the controller's to check). ``parent_pid``:
    the controller stops when that process exits; ``controller_args``: more options of
    ``python -m kernel_engine.controller``; ``env``: more environment for it and its engines;
    ``restore``: start the controller again on the folder of one that died (same key,
    ports and task records; it adopts the engines still running, and starts ``n`` more).
    Raises :class:`ClusterError` if the folder's controller already runs.
    """
    current = read_cluster(folder)
    if current.running:
        raise ClusterError(
            f"cannot restore cluster {current.cluster_id}: its controller still runs "
            f"(pid {current.controller_pid})"
            if restore
            else f"cluster {current.cluster_id} is already running "
            f"(controller pid {current.controller_pid})"
        )
    if current.state == "elsewhere":
        raise ClusterError(f"the controller of {folder} runs on another host")
    if restore and not folder.is_dir():
        raise ClusterError(f"there is no cluster {cluster_id} to restore (no folder {folder})")
    if not restore and current.state == "dead":
        # a new cluster in the folder of a dead one: the old one's engines must not linger
        stop_engines(folder)
        remove_key_files(folder)
    make_private_folder(folder)
    cmd = [sys.executable, "-m", "kernel_engine.controller", "--folder", str(folder)]
    cmd += ["-n", str(n), "--ip", ip, "--cluster-id", cluster_id, "--log-level", log_level]
    if restore:
        cmd.append("--restore")
    if cwd is not None:
        cmd += ["--cwd", cwd]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    cmd += controller_args or []
    with open(folder / "controller.log", "ab") as log:
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            # its own session: a Ctrl-C (SIGINT to our process group, as a notebook
            # interrupt sends) must interrupt the work, not stop the cluster
            start_new_session=True,
        )
    try:
        write_private_json(
            folder / LAUNCH_FILE, {"cluster_id": cluster_id, **controller_record(process.pid)}
        )
        gone = clean_dead_clusters(keep=folder)
        if cleaned is not None:
            cleaned(gone)
    except BaseException:
        process.kill()  # a controller nobody could find again would hold its key forever
        process.wait(10)
        raise
    return process


def wait_ready(
    process: subprocess.Popen[bytes], folder: Path, timeout: float, restore: bool = False
) -> dict[str, Any]:
    """The controller's one status line, once every engine is ready.

    Raises :class:`ClusterError` with the controller's log (having stopped it) if it fails,
    exits or is not ready within ``timeout`` seconds (plus a margin for its own start).

    A failed or interrupted start stops what it started and leaves no key on disk. A
    failed or interrupted ``restore`` (a port another process took meanwhile, Ctrl-C
    during the wait for busy engines) leaves the cluster as it found it: the new
    controller is killed, and the engines that outlived the dead one, the key files and
    the task database stay, so that another restore (once the cause is gone) adopts them.
    Stopping it as a failed start did killed those engines and removed the key, and the
    next restore made a new cluster that no client of the old one could reach.
    """
    assert process.stdout is not None
    log_path = folder / "controller.log"
    line = b""
    try:
        # (in the try: a timeout that is no number must not leave the controller running)
        deadline = time.monotonic() + timeout + 10
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(
                    f"engines not ready within {timeout:.0f} s; "
                    f"controller log:\n{log_tail(log_path)}"
                )
            ready, _, _ = select.select([process.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    try:
                        code: int | None = process.wait(5)
                    except subprocess.TimeoutExpired:
                        code = None
                    raise ClusterError(
                        f"the controller exited with code {code} before it was ready; "
                        f"its log:\n{log_tail(log_path)}"
                    )
                line += chunk
        try:
            status: dict[str, Any] = json.loads(line.decode())
        except ValueError:
            status = {"status": "error", "message": f"unexpected controller output: {line!r}"}
        if status.get("status") != "ready":
            raise ClusterError(status.get("message", "the controller failed to start"))
        return status
    except BaseException:
        if restore:  # (its engines wait for another restore, for their grace period)
            process.kill()
            process.wait(10)
        else:  # a failed or interrupted start leaves nothing running and no key on disk
            stop_controller(process.pid, folder, timeout=5, process=process)
        raise
    finally:
        process.stdout.close()


def stop_controller(
    pid: int,
    folder: Path,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    started: str | None = None,
) -> bool:
    """Stop ``folder``'s controller: SIGTERM, ``timeout`` s to exit, then SIGKILL.

    Returns whether it was running. A PID now used by another process is left alone.
    Removes the key files a killed controller leaves behind.

    Parameters
    ----------
    process
        The controller, if this process launched it (then it is also reaped).
    started
        Its recorded :func:`kernel_engine.processes.start_time`, to tell it from a reuse of its PID.
    """
    if process is None and read_cluster(folder).state == "elsewhere":
        raise ClusterError(f"the controller of {folder} runs on another host; stop it there")
    if process is not None:
        running = process.poll() is None
        if running:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    else:
        try:
            running = processes.terminate(pid, timeout, lambda: is_controller(pid, folder, started))
        except TimeoutError as exc:
            raise ClusterError(f"the controller of {folder}: {exc}") from None
    if read_cluster(folder).state == "dead":
        # a controller that was killed (or died before) left its engines running, and
        # what its launchers started (mpiexec, a Slurm job)
        from kernel_engine.launchers import stop_recorded

        stop_engines(folder, timeout=min(timeout, 3.0))
        stop_recorded(folder, timeout=min(timeout, 5.0))
        remove_key_files(folder)
    return running


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])
