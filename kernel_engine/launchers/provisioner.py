"""The provisioner launcher: engines started from a kernel spec, by its kernel provisioner.

``Cluster(engines="provisioner", kernel_name="my-spec")`` (or ``kernel_name=`` alone)
starts each engine as a kernel of the kernel spec ``my-spec``, through a
``jupyter_client.KernelManager``: the provisioner the spec names in
``metadata.kernel_provisioner`` (jupyter_client's ``local-provisioner`` when it names
none) decides where and how the kernel runs: a local process, a container, a pod, a YARN
application. So kernels started elsewhere take the same path as local ones.

What the spec must contain: its ``argv`` runs a *registering* engine,
``python -m kernel_engine.engine.register -f {connection_file}`` (what
:func:`engine_spec` writes; ``jupyter px engine -f {connection_file}`` too). The kernel
learns the cluster from the environment the kernel manager hands the provisioner
(:data:`~kernel_engine.clusters.CONNECTION_ENV`, and its engine id in
:data:`~kernel_engine.engine.register.ID_ENV`), binds the address and ports of its
connection file (those the provisioner chose; the file carries the cluster's key) and
registers with the controller, as the engines ``mpiexec`` or ``ssh`` start do. A
provisioner that does not pass the kernel manager's environment on to a remote kernel
can be given those two variables in the spec's ``env``, as ``"${JUPYTER_PX_...}"``
(jupyter_client fills them in from that environment). The controller must be reachable
from where the kernel runs (``Cluster(ip=...)``).

Errors name the spec: an unknown spec, a provisioner that is not installed, or an argv
that runs some other Python module (a plain ipykernel, which would never register) are
refused before anything starts; a kernel that exits before the start is over fails it
with its exit status and the end of its output. Each kernel's stdout and stderr go to
``engine-<id>.log`` in the cluster folder (``cluster.engine_logs()``) for provisioners
that honour the kernel manager's ``stdout``/``stderr`` (the local ones); the launcher's
own account of what it started goes to ``provisioner-<first id>.log``.

Stopping: the controller has asked the engines to shut down; the kernels still running
are asked again through their kernel manager (``shutdown_request``), then killed through
their provisioner, then whatever of a local kernel's process tree is left is sent
SIGKILL by PID (each checked by its start time), within ``timeout`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory, LocalProvisioner

from kernel_engine import clusters, ports, processes
from kernel_engine.engine.register import ID_ENV, bind_address
from kernel_engine.provisioner import PORT_NAMES

from .base import LaunchContext, Launcher, children, kill_recorded, tail

log = logging.getLogger("kernel_engine.launchers")

ENGINE_MODULE = "kernel_engine.engine.register"
"""The module a spec's ``argv`` runs (with ``-m``) to start a registering engine."""

DEFAULT_PROVISIONER = "local-provisioner"

SETTLE = 1.0
"""Seconds stop gives kernels asked to shut down before it kills them."""


def engine_spec(
    provisioner: str = DEFAULT_PROVISIONER,
    config: dict[str, Any] | None = None,
    python: str | None = None,
    display_name: str = "jupyter-px engine (registering)",
) -> dict[str, Any]:
    """A ``kernel.json`` whose kernels are registering engines started by ``provisioner``
    (its ``config`` as the spec's provisioner configuration), with ``python``."""
    return {
        "argv": [python or sys.executable, "-m", ENGINE_MODULE, "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1"},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": provisioner, "config": config or {}},
        },
    }


def provisioner_name(spec: KernelSpec) -> str:
    """The provisioner a kernel spec names (jupyter_client's default if none)."""
    stanza = (spec.metadata or {}).get("kernel_provisioner") or {}
    name = stanza.get("provisioner_name") if isinstance(stanza, dict) else None
    if isinstance(name, str) and name:
        return name
    return str(KernelProvisionerFactory.instance().default_provisioner_name)


