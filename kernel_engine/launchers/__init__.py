"""Launchers: what starts engines (see :mod:`.base` for the interface).

``"local"`` (:mod:`.local`), ``"mpi"`` (:mod:`.mpi`), ``"slurm"`` (:mod:`.slurm`),
``"ssh"`` (:mod:`.ssh`), ``"provisioner"`` (:mod:`.provisioner`: any kernel spec's
kernel provisioner), or a plug-in named ``"package.module:Class"``. A controller keeps
the records of the launchers it runs in ``launchers.json`` in the cluster folder, so
that whoever stops a cluster whose controller died stops what they started too
(:func:`stop_recorded`).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from kernel_engine import processes

from .base import LaunchContext, Launcher, kill_recorded, process_tree
from .local import LocalLauncher
from .mpi import MPILauncher
from .provisioner import ProvisionerLauncher
from .provisioner import stop_record as _stop_provisioner_record
from .slurm import SlurmLauncher, cancel
from .ssh import SSHLauncher
from .ssh import stop_record as _stop_ssh_record

__all__ = ["LaunchContext", "Launcher", "find", "launcher_name", "stop_recorded"]

log = logging.getLogger("kernel_engine.launchers")

BUILTIN: dict[str, type[Launcher]] = {
    "local": LocalLauncher,
    "mpi": MPILauncher,
    "mpiexec": MPILauncher,
    "slurm": SlurmLauncher,
    "ssh": SSHLauncher,
    "provisioner": ProvisionerLauncher,
}

RECORD_FILE = "launchers.json"

_PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")


def find(name: str) -> type[Launcher]:
    """The launcher class named ``name`` (a built-in name or ``"module:Class"``).

    Raises
    ------
    ValueError
        When there is no such launcher.
    """
    if not isinstance(name, str):
        raise TypeError(f"a launcher is named by a string, not {name!r}")
    if name in BUILTIN:
        return BUILTIN[name]
    if not _PLUGIN.match(name):
        known = ", ".join(repr(n) for n in BUILTIN)
        raise ValueError(
            f"engines={name!r} names no launcher: use {known} or 'package.module:Class'"
        )
    module_name, _, qualname = name.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # (importing runs the module: it may even exit)
        raise ValueError(f"cannot load launcher {name!r}: {exc!r}") from None
    if not (isinstance(found, type) and issubclass(found, Launcher)):
        raise ValueError(f"{name!r} is not a subclass of kernel_engine.launchers.Launcher")
    return found


def launcher_name(engines: Any) -> str:
    """How a controller is told of a launcher: a built-in name as is, a class by its
    import path (it must be importable in the controller's process).

    Raises
    ------
    TypeError, ValueError
        For anything else (and for a class defined in ``__main__``, which the
        controller could not import).
    """
    if isinstance(engines, str):
        find(engines)
        return engines
    if isinstance(engines, type) and issubclass(engines, Launcher):
        if engines.__module__ == "__main__" or "<locals>" in engines.__qualname__:
            raise ValueError(
                f"launcher {engines.__qualname__} must be importable by the controller "
                "(define it in a module, not in __main__ or a function)"
            )
        return f"{engines.__module__}:{engines.__qualname__}"
    raise TypeError(
        "engines must be 'local', 'mpi', 'slurm', 'ssh', 'provisioner' or a Launcher "
        f"subclass, not {engines!r}"
    )


def stop_recorded(folder: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Stop what the launchers recorded in ``folder`` started (for a controller that died
    without stopping them); returns the records acted on, and removes the file."""
    path = Path(folder) / RECORD_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    done = []
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict):
            continue
        try:
            _stop_record(record, timeout)
        except Exception as exc:  # (best effort: one failure must not keep the others)
            log.warning("stopping recorded launcher %s: %s", record.get("launcher"), exc)
            continue
        done.append(record)
    path.unlink(missing_ok=True)
    return done


def _stop_record(record: dict[str, Any], timeout: float) -> None:
    if record.get("launcher") == "ssh":
        _stop_ssh_record(record, timeout)
        return
    if record.get("launcher") == "provisioner":
        _stop_provisioner_record(record, timeout)
        return
    job = record.get("job_id")
    if isinstance(job, str) and job.isdigit():
        cancel(job, timeout)
    pid, started = record.get("pid"), record.get("pid_started")
    if not (isinstance(pid, int) and pid > 1 and isinstance(started, str)):
        return
    # (its session too: what it started outlives it there, when it died first)
    tree = process_tree(pid, started)
    if processes.start_time(pid) == started:
        processes.terminate(pid, timeout, lambda: processes.start_time(pid) == started)
    kill_recorded(tree)
