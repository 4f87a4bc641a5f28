"""``python -m kernel_engine.controller``: run a controller (what ``Cluster`` launches)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kernel_engine.kernelspec import ensure_installed

from .app import Controller


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jupyter px controller", description=__doc__)
    parser.add_argument("--folder", required=True, help="the cluster folder")
    parser.add_argument("-n", "--n", type=int, default=0, help="engines to start")
    parser.add_argument("--ip", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--cluster-id", default="", help="the cluster's name")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when it exits")
    parser.add_argument("--cwd", default=None, help="engines' working directory")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=30.0,
        help="seconds of silence after which a client counts as gone (its queued tasks dropped)",
    )
    parser.add_argument(
        "--curve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encrypt with CurveZMQ (default: when --ip is not loopback)",
    )
    parser.add_argument(
        "--on-client-lost",
        choices=("finish", "abort"),
        default="finish",
        help="a lost client's tasks already on engines: run them, or abort those not started",
    )
    parser.add_argument(
        "--db",
        default="sqlite",
        help="the task records: 'sqlite' (tasks.db in the cluster folder, the default), "
        "'memory' (none kept after the controller), or a database file's path",
    )
    parser.add_argument(
        "--db-max-bytes",
        type=int,
        default=None,
        help="largest size of the task database file (oldest finished records go first)",
    )
    parser.add_argument(
        "--db-max-age",
        type=float,
        default=None,
        help="seconds a finished task's record is kept (0: for ever)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s controller: %(message)s",
        stream=sys.stderr,
    )
    ensure_installed()
    controller = Controller(
        Path(args.folder),
        ip=args.ip,
        cluster_id=args.cluster_id,
        parent_pid=args.parent_pid or None,
        cwd=args.cwd,
        client_timeout=args.client_timeout,
        on_client_lost=args.on_client_lost,
        curve=args.curve,
        db=args.db,
        db_max_bytes=args.db_max_bytes,
        db_max_age=args.db_max_age,
    )
    controller.write_files()
    if args.n:
        controller.start_engines(args.n)
    else:
        controller._report({"status": "ready", "ids": []})
    return controller.run()


if __name__ == "__main__":
    sys.exit(main())