def check_spec(kernel_name: Any) -> KernelSpec:
    """The kernel spec ``kernel_name``, checked to be usable by this launcher.

    Raises
    ------
    TypeError, ValueError
        Naming the spec: no such spec, a provisioner that is not installed, or an
        ``argv`` that runs a Python module other than the registering engine.
    """
    if not isinstance(kernel_name, str) or not kernel_name:
        raise TypeError(f"kernel_name must name a kernel spec (a string), not {kernel_name!r}")
    ksm = KernelSpecManager()
    found = ksm.find_kernel_specs()
    folder = found.get(kernel_name) or found.get(kernel_name.lower())
    if folder is None:
        raise ValueError(
            f"no kernel spec named {kernel_name!r} (installed: "
            f"{', '.join(sorted(found)) or 'none'}; searched {', '.join(ksm.kernel_dirs)})"
        )
    try:  # (read as is: jupyter_client hides a spec whose provisioner is missing)
        spec = KernelSpec.from_resource_dir(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"kernel spec {kernel_name!r} ({folder}) is unreadable: {exc}") from None
    name = provisioner_name(spec)
    factory = KernelProvisionerFactory.instance()
    if not factory.is_provisioner_available(spec):
        known = ", ".join(sorted(factory.get_provisioner_entries())) or "none"
        raise ValueError(
            f"kernel spec {kernel_name!r} names the kernel provisioner {name!r}, which is "
            f"not installed (installed: {known})"
        )
    argv = list(spec.argv)
    if not argv:
        raise ValueError(f"kernel spec {kernel_name!r} has an empty argv")
    if len(argv) >= 3 and argv[1] == "-m" and Path(argv[0]).name.startswith("python"):
        module = argv[2]
        if module != ENGINE_MODULE:
            raise ValueError(
                f"kernel spec {kernel_name!r} runs `-m {module}`, which does not register "
                f"with a cluster: its argv must run `{sys.executable} -m {ENGINE_MODULE} "
                "-f {connection_file}` (see kernel_engine.launchers.provisioner.engine_spec)"
            )
    return spec


def _is_local(spec: KernelSpec) -> bool:
    """Whether the spec's provisioner runs kernels as child processes of this one."""
    try:
        entry = KernelProvisionerFactory.instance().provisioners[provisioner_name(spec)]
        cls = entry.load()
    except Exception:  # (an entry point that fails to load: take it as remote)
        return False
    return isinstance(cls, type) and issubclass(cls, LocalProvisioner)


class _Kernel:
    """One kernel this launcher started, and what it knows of its process."""

    def __init__(self, eid: int, km: KernelManager, log_path: Path):
        self.eid = eid
        self.km = km
        self.log_path = log_path
        pid = getattr(km.provisioner, "pid", None)
        self.pid: int | None = pid if isinstance(pid, int) and pid > 1 else None
        self.started = processes.start_time(self.pid) if self.pid else None
        self.ended: str | None = None  # (how it ended, once seen)

    def exit_code(self) -> tuple[bool, int | None]:
        """Whether the kernel's process ended, and its exit code (None: unknown)."""
        process = getattr(self.km.provisioner, "process", None)
        if process is not None:
            code: int | None = process.poll()
            return code is not None, code
        try:
            alive = self.km.is_alive()
        except Exception:
            alive = False
        return not alive, None


