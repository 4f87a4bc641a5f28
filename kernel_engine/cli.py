"""``jupyter px ...``: install the engine kernel spec; start, stop and list clusters."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _install(args: argparse.Namespace) -> int:
    from kernel_engine.kernelspec import install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install(user=args.user, prefix=prefix)
    print(f"Installed the jupyter-px engine kernel spec in {path}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from jupyter_ext._cluster import Cluster

    cluster = Cluster(
        n=args.n,
        cluster_id=args.cluster_id,
        ip=args.ip,
        start_timeout=args.timeout,
        shutdown_atexit=False,
    )
    cluster.start_cluster_sync()
    print(f"cluster {cluster.cluster_id}: {args.n} engines ready")
    print(f"connection file: {cluster.connection_file}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from jupyter_ext._cluster import Cluster, list_clusters

    ids = [c["cluster_id"] for c in list_clusters()] if args.all else [args.cluster_id]
    if not args.all and args.cluster_id is None:
        running = list_clusters()
        if not running:
            print("no running clusters", file=sys.stderr)
            return 1
        ids = [running[-1]["cluster_id"]]
    for cluster_id in ids:
        Cluster.from_file(cluster_id).stop_cluster_sync()
        print(f"stopped cluster {cluster_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from jupyter_ext._cluster import list_clusters

    clusters = list_clusters()
    if args.json:
        print(json.dumps(clusters, indent=1))
        return 0
    if not clusters:
        print("no running clusters")
    for c in clusters:
        print(
            f"{c['cluster_id']}  controller pid {c['controller_pid']}  "
            f"engines {c.get('ready', [])}  {c['connection_file']}"
        )
    return 0


def _engines(args: argparse.Namespace) -> int:
    from jupyter_ext._client import Client

    with Client(args.cluster_id) as rc:
        for eid in rc.ids:
            info = rc.engine_info(eid)
            print(f"engine {eid}: pid {info['pid']} on {info['hostname']}")
    return 0


def _controller(argv: list[str]) -> int:
    from kernel_engine.controller.__main__ import main

    return main(argv)


def _engine(argv: list[str]) -> int:
    from kernel_engine.engine.app import main

    sys.argv = [sys.argv[0], *argv]
    main()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jupyter px", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install the engine kernel spec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="in this environment")
    where.add_argument("--prefix", default=None, help="under this prefix")
    inst.set_defaults(func=_install)
    start = sub.add_parser("start", help="start a cluster; returns once engines are ready")
    start.add_argument("-n", type=int, default=2, help="number of engines")
    start.add_argument("--cluster-id", default=None)
    start.add_argument("--ip", default="127.0.0.1")
    start.add_argument("--timeout", type=float, default=60.0)
    start.set_defaults(func=_start)
    stop = sub.add_parser("stop", help="stop a cluster (default: the newest)")
    stop.add_argument("--cluster-id", default=None)
    stop.add_argument("--all", action="store_true")
    stop.set_defaults(func=_stop)
    lst = sub.add_parser("list", help="list running clusters")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    eng = sub.add_parser("engines", help="list a cluster's engines")
    eng.add_argument("--cluster-id", default=None)
    eng.set_defaults(func=_engines)
    sub.add_parser("controller", help="run a controller in the foreground", add_help=False)
    sub.add_parser("engine", help="run one engine kernel", add_help=False)
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
    except Exception as exc:
        print(f"jupyter px {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
