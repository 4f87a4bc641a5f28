"""Cluster: start, stop and re-attach to a controller and its engines; restart a
controller that died (:meth:`Cluster.restart_controller_sync`)."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from kernel_engine import clusters, launchers, protocol, shm
from kernel_engine.errors import ClusterError

from ._client import Client
from ._reprs import client_html, cluster_html


def _profile_dir(profile: str | None, profile_dir: str | os.PathLike[str] | None) -> str | None:
    """The IPython profile folder ``profile``/``profile_dir`` name; ValueError if none."""
    if profile is not None and not isinstance(profile, str):
        raise TypeError(f"profile must be a profile's name, not {profile!r}")
    if profile_dir is not None:
        if not isinstance(profile_dir, (str, os.PathLike)):
            raise TypeError(f"profile_dir must be a folder, not {profile_dir!r}")
        if not os.path.isdir(profile_dir):
            raise ValueError(f"profile_dir {os.fspath(profile_dir)!r} is not a folder")
        return os.path.abspath(profile_dir)
    if profile is None:
        return None
    from IPython.core.profiledir import ProfileDir, ProfileDirError
    from IPython.paths import get_ipython_dir

    try:
        return str(ProfileDir.find_profile_dir_by_name(get_ipython_dir(), profile).location)
    except ProfileDirError:
        raise ValueError(
            f"no IPython profile {profile!r} in {get_ipython_dir()} "
            f"(create it with: ipython profile create {profile})"
        ) from None


_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def _level_name(level: Any) -> str:
    """A logging level's name, from its name (any case) or its number (``logging.DEBUG``,
    which IPython Parallel's ``log_level`` takes); ValueError naming ``log_level`` if
    neither."""
    if isinstance(level, str) and level.upper() in _LEVELS:
        return level.upper()
    if isinstance(level, int) and not isinstance(level, bool):
        for name, number in _LEVELS.items():
            if number == level:
                return name
    raise ValueError(
        f"log_level must be a logging level's name or number (DEBUG or 10, ...), not {level!r}"
    )


CLUSTER_FILE = "cluster-file.json"
"""A cluster's :meth:`Cluster.to_dict` in its folder, as IPython Parallel's cluster file
(beside the controller's own ``cluster.json``, which says how the cluster is doing)."""


class Cluster:
    """A controller process and its engines.

    ``start_and_connect_sync()`` returns a Client once every engine is ready, or raises
    :class:`ClusterError` with the failing engine's own output. ``with Cluster(n=4) as rc:``
    starts, connects, and stops at the end of the block.

    Parameters
    ----------
    n
        How many engines to start.
    engines
        The launcher: ``"local"`` (engines on this machine, through jupyter_client),
        ``"mpi"`` (``mpiexec -n N``, engine ids equal to MPI ranks), ``"slurm"`` (one
        batch job, ``srun`` inside it), ``"ssh"`` (one ssh session per engine on
        ``hosts``), ``"provisioner"`` (kernels of the kernel spec ``kernel_name``, started
        by the kernel provisioner it names) or a subclass of
        :class:`kernel_engine.launchers.Launcher` defined in an importable module. The
        engines of all but ``"local"`` register themselves with the controller.
    mpiexec
        For ``engines="mpi"``: the command that starts the ranks (default ``mpiexec``;
        ``"mpiexec.mpich"``, ``"mpiexec.openmpi"``, a path). Open MPI and MPICH's Hydra are
        both known.
    mpi_args
        More arguments for ``mpiexec`` (``["--oversubscribe"]``, ``["--hostfile", f]``).
    slurm_args
        More arguments for ``sbatch`` (``["--time=10", "--partition=debug"]``: ``--time``
        is the walltime, after which Slurm ends the engines).
    hosts
        For ``engines="ssh"``: ``{"host": n, ...}``, how many engines go to each host
        (``n`` defaults to their sum). The hosts must share this machine's filesystem
        layout (the engines run this Python, in this working directory, by path); with a
        host other than this one, ``ip`` must be this machine's address on the network
        the hosts reach (not loopback, not a wildcard: the error says which to use), and
        everything is encrypted with CurveZMQ.
    ssh_args
        More arguments for ``ssh`` (``["-F", "ssh_config"]``, ``["-i", key]``).
    kernel_name
        For ``engines="provisioner"`` (which ``kernel_name`` alone implies): the kernel
        spec whose kernels are the engines, each started by a
        ``jupyter_client.KernelManager`` through the provisioner the spec names in
        ``metadata.kernel_provisioner`` (a container, a pod, a YARN application: local and
        remote kernels take one path). Its ``argv`` must run a registering engine,
        ``python -m kernel_engine.engine.register -f {connection_file}``
        (:func:`kernel_engine.launchers.provisioner.engine_spec` writes such a spec); the
        kernel gets the cluster's connection info and its engine id in its environment.
        An unknown spec, a provisioner not installed or an ``argv`` running another module
        raise ValueError here, naming the spec; a kernel that exits while the cluster
        starts fails the start with its output.
    min_engines
        Return from the start once this many engines are ready (the others join when
        they start: a Slurm job waiting in a busy queue). Default: all ``n``.
    cluster_id
        The cluster's name (its folder under the Jupyter runtime dir); made up if omitted.
    ip
        The interface everything binds to.
    cwd
        The engines' working directory (default: this process's).
    start_timeout
        Seconds to wait for every engine to be ready.
    shutdown_atexit
        Stop the cluster when this process exits (it also stops if this process dies).
    log_level
        The controller's log level, by name or number (``"DEBUG"``, ``logging.DEBUG``);
        its log is ``controller.log`` in the cluster folder.
    curve
        Encrypt all traffic with CurveZMQ, so that a process without the connection file
        can neither connect nor read anything. None (the default): on whenever ``ip`` is
        not loopback.
    client_timeout
        Seconds of silence after which the controller counts a client as gone and drops
        its queued tasks (a client that closes says so at once).
    on_client_lost
        A lost client's tasks already on engines: ``"finish"`` them, or ``"abort"`` those
        that have not started.
    db
        Where the controller keeps task records: ``"sqlite"`` (the default: the file
        ``tasks.db`` in the cluster's folder, which outlives the controller),
        ``"memory"`` (bounded memory only) or the path of an SQLite file.
    db_max_bytes, db_max_age
        Retention of the task database file: its largest size in bytes (default 1 GiB)
        and how many seconds a finished task's record is kept (default 7 days; 0: for
        ever). The oldest finished records go first; a running task's never.
    profile, profile_dir
        The IPython profile the engines load their configuration from (its
        ``ipython_config.py`` and ``ipython_kernel_config.py``), by name (``profile_<name>``
        in the IPython folder) or by folder. Default: IPython's default profile, as any
        kernel.
    engine_grace
        Seconds the engines outlive a controller that dies (SIGKILL included), for
        :meth:`restart_controller_sync` to adopt them with their state; then they exit.
        Default: ``$JUPYTER_PX_ENGINE_GRACE``, else 60.
    controller_ip, engine_timeout
        IPython Parallel's names for ``ip`` and ``start_timeout``.
    delay, load_profile, send_engines_connection_env, controller
        IPython Parallel's, accepted (checked) with nothing to do: engines start as soon
        as the controller is ready and get its connection info from it, no
        ``ipcluster_config.py`` is read, and the controller is local (``controller=None``
        or ``"local"``; another raises ValueError).

    Every argument is checked here: a wrong type or value raises TypeError/ValueError
    naming it, before anything starts.
    """

    def __init__(
        self,
        n: int | None = None,
        engines: str = "local",
        cluster_id: str | None = None,
        ip: str = "127.0.0.1",
        cwd: str | None = None,
        start_timeout: float = 60.0,
        shutdown_atexit: bool = True,
        log_level: str | int = "INFO",
        curve: bool | None = None,
        client_timeout: float = 30.0,
        on_client_lost: str = "finish",
        profile: str | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
        db: str | os.PathLike[str] = "sqlite",
        db_max_bytes: int | None = None,
        db_max_age: float | None = None,
        engine_grace: float | None = None,
        mpi_args: list[str] | None = None,
        slurm_args: list[str] | None = None,
        min_engines: int | None = None,
        hosts: dict[str, int] | None = None,
        ssh_args: list[str] | None = None,
        kernel_name: str | None = None,
        mpiexec: str | None = None,
        *,
        controller_ip: str | None = None,
        engine_timeout: float | None = None,
        delay: float = 1.0,
        load_profile: bool = True,
        send_engines_connection_env: bool = True,
        controller: str | None = None,
    ):
        # IPython Parallel's names: controller_ip is ip, engine_timeout start_timeout
        if controller_ip is not None:
            if ip not in ("127.0.0.1", controller_ip):
                raise ValueError(f"give ip or controller_ip, not both ({ip!r}, {controller_ip!r})")
            ip = controller_ip
        if engine_timeout is not None:
            if start_timeout not in (60.0, engine_timeout):
                raise ValueError("give start_timeout or engine_timeout, not both")
            start_timeout = engine_timeout
        # accepted for IPython Parallel's code, with nothing to do here: the engines start
        # once the controller is ready (no delay needed), get its connection info from it,
        # and no ipcluster_config.py is read
        self.delay = protocol.check_seconds("delay", delay)
        protocol.check_bool("load_profile", load_profile)
        protocol.check_bool("send_engines_connection_env", send_engines_connection_env)
        if controller not in (None, "local", "Local"):
            raise ValueError(
                f"controller={controller!r}: the controller runs on this machine only "
                "(controller=None or 'local')"
            )
        if kernel_name is not None and engines == "local":
            engines = "provisioner"  # (the local launcher runs only the engine spec)
        self._launcher = launchers.launcher_name(engines)
        self._launcher_options: dict[str, Any] = {}
        if kernel_name is not None:
            self._launcher_options["kernel_name"] = kernel_name
        if mpiexec is not None:
            if not isinstance(mpiexec, str) or not mpiexec:
                raise TypeError(f"mpiexec must be a command (a string), not {mpiexec!r}")
            self._launcher_options["mpiexec"] = mpiexec
        for name, value in (
            ("mpi_args", mpi_args),
            ("slurm_args", slurm_args),
            ("ssh_args", ssh_args),
        ):
            if value is not None:
                self._launcher_options[name] = launchers.mpi.check_args(name, value)
        if hosts is not None:
            self._launcher_options["hosts"] = launchers.ssh.check_hosts(hosts)
        launcher_cls = launchers.find(self._launcher)
        unknown = set(self._launcher_options) - set(launcher_cls.options)
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))} do not apply to engines={engines!r}")
        self.min_engines = (
            None if min_engines is None else protocol.check_int("min_engines", min_engines, 1)
        )
        if n is None and hosts is not None:
            n = sum(self._launcher_options["hosts"].values())  # (an ssh cluster: one per slot)
        self.n = (os.cpu_count() or 1) if n is None else protocol.check_int("n", n, 0, 4096)
        _check_min_engines(self.min_engines, self.n)
        self.engines = engines
        self.cluster_id = (
            clusters.new_cluster_id()
            if cluster_id is None
            else clusters.check_cluster_id(cluster_id)
        )
        if not isinstance(ip, str) or not ip:
            raise TypeError(f"ip must be an address (a string), not {ip!r}")
        if curve is not None:
            protocol.check_bool("curve", curve)
        if on_client_lost not in ("finish", "abort"):
            raise ValueError(f"on_client_lost must be 'finish' or 'abort', not {on_client_lost!r}")
        log_level = _level_name(log_level)
        if cwd is not None and not os.path.isdir(cwd):
            raise ValueError(f"cwd {cwd!r} is not a folder")
        protocol.check_bool("shutdown_atexit", shutdown_atexit)
        self.profile_dir = _profile_dir(profile, profile_dir)
        if not isinstance(db, (str, os.PathLike)) or not os.fspath(db):
            raise TypeError(f"db must be 'sqlite', 'memory' or a file's path, not {db!r}")
        self.db = db if db in ("sqlite", "memory") else os.path.abspath(db)
        self.db_max_bytes = (
            None
            if db_max_bytes is None
            else protocol.check_int("db_max_bytes", db_max_bytes, 1 << 20, 1 << 50)
        )
        self.db_max_age = (
            None if db_max_age is None else protocol.check_seconds("db_max_age", db_max_age)
        )
        if self.db == "memory" and (db_max_bytes is not None or db_max_age is not None):
            # (they were taken and did nothing: the in-memory store has bounds of its own)
            raise ValueError(
                "db_max_bytes and db_max_age bound the task database's file: db='memory' "
                "keeps none (its records are bounded by count and bytes)"
            )
        self.engine_grace = protocol.check_seconds("engine_grace", engine_grace)
        if launcher_cls is launchers.provisioner.ProvisionerLauncher:
            if kernel_name is None:
                raise ValueError('engines="provisioner" needs kernel_name="<kernel spec>"')
            launchers.provisioner.check_spec(kernel_name)
        if launcher_cls is launchers.ssh.SSHLauncher:
            if hosts is None:
                raise ValueError('engines="ssh" needs hosts={"host": n, ...}')
            launchers.ssh.check_address(ip, self._launcher_options["hosts"], curve)
        self.curve = protocol.curve_wanted(ip, curve)
        self.client_timeout = protocol.check_seconds("client_timeout", client_timeout, True) or 30.0
        self.on_client_lost = on_client_lost
        start_timeout = protocol.check_seconds("start_timeout", start_timeout, True) or 60.0
        self.ip = ip
        self.cwd = cwd or os.getcwd()
        self.start_timeout = start_timeout
        self.shutdown_atexit = shutdown_atexit
        self.log_level = log_level
        self.folder = clusters.cluster_folder(self.cluster_id)
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_pid: int | None = None
        # a re-attached controller's recorded start time: tells it from a reuse of its PID
        self._controller_started: str | None = None
        self._client: Client | None = None
        self._atexit_registered = False
        # held while a controller is being started (two starts at once each launched
        # one on the same folder, and both failed after start_timeout)
        self._starting = threading.Lock()

    @property
    def connection_file(self) -> Path:
        return self.folder / "client.json"

    @property
    def cluster_file(self) -> Path:
        """This cluster's description (:meth:`to_dict`) for :meth:`from_file`; written
        while it runs."""
        return self.folder / CLUSTER_FILE

    def write_cluster_file(self) -> None:
        """Write :attr:`cluster_file` (mode 0600, atomically)."""
        clusters.make_private_folder(self.folder)
        clusters.write_private_json(self.cluster_file, self.to_dict())

    def update_cluster_file(self) -> None:
        """Rewrite :attr:`cluster_file` if it exists (after a change of the cluster)."""
        if self.cluster_file.exists():
            self.write_cluster_file()

    def remove_cluster_file(self) -> None:
        """Remove :attr:`cluster_file`, if it is there."""
        self.cluster_file.unlink(missing_ok=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Cluster {self.cluster_id} n={self.n} {state}>"

    def _repr_html_(self) -> str:
        return cluster_html(self)

    def _heading(self) -> tuple[str, str]:
        client = self._client
        below = "" if client is None else client_html(client)
        return cluster_html(self) + below, repr(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """In a notebook kernel, with a client: its live dashboard (see
        ``Client._repr_mimebundle_``) under this cluster's summary; else None."""
        client = self._client
        if client is None or client.transport.closed:
            return None
        own = client._own_dashboard(self._heading)
        return None if own is None else own.mimebundle()

    def _ipython_display_(self) -> None:
        """As :meth:`_repr_mimebundle_`, shown so that stopping the cluster leaves the
        static snapshot of the final state in its place."""
        from IPython.display import display

        client = self._client
        if client is None or client.transport.closed:
            display({"text/plain": repr(self), "text/html": self._repr_html_()}, raw=True)
            return
        client._show(self._heading)

    @property
    def running(self) -> bool:
        if self.controller_pid is None:
            return False
        if self.controller is not None:
            return self.controller.poll() is None
        return clusters.is_controller(self.controller_pid, self.folder, self._controller_started)

    # ----- starting

    def start_cluster_sync(self, n: int | None = None) -> Cluster:
        """Start the controller and ``n`` engines; return this cluster (as IPython
        Parallel's, for chaining: ``Cluster(n=2).start_cluster_sync().connect_client_sync()``)
        when every engine is ready.

        Also removes the key files that clusters whose controller died left behind.
        """
        n = self.n if n is None else protocol.check_int("n", n, 0, 4096)
        if n:  # (0: the controller alone, engines later)
            _check_min_engines(self.min_engines, n)
        if not self._starting.acquire(blocking=False):
            raise ClusterError(f"cluster {self.cluster_id} is already starting")
        try:
            return self._start(n)
        finally:
            self._starting.release()

    def _start(self, n: int) -> Cluster:
        if self.running:
            raise ClusterError(f"cluster {self.cluster_id} is already running")
        _check_local_address(self.ip)
        self.controller = clusters.launch_controller(
            self.folder,
            n,
            cluster_id=self.cluster_id,
            ip=self.ip,
            cwd=self.cwd,
            log_level=self.log_level,
            parent_pid=os.getpid() if self.shutdown_atexit else None,
            env={clusters.PROFILE_DIR_ENV: self.profile_dir} if self.profile_dir else None,
            controller_args=[
                "--curve" if self.curve else "--no-curve",
                "--client-timeout",
                str(self.client_timeout),
                "--on-client-lost",
                self.on_client_lost,
                "--db",
                os.fspath(self.db),
                *(["--db-max-bytes", str(self.db_max_bytes)] if self.db_max_bytes else []),
                *(["--db-max-age", str(self.db_max_age)] if self.db_max_age is not None else []),
                *(
                    ["--engine-grace", str(self.engine_grace)]
                    if self.engine_grace is not None
                    else []
                ),
                *self._launcher_args(),
            ],
        )
        self.controller_pid = self.controller.pid
        if self.shutdown_atexit and not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True
        clusters.wait_ready(self.controller, self.folder, self.start_timeout)
        self.write_cluster_file()
        return self

    def _launcher_args(self) -> list[str]:
        """The controller's options for this cluster's launcher."""
        if self._launcher == "local" and self.min_engines is None:
            return []
        args = ["--engines", self._launcher]
        if self._launcher_options:
            args += ["--engine-options", json.dumps(self._launcher_options)]
        if self.min_engines is not None:
            args += ["--min-engines", str(self.min_engines)]
        if self._launcher != "local":
            args += ["--start-timeout", str(self.start_timeout)]
        return args

    def engine_logs(self, lines: int | None = None) -> dict[int | str, str]:
        """Each engine's output (stdout and stderr, by engine id), and its launcher's own
        (``mpiexec-0``, ``slurm-<job id>``, ``provisioner-0``), as far as they reach the
        cluster folder; ``lines``: only the last so many lines of each."""
        if lines is not None:
            lines = protocol.check_int("lines", lines, 0, protocol.MAX_IDS)
        out: dict[int | str, str] = {}
        patterns = ("engine-*.log", "mpiexec-*.log", "slurm-*.out", "provisioner-*.log")
        for path in sorted(p for pattern in patterns for p in self.folder.glob(pattern)):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if lines is not None:
                text = "\n".join(text.splitlines()[-lines:] if lines else [])
            name = path.name.rsplit(".", 1)[0]
            key: int | str = name.split("-", 1)[1] if name.startswith("engine-") else name
            out[int(key) if isinstance(key, str) and key.isdigit() else key] = text
        return out

    async def start_cluster(self, n: int | None = None) -> Cluster:
        """Start the controller and ``n`` engines; return this cluster when every engine
        is ready."""
        return await asyncio.to_thread(self.start_cluster_sync, n)

    def start_controller_sync(self) -> None:
        """Start the controller alone (engines later: :meth:`start_engines`)."""
        self.start_cluster_sync(0)

    async def start_controller(self) -> None:
        """Start the controller alone (engines later: :meth:`start_engines`)."""
        await asyncio.to_thread(self.start_controller_sync)

    def restart_controller_sync(self, timeout: float | None = None) -> None:
        """Start this cluster's controller again after it died (SIGKILL included).

        The new controller serves the same cluster: the same key, ports and cluster id
        (clients connected before reconnect by themselves), the same task records
        (finished results stay retrievable; tasks in flight when it died end with their
        reply, if their engine kept one, or an ``EngineError`` saying so), and the engines
        still running, adopted with their ids and state (they wait for it for
        ``engine_grace`` seconds). It runs with the options the dead one ran with. Returns
        once the adopted engines are ready, and this cluster's client has reconnected.

        Raises
        ------
        ClusterError
            When the controller still runs, or cannot take its ports back.
        TypeError, ValueError
            When ``timeout`` is not a number of seconds (before anything starts).
        """
        timeout = protocol.check_seconds("timeout", timeout)
        state = clusters.read_cluster(self.folder)
        if state.running:
            raise ClusterError(
                f"cannot restart the controller of cluster {self.cluster_id}: it still runs "
                f"(pid {state.controller_pid})"
            )
        if self.controller is not None:
            # reap the dead one (a killed process's last threads may still be exiting)
            try:
                self.controller.wait(10)
            except subprocess.TimeoutExpired:
                raise ClusterError(
                    f"the controller of cluster {self.cluster_id} (pid {self.controller.pid}) "
                    "does not exit"
                ) from None
        client = self._client
        if client is not None and not client.transport.closed:
            # (it must have seen the dead one go before the new one answers on the same
            # ports: else it would send to it as if nothing happened, then fail what it
            # sent when its next check finds the old pid gone)
            client.transport.io.notice_lost()
        self.controller = clusters.launch_controller(
            self.folder,
            0,
            cluster_id=self.cluster_id,
            ip=self.ip,
            log_level=self.log_level,
            parent_pid=os.getpid() if self.shutdown_atexit else None,
            env={clusters.PROFILE_DIR_ENV: self.profile_dir} if self.profile_dir else None,
            controller_args=(
                ["--engine-grace", str(self.engine_grace)] if self.engine_grace is not None else []
            ),
            restore=True,
        )
        self.controller_pid = self.controller.pid
        self._controller_started = None
        if self.shutdown_atexit and not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True
        clusters.wait_ready(
            self.controller, self.folder, timeout or self.start_timeout, restore=True
        )
        self.write_cluster_file()
        if client is not None and not client.transport.closed:
            client.transport.io.wait_back(10.0)

    async def restart_controller(self, timeout: float | None = None) -> None:
        """Start this cluster's controller again after it died (see
        :meth:`restart_controller_sync`)."""
        await asyncio.to_thread(self.restart_controller_sync, timeout)

    def stop_controller_sync(self) -> None:
        """Stop the controller (and so its engines)."""
        self.stop_cluster_sync()

    async def stop_controller(self) -> None:
        """Stop the controller (and so its engines)."""
        await asyncio.to_thread(self.stop_controller_sync)

    def connect_client_sync(self, **kwargs: Any) -> Client:
        """A Client of this cluster."""
        self._client = Client(self.connection_file, **kwargs)
        self._client.cluster = self
        return self._client

    async def connect_client(self, **kwargs: Any) -> Client:
        """A Client of this cluster."""
        return await asyncio.to_thread(self.connect_client_sync, **kwargs)

    def start_and_connect_sync(self, n: int | None = None, activate: bool = False) -> Client:
        """Start the cluster and return a Client once every engine is ready (with
        ``activate``, its ``%px`` magics registered too)."""
        self.start_cluster_sync(n)
        client = self.connect_client_sync()
        if activate:
            client.activate()
        return client

    async def start_and_connect(self, n: int | None = None, activate: bool = False) -> Client:
        """Start the cluster and return a Client once every engine is ready (with
        ``activate``, its ``%px`` magics registered too)."""
        return await asyncio.to_thread(self.start_and_connect_sync, n, activate)

    # ----- engines

    def _client_or_connect(self) -> Client:
        if self._client is None or self._client.transport.closed:
            self._client = Client(self.connection_file)
            self._client.cluster = self
        return self._client

    def start_engines_sync(
        self, n: int | None = None, timeout: float | None = None, *, engine_set_id: Any = None
    ) -> list[int]:
        """Start ``n`` more engines (default: the cluster's ``n``, as IPython Parallel's);
        returns their ids once they are ready. Those ids are what IPython Parallel's engine
        set id is for: :meth:`stop_engines`, :meth:`restart_engines` and
        :meth:`signal_engines` take them (as ``engine_set_id=`` too). ``engine_set_id`` is
        accepted for IPython Parallel's code; there are no named engine sets here."""
        n = self.n if n is None else n
        if protocol.check_int("n", n, 0, 4096) == 0:
            return []
        client = self._client_or_connect()
        reply = client.transport.ask(protocol.START_REQUEST, protocol.StartRequest(n), timeout=30)
        ids = [int(i) for i in reply["ids"]]
        client.transport.wait_for_engines_ready(ids, timeout or self.start_timeout)
        return ids

    async def start_engines(
        self, n: int | None = None, timeout: float | None = None, *, engine_set_id: Any = None
    ) -> list[int]:
        """Start ``n`` more engines (default: the cluster's ``n``); returns their ids once
        they are ready."""
        return await asyncio.to_thread(self.start_engines_sync, n, timeout)

    def stop_engines_sync(self, engine_ids: Any = None, *, engine_set_id: Any = None) -> None:
        """Stop engines (default: all); the cluster's controller keeps running.
        ``engine_set_id``: IPython Parallel's name of ``engine_ids``."""
        engine_ids = _engine_ids(engine_ids, engine_set_id)
        client = self._client_or_connect()
        client.shutdown(targets="all" if engine_ids is None else engine_ids)

    async def stop_engines(self, engine_ids: Any = None, *, engine_set_id: Any = None) -> None:
        """Stop engines (default: all); the cluster's controller keeps running."""
        await asyncio.to_thread(self.stop_engines_sync, _engine_ids(engine_ids, engine_set_id))

    def restart_engines_sync(
        self, engine_ids: Any = None, *, engine_set_id: Any = None
    ) -> list[int]:
        """Stop engines and start as many new ones; returns the new ids when ready.
        ``engine_set_id``: IPython Parallel's name of ``engine_ids``."""
        engine_ids = _engine_ids(engine_ids, engine_set_id)
        client = self._client_or_connect()
        ids = client.ids if engine_ids is None else client.transport.targets(engine_ids)
        client.shutdown(targets=ids)
        return self.start_engines_sync(len(ids))

    async def restart_engines(
        self, engine_ids: Any = None, *, engine_set_id: Any = None
    ) -> list[int]:
        """Stop engines and start as many new ones; returns the new ids when ready."""
        ids = _engine_ids(engine_ids, engine_set_id)
        return await asyncio.to_thread(self.restart_engines_sync, ids)

    def signal_engines_sync(
        self, signum: int, engine_ids: Any = None, *, engine_set_id: Any = None
    ) -> None:
        """Send a signal to engines (default: all). ``engine_set_id``: IPython Parallel's
        name of ``engine_ids``."""
        engine_ids = _engine_ids(engine_ids, engine_set_id)
        self._client_or_connect().send_signal(signum, engine_ids)

    async def signal_engines(
        self, signum: int, engine_ids: Any = None, *, engine_set_id: Any = None
    ) -> None:
        """Send a signal to engines (default: all)."""
        ids = _engine_ids(engine_ids, engine_set_id)
        await asyncio.to_thread(self.signal_engines_sync, signum, ids)

    def stop_engine_sync(self, engine_id: int) -> None:
        """Stop one engine."""
        self.stop_engines_sync([engine_id])

    async def stop_engine(self, engine_id: int) -> None:
        """Stop one engine."""
        await asyncio.to_thread(self.stop_engine_sync, engine_id)

    def restart_engine_sync(self, engine_id: int) -> list[int]:
        """Stop one engine and start another; returns the new one's id, in a list."""
        return self.restart_engines_sync([engine_id])

    async def restart_engine(self, engine_id: int) -> list[int]:
        """Stop one engine and start another; returns the new one's id, in a list."""
        return await asyncio.to_thread(self.restart_engine_sync, engine_id)

    def signal_engine_sync(self, signum: int, engine_id: int) -> None:
        """Send a signal to one engine."""
        self.signal_engines_sync(signum, [engine_id])

    async def signal_engine(self, signum: int, engine_id: int) -> None:
        """Send a signal to one engine."""
        await asyncio.to_thread(self.signal_engine_sync, signum, engine_id)

    def to_dict(self) -> dict[str, Any]:
        """What :meth:`from_dict` needs to attach to this cluster again (no key)."""
        return {
            "cluster_id": self.cluster_id,
            "n": self.n,
            "ip": self.ip,
            "curve": self.curve,
            "controller_pid": self.controller_pid,
            "connection_file": str(self.connection_file),
            "profile_dir": self.profile_dir,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cluster:
        """Attach to the running cluster that :meth:`to_dict` described."""
        return cls.from_file(d.get("connection_file") or d["cluster_id"])

    # ----- stopping

    def stop_cluster_sync(self, timeout: float = 30.0) -> None:
        """Stop every engine and the controller; return when they are gone (engines that
        outlived a dead controller too)."""
        if protocol.check_seconds("timeout", timeout) is None:
            raise TypeError("timeout must be a number of seconds, not None")
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.controller_pid is None:
            return
        clusters.stop_controller(
            self.controller_pid,
            self.folder,
            timeout,
            process=self.controller,
            started=self._controller_started,
        )
        # a controller restarted on the folder meanwhile (``jupyter px start --restore``)
        # serves this cluster now: it goes too
        state = clusters.read_cluster(self.folder)
        if state.running and state.controller_pid not in (None, self.controller_pid):
            clusters.stop_controller(
                state.controller_pid, self.folder, timeout, started=state.controller_started
            )
        self.controller_pid = None
        self.remove_cluster_file()
        # a client of it that was killed left its shared-memory segment named; nothing
        # needs it now (a client of any cluster sweeps too, when it first shares one)
        shm.tidy()

    async def stop_cluster(self, timeout: float = 30.0) -> None:
        """Stop every engine and the controller; return when they are gone."""
        await asyncio.to_thread(self.stop_cluster_sync, timeout)

    def _stop_at_exit(self) -> None:
        if self.running:
            self.stop_cluster_sync(timeout=10)

    # ----- context managers and re-attaching

    def __enter__(self) -> Client:
        return self.start_and_connect_sync()

    def __exit__(self, *exc: Any) -> None:
        self.stop_cluster_sync()

    async def __aenter__(self) -> Client:
        return await self.start_and_connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop_cluster()

    @classmethod
    def from_file(
        cls,
        cluster_file: str | os.PathLike[str] | None = None,
        *,
        cluster_id: str = "",
        profile: str | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
    ) -> Cluster:
        """Attach to a running cluster: ``cluster_file`` is its id, folder, cluster file
        or connection file (default: the newest). ``cluster_id=`` as IPython Parallel's;
        ``profile`` and ``profile_dir`` are accepted for it and not needed: clusters are
        found by id."""
        cluster = cluster_file
        if cluster is None and cluster_id:
            cluster = cluster_id
        if cluster is not None and Path(cluster).name == CLUSTER_FILE:
            cluster = Path(cluster).parent
        path = clusters.find_connection_file(cluster)
        state = clusters.read_cluster(path.parent)
        info = clusters.read_connection_file(path, "cluster_id", "controller_pid")
        self = cls(cluster_id=info["cluster_id"], shutdown_atexit=False)
        self.folder = path.parent
        self.controller_pid = int(info["controller_pid"])
        if state.controller_pid == self.controller_pid:
            self._controller_started = state.controller_started
        if "engines" in state.info:
            self.n = len(state.info["engines"])
        return self


def _engine_ids(engine_ids: Any, engine_set_id: Any) -> Any:
    """The engines a call names, by ``engine_ids`` or IPython Parallel's ``engine_set_id``
    (what :meth:`Cluster.start_engines` returned); TypeError if both."""
    if engine_set_id is None:
        return engine_ids
    if engine_ids is not None:
        raise TypeError("give engine_ids or engine_set_id, not both")
    return engine_set_id


def _check_min_engines(min_engines: int | None, n: int) -> None:
    """``min_engines`` cannot be more than the engines started (as ``jupyter px start``
    refuses it): the start would wait for engines that never come."""
    if min_engines is not None and min_engines > n:
        raise ValueError(f"min_engines={min_engines} is more than the {n} engines started")


def _check_local_address(ip: str) -> None:
    """``ip`` is an address of this machine (the controller binds to it): ClusterError
    naming it, before a controller is started to fail with zmq's traceback. A wildcard
    is left to the launcher to judge."""
    from kernel_engine.launchers.ssh import WILDCARDS

    if ip in WILDCARDS:
        return
    host = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as exc:
        raise ClusterError(
            f"ip={ip!r} is not an address of this machine ({exc.strerror or exc}): the "
            "controller binds to it; use one of this machine's addresses"
        ) from None