def _describe(code: int | None) -> str:
    """How a kernel's process ended, in words."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ProvisionerLauncher(Launcher):
    """Engines started from a kernel spec by its provisioner (see the module docstring).

    Options: ``kernel_name`` (the kernel spec, required).
    """

    name = "provisioner"
    options = frozenset({"kernel_name"})

    def __init__(self, context: LaunchContext):
        super().__init__(context)
        if "kernel_name" not in context.options:
            raise ValueError('engines="provisioner" needs kernel_name="<kernel spec>"')
        self.kernel_name: str = context.options["kernel_name"]
        self.spec = check_spec(self.kernel_name)
        self.local = _is_local(self.spec)
        self.kernels: list[_Kernel] = []
        self.log_path = context.folder / f"provisioner-{context.first_id}.log"
        self._stopping = False
        self._failed = False  # (poll reported a kernel's end: once is enough)
        self._reported: set[int] = set()  # (ids whose end ended() told)
        self._thread: threading.Thread | None = None  # (starts the kernels)
        self._lock = threading.Lock()  # (a kernel started is kept, or the stop began)
        self._start_error: str | None = None

    def _say(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def _cluster(self) -> dict[str, Any]:
        try:
            info = json.loads(self.context.env.get(clusters.CONNECTION_ENV, "{}"))
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}

    def start(self) -> list[int]:
        """Start the kernels in a thread of their own: a provisioner may take seconds for
        each (a container, a pod), and the controller's loop must go on meanwhile (see
        :meth:`_start_all`)."""
        self._say(
            f"kernel spec {self.kernel_name!r} ({self.spec.resource_dir}), provisioner "
            f"{provisioner_name(self.spec)!r}: argv {self.spec.argv}"
        )
        self._thread = threading.Thread(
            target=self._start_all, name="px-provisioner-start", daemon=True
        )
        self._thread.start()
        return self.ids

    def _start_all(self) -> None:
        """(The start thread.) A kernel whose start ends after :meth:`stop` gave up
        waiting for it is stopped here; a kernel that cannot be started ends the start,
        and those started before it go on serving (they may have registered and taken
        tasks already): :meth:`poll` reports the failure."""
        eid = self.ids[0] if self.ids else None
        try:
            for eid in self.ids:
                if self._stopping:
                    return
                kernel = self._start_kernel(eid)
                with self._lock:
                    if not self._stopping:
                        self.kernels.append(kernel)
                        continue
                self._say(f"engine {eid}: started after the stop began; stopping it")
                kernel.km.shutdown_kernel(now=True)
                return
        except Exception as exc:
            self._say(f"failed: {exc!r}")
            said = tail(self.context.folder / f"engine-{eid}.log", 20)
            self._start_error = (
                f"kernel spec {self.kernel_name!r} (provisioner "
                f"{provisioner_name(self.spec)!r}) could not start engine {eid}: {exc}"
                + (f"\n--- its output ---\n{said}" if said else "")
            )

    def start_done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def _start_kernel(self, eid: int) -> _Kernel:
        ctx = self.context
        cluster = self._cluster()
        km = KernelManager(
            kernel_name=self.kernel_name,
            connection_file=str(ctx.folder / f"kernel-{eid}.json"),
            # (where a local kernel binds: as a registering engine chooses it)
            ip=bind_address(str(cluster.get("ip") or "127.0.0.1")),
        )
        if cluster.get("key"):
            km.session.key = str(cluster["key"]).encode()  # (the file carries the cluster's)
        if self.local and km.transport == "tcp":
            # ports outside the ephemeral range (see kernel_engine.ports), which the local
            # provisioner then keeps (it would pick its own in that range otherwise)
            km.cache_ports = False
            for name in PORT_NAMES:
                setattr(km, name, ports.PICKER.take(km.ip))
        env = {**os.environ, **ctx.env, ID_ENV: str(eid)}
        if self.local:  # (a PID only means something on this host)
            env[clusters.CONTROLLER_PID_ENV] = str(os.getpid())
        log_path = ctx.folder / f"engine-{eid}.log"
        with open(log_path, "ab") as logf:
            km.start_kernel(stdout=logf, stderr=logf, cwd=ctx.cwd, env=env)
        kernel = _Kernel(eid, km, log_path)
        self._say(f"engine {eid}: kernel {km.kernel_id} started (pid {kernel.pid or 'unknown'})")
        return kernel

    def _look(self) -> None:
        """Note the kernels whose process ended since the last look."""
        if self._stopping:
            return
        for kernel in self.kernels:
            if kernel.ended is None:
                done, code = kernel.exit_code()
                if done:
                    kernel.ended = _describe(code)
                    self._say(f"engine {kernel.eid}: kernel {kernel.ended}")

    def poll(self) -> str | None:
        self._look()
        if self._start_error is not None and not self._failed:
            self._failed = True  # (it stopped what it had started)
            return self._start_error
        if self._stopping or self._failed:
            return None
        for kernel in self.kernels:
            if kernel.ended is not None:
                self._failed = True
                said = tail(kernel.log_path) or "(no output)"
                return (
                    f"engine {kernel.eid}'s kernel (kernel spec {self.kernel_name!r}, "
                    f"provisioner {provisioner_name(self.spec)!r}) {kernel.ended}; "
                    f"its output:\n{said}"
                )
        return None

    def ended(self) -> dict[int, tuple[int | None, str]]:
        self._look()
        out = {}
        for kernel in self.kernels:
            if kernel.ended is not None and kernel.eid not in self._reported:
                self._reported.add(kernel.eid)
                out[kernel.eid] = (kernel.pid, kernel.ended)
        return out

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:  # (from now on, a kernel the start thread makes, it stops itself)
            self._stopping = True
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.1, timeout / 2))  # (a kernel being started: let it finish)
            if thread.is_alive():
                log.warning("a kernel's start did not end in %.1f s: it stops itself", timeout / 2)
        trees: dict[int, str | None] = {}
        for kernel in self.kernels:
            if kernel.pid is not None and kernel.started is not None:
                trees[kernel.pid] = kernel.started
                trees.update({p: processes.start_time(p) for p in children(kernel.pid)})
        running = [k for k in self.kernels if not k.exit_code()[0]]
        for kernel in running:
            try:
                kernel.km.request_shutdown()
            except Exception as exc:
                log.debug("engine %i: shutdown_request: %s", kernel.eid, exc)
        # (a moment for the kernels to leave by themselves: an engine asked to shut down
        # is gone within it; the rest of the time is for killing the others)
        settle = time.monotonic() + min(SETTLE, timeout / 2)
        while running and time.monotonic() < settle:
            running = [k for k in running if not k.exit_code()[0]]
            if running:
                time.sleep(0.05)
        for kernel in self.kernels:
            try:
                kernel.km.shutdown_wait_time = max(0.1, deadline - time.monotonic())
                kernel.km.shutdown_kernel(now=True)  # (the provisioner kills, waits, cleans up)
            except Exception as exc:
                log.warning("engine %i: stopping its kernel: %s", kernel.eid, exc)
        kill_recorded(trees, max(0.5, deadline - time.monotonic()))
        if self.kernels:
            self._say(f"stopped engines {[k.eid for k in self.kernels]}")

    def record(self) -> dict[str, Any]:
        pids = [[k.pid, k.started] for k in self.kernels if k.pid is not None and k.started]
        return {"launcher": self.name, "ids": self.ids, "pids": pids}

    def log_files(self) -> list[Path]:
        # (the kernels are what it launched: a start that times out quotes their output)
        return [self.log_path, *(k.log_path for k in self.kernels)]


def stop_record(record: dict[str, Any], timeout: float) -> None:
    """Stop the kernels a provisioner launcher recorded (their controller died): SIGKILL
    to each PID still the process recorded, and to what runs under it."""
    tree: dict[int, str | None] = {}
    for item in record.get("pids") or []:
        if not (isinstance(item, list) and len(item) == 2):
            continue
        pid, started = item
        ours = isinstance(pid, int) and pid > 1 and isinstance(started, str)
        if ours and processes.start_time(pid) == started:
            tree[pid] = started
            tree.update({p: processes.start_time(p) for p in children(pid)})
    kill_recorded(tree, timeout)
