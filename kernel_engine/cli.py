"""``jupyter px ...``: install the engine kernel spec and server extension; start, stop, list
and clean clusters.

Cluster folders and controllers are :mod:`kernel_engine.clusters`' business; this module
only parses arguments and prints. Commands that read the folders (start, stop, list) also
remove the key files that clusters whose controller died left behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any

from kernel_engine import clusters, shm


def _install(args: argparse.Namespace) -> int:
    from kernel_engine.kernelspec import enable_server_extension, install, install_labextension

    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install(user=args.user, prefix=prefix)
    print(f"Installed the jupyter-px engine kernel spec in {path}")
    if args.server_extension:
        config = enable_server_extension(user=args.user, prefix=prefix)
        print(f"Enabled the jupyter-px server extension (cluster REST API) in {config}")
    if args.labextension:
        folder = install_labextension(user=args.user, prefix=prefix)
        if folder is not None:
            print(f"Installed the jupyter-px JupyterLab extension (Clusters panel) in {folder}")
    return 0


class UsageError(Exception):
    """Raised when command-line arguments do not fit together (exit code 2, nothing
    started)."""


def _number(kind: Callable[[str], Any], low: float, high: float = math.inf) -> Any:
    """An argparse type: ``kind`` (int or float) of the text, finite, in [low, high]."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"at least {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, not {text!r}")
        return value

    return parse


def _arg_list(text: str) -> list[str]:
    """``--mpi-args "--oversubscribe --bind-to none"``: split as a shell would."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {exc}") from None


def _hosts(text: str) -> dict[str, int]:
    """``--hosts a=2,user@b,10.0.0.3=4``: engines per host (1 when no ``=n``)."""
    from kernel_engine.launchers.ssh import check_hosts

    hosts: dict[str, int] = {}
    for item in text.split(","):
        host, sep, count = item.strip().partition("=")
        if not host:
            raise argparse.ArgumentTypeError(f"expected host=n,host2=m, not {text!r}")
        if sep and not count.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: the count after '=' must be a number")
        if host in hosts:
            raise argparse.ArgumentTypeError(f"{host!r} is named twice")
        hosts[host] = int(count) if sep else 1
    try:
        return check_hosts(hosts)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_WALLTIME = re.compile(r"\d+(-\d+)?(:\d{1,2}){0,2}\Z")


def _walltime(text: str) -> str:
    """Slurm's time limit: minutes, ``HH:MM:SS``, ``D-HH:MM``, ..."""
    if not _WALLTIME.match(text):
        raise argparse.ArgumentTypeError(
            f"expected minutes or [D-]HH:MM[:SS] as Slurm writes it, not {text!r}"
        )
    return text


LAUNCHER_FLAGS = {
    "mpi_args": "--mpi-args",
    "mpiexec": "--mpiexec",
    "slurm_args": "--slurm-args",
    "walltime": "--walltime",
    "hosts": "--hosts",
    "ssh_args": "--ssh-args",
    "ssh": "--ssh",
    "kernel_name": "--kernel-name",
}
"""The launcher options ``jupyter px start`` takes, by the launchers' names for them."""


def _launcher_args(args: argparse.Namespace) -> list[str]:
    """Check ``--engines`` and the launcher flags together; the controller's options for
    them. Sets ``args.n`` when it was not given. Raises :class:`UsageError`."""
    from kernel_engine import launchers

    try:
        cls = launchers.find(args.engines)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--engines: {exc}") from None
    options = {k: getattr(args, k) for k in LAUNCHER_FLAGS if getattr(args, k) is not None}
    wrong = [LAUNCHER_FLAGS[k] for k in options if k not in cls.options]
    if wrong:
        takes = [LAUNCHER_FLAGS[k] for k in LAUNCHER_FLAGS if k in cls.options]
        raise UsageError(
            f"{', '.join(wrong)}: not an option of --engines {args.engines} "
            f"(it takes {', '.join(takes) or 'none of the launcher options'})"
        )
    if cls is launchers.ssh.SSHLauncher:
        if "hosts" not in options:
            raise UsageError("--engines ssh needs --hosts host=n,host2=m")
        try:
            launchers.ssh.check_address(args.ip, options["hosts"], args.curve)
        except ValueError as exc:
            raise UsageError(f"--ip: {exc}") from None
    if cls.name == "provisioner" and "kernel_name" not in options:
        raise UsageError("--engines provisioner needs --kernel-name KERNEL_SPEC")
    if args.n is None:
        args.n = sum(options["hosts"].values()) if "hosts" in options else 0 if args.restore else 2
    if args.min_engines is not None and args.min_engines > args.n:
        raise UsageError(f"--min-engines {args.min_engines} is more than the {args.n} engines")
    if cls is launchers.LocalLauncher and args.min_engines is None:
        return []
    out = ["--engines", args.engines]
    if options:
        out += ["--engine-options", json.dumps(options)]
    if args.min_engines is not None:
        out += ["--min-engines", str(args.min_engines)]
    if cls is not launchers.LocalLauncher:
        out += ["--start-timeout", str(args.timeout)]
    return out


def _start(args: argparse.Namespace) -> int:
    if args.restore and not args.cluster_id:
        raise UsageError("--restore: which cluster? give --cluster-id")
    launcher_args = _launcher_args(args)
    cluster_id = args.cluster_id or clusters.new_cluster_id()
    folder = clusters.cluster_folder(cluster_id)
    extra = ["--curve"] if args.curve else ["--no-curve"] if args.curve is False else []
    if args.engine_grace is not None:
        extra += ["--engine-grace", str(args.engine_grace)]
    extra += launcher_args
    process = clusters.launch_controller(
        folder,
        args.n,
        cluster_id=cluster_id,
        ip=args.ip,
        # a restored cluster's engines keep the working directory they were started in
        cwd=None if args.restore else os.getcwd(),
        controller_args=extra,
        restore=args.restore,
        cleaned=_report_cleaned,
    )
    status = clusters.wait_ready(process, folder, args.timeout, restore=args.restore)
    ready = status.get("ids", [])
    if args.restore:
        print(f"cluster {cluster_id} restored: {len(ready)} engines ready {ready}")
        if status.get("adopting"):
            print(f"engines still busy, adopted when their task ends: {status['adopting']}")
    else:
        print(f"cluster {cluster_id}: {len(ready)} engines ready")
    print(f"connection file: {status.get('connection_file', folder / clusters.CLIENT_FILE)}")
    return 0


def _report_cleaned(cleaned: list[clusters.ClusterState]) -> None:
    for c in cleaned:
        print(
            f"removed the key files of dead cluster {c.cluster_id} "
            f"(controller pid {c.controller_pid} is gone)",
            file=sys.stderr,
        )


def _stop(args: argparse.Namespace) -> int:
    if args.cluster_id is not None:
        folder = clusters.cluster_folder(args.cluster_id)
        if not folder.is_dir():
            print(f"no cluster {args.cluster_id} in {clusters.clusters_dir()}", file=sys.stderr)
            return 1
        chosen = [clusters.read_cluster(folder)]
    else:
        _report_cleaned(clusters.clean_dead_clusters())
        chosen = clusters.list_clusters()
        if not chosen:
            print("no running clusters", file=sys.stderr)
            return 1
        if not args.all:
            chosen = chosen[-1:]
    return max(_stop_one(c, args.timeout) for c in chosen)


def _stop_one(cluster: clusters.ClusterState, timeout: float) -> int:
    """Stop one cluster; for a dead one, say so and remove what its controller left."""
    if cluster.state == "starting":
        print(f"cluster {cluster.cluster_id} has no controller record yet", file=sys.stderr)
        return 1
    keys = clusters.key_files(cluster.folder)
    pid = cluster.controller_pid
    if pid is None:
        clusters.stop_engines(cluster.folder)
        clusters.remove_key_files(cluster.folder)
    elif clusters.stop_controller(pid, cluster.folder, timeout, started=cluster.controller_started):
        print(f"stopped cluster {cluster.cluster_id}")
        return 0
    removed = ", ".join(p.name for p in keys if not p.exists())
    print(
        f"cluster {cluster.cluster_id} was not running (controller pid {pid} is gone); "
        + (f"removed its key files: {removed}" if removed else "it left no key files")
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    _report_cleaned(clusters.clean_dead_clusters())
    running = clusters.list_clusters()
    if args.json:
        print(json.dumps([c.as_dict() for c in running], indent=1))
        return 0
    if not running:
        print("no running clusters")
    for c in running:
        print(
            f"{c.cluster_id}  controller pid {c.controller_pid}  "
            f"engines {c.info.get('ready', [])}  {c.connection_file}"
        )
    return 0


def _engines(args: argparse.Namespace) -> int:
    if args.cluster_id is None:
        running = clusters.list_clusters()
        if not running:
            print("no running clusters", file=sys.stderr)
            return 1
        cluster = running[-1]
    else:
        cluster = clusters.read_cluster(clusters.cluster_folder(args.cluster_id))
        if not cluster.running:
            print(f"cluster {args.cluster_id} is not running", file=sys.stderr)
            return 1
    engines = cluster.info.get("engines", {})
    if args.json:
        print(json.dumps(list(engines.values()), indent=1))
        return 0
    if not engines:
        print(f"cluster {cluster.cluster_id} has no engines")
    for eid, info in sorted(engines.items(), key=lambda item: int(item[0])):
        print(
            f"engine {eid}: pid {info.get('pid')} on {info.get('hostname')} ({info.get('state')})"
        )
    return 0


def _clean(args: argparse.Namespace) -> int:
    cleaned = clusters.clean_dead_clusters(remove_folders=True)
    for name in shm.sweep_stale():  # (left named by clients that were killed)
        print(f"removed shared-memory segment {name} of a client that is gone")
    for c in cleaned:
        print(f"removed dead cluster {c.cluster_id} ({c.folder})")
    if not cleaned:
        print("no dead clusters")
    return 0


def _top(args: argparse.Namespace) -> int:
    from kernel_engine.top import top

    return top(args.cluster_id, once=args.once, interval=args.interval)


def _controller(argv: list[str]) -> int:
    from kernel_engine.controller.__main__ import main

    return main(argv)


def _engine(argv: list[str]) -> int:
    """``-f KERNEL_CONNECTION_FILE``: a kernel as a kernel manager starts it; otherwise an
    engine that joins a running cluster by itself (``--file``, ``--cluster-id`` or
    ``$JUPYTER_PX_CONNECTION_INFO``; see :mod:`kernel_engine.engine.register`)."""
    if any(a in ("-f", "--f") or a.startswith(("-f=", "--f=")) for a in argv):
        from kernel_engine.engine.app import main

        sys.argv = [sys.argv[0], *argv]
        main()
        return 0
    from kernel_engine.engine.register import main as register

    return register(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jupyter px", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install the engine kernel spec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="in this environment")
    where.add_argument("--prefix", default=None, help="under this prefix")
    inst.add_argument(
        "--server-extension",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also enable the Jupyter server extension (the cluster REST API) there",
    )
    inst.add_argument(
        "--labextension",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also install the JupyterLab extension (the Clusters panel) there, "
        "when running from a source tree (a wheel installs it by itself)",
    )
    inst.set_defaults(func=_install)
    start = sub.add_parser(
        "start",
        help="start a cluster; returns once engines are ready",
        description="Start a controller and engines; returns once the engines are ready. "
        "Launcher options take one value: write --mpi-args=--oversubscribe (with '=') "
        'or --mpi-args "--oversubscribe --bind-to none".',
    )
    start.add_argument(
        "-n",
        "--n",
        type=_number(int, 0, 4096),
        default=None,
        help="number of engines (default 2; with --hosts, their sum; with --restore, 0)",
    )
    start.add_argument(
        "--engines",
        default="local",
        metavar="LAUNCHER",
        help="what starts the engines: local (the default), mpi (mpiexec), slurm (one batch "
        "job), ssh (--hosts), provisioner (--kernel-name), or package.module:Class",
    )
    start.add_argument("--mpi-args", type=_arg_list, default=None, help="more mpiexec arguments")
    start.add_argument("--mpiexec", default=None, help="the mpiexec command (default mpiexec)")
    start.add_argument("--slurm-args", type=_arg_list, default=None, help="more sbatch arguments")
    start.add_argument(
        "--walltime", type=_walltime, default=None, help="the Slurm job's time limit"
    )
    start.add_argument(
        "--hosts",
        type=_hosts,
        default=None,
        metavar="HOST=N,...",
        help="for --engines ssh: engines per host (HOST alone: 1)",
    )
    start.add_argument("--ssh-args", type=_arg_list, default=None, help="more ssh arguments")
    start.add_argument("--ssh", default=None, help="the ssh command (default ssh)")
    start.add_argument(
        "--kernel-name", default=None, help="for --engines provisioner: the kernel spec"
    )
    start.add_argument(
        "--min-engines",
        type=_number(int, 1, 4096),
        default=None,
        help="return once this many engines are ready; the others join when they start",
    )
    start.add_argument("--cluster-id", default=None)
    start.add_argument(
        "--restore",
        action="store_true",
        help="start the dead controller of --cluster-id again: same key, ports and task "
        "records; its engines still running are adopted (-n starts more)",
    )
    start.add_argument(
        "--engine-grace",
        type=_number(float, 0),
        default=None,
        help="seconds engines outlive a dead controller, for a restarted one to adopt them",
    )
    start.add_argument("--ip", default="127.0.0.1")
    start.add_argument(
        "--timeout",
        type=_number(float, 0.001),
        default=60.0,
        help="seconds within which the engines must be ready (default 60)",
    )
    start.add_argument(
        "--curve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encrypt with CurveZMQ (default: when --ip is not loopback)",
    )
    start.set_defaults(func=_start)
    stop = sub.add_parser("stop", help="stop a cluster (default: the newest)")
    stop.add_argument("--cluster-id", default=None)
    stop.add_argument("--all", action="store_true", help="every running cluster")
    stop.add_argument(
        "--timeout", type=_number(float, 0), default=30.0, help="seconds before SIGKILL"
    )
    stop.set_defaults(func=_stop)
    lst = sub.add_parser("list", help="list running clusters (cleans up after dead ones)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    eng = sub.add_parser("engines", help="list a cluster's engines")
    eng.add_argument("--cluster-id", default=None, help="default: the newest running")
    eng.add_argument("--json", action="store_true")
    eng.set_defaults(func=_engines)
    top = sub.add_parser("top", help="a live table of a cluster's engines (Ctrl-C ends it)")
    top.add_argument("--cluster-id", default=None, help="default: the newest running")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    top.set_defaults(func=_top)
    clean = sub.add_parser("clean", help="remove dead clusters' folders, logs included")
    clean.set_defaults(func=_clean)
    sub.add_parser("controller", help="run a controller in the foreground", add_help=False)
    sub.add_parser(
        "engine",
        help="run one engine that joins a running cluster (--file CLIENT_FILE, --cluster-id "
        "ID or $JUPYTER_PX_CONNECTION_INFO; --help for more)",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "controller":
        return _controller(argv[1:])
    if argv and argv[0] == "engine":
        return _engine(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"jupyter px {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"jupyter px {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
