"""``python -m kernel_engine.controller``: run a controller (what ``Cluster`` launches).

With ``--restore``, the controller serves the cluster of one that died in ``--folder``
(see :mod:`.app`): the folder's key, ports and cluster id, and, unless given here, the
options the dead controller ran with.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

from kernel_engine.templates import prestart

if __name__ == "__main__":
    prestart(sys.argv[1:])  # first: the engines' fork template imports while we do

from kernel_engine.errors import ClusterError
from kernel_engine.kernelspec import ensure_installed

from .app import Controller
from .restore import saved_options

DEFAULTS = {
    "client_timeout": 30.0,
    "on_client_lost": "finish",
    "db": "sqlite",
    "db_max_bytes": None,
    "db_max_age": None,
    "cwd": None,
    "engine_grace": None,
}
"""Options a restored controller takes from the dead one's, unless given (None here)."""


def parser() -> argparse.ArgumentParser:
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
        default=None,
        help="seconds of silence after which a client counts as gone (its queued tasks "
        "dropped; default 30)",
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
        default=None,
        help="a lost client's tasks already on engines: run them (the default), or abort "
        "those not started",
    )
    parser.add_argument(
        "--db",
        default=None,
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
    parser.add_argument(
        "--engine-grace",
        type=float,
        default=None,
        help="seconds the engines outlive this controller should it die, waiting for a "
        "restarted one to adopt them (default: $JUPYTER_PX_ENGINE_GRACE, else 60)",
    )
    parser.add_argument(
        "--engines",
        default="local",
        help="the launcher that starts engines: local, mpi, slurm, ssh, provisioner or "
        "package.module:Class",
    )
    parser.add_argument(
        "--engine-options",
        default="{}",
        help="the launcher's options, as a JSON object (mpi_args, slurm_args, ...)",
    )
    parser.add_argument(
        "--min-engines",
        type=int,
        default=None,
        help="report the start once this many engines are ready (default: all)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=None,
        help="seconds within which the engines must be ready, else the start fails",
    )
    parser.add_argument(
        "--restore",
        action="store_true",
        help="serve the cluster of a controller that died in --folder: same key, ports "
        "and task records; adopt its engines still running",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s controller: %(message)s",
        stream=sys.stderr,
    )
    folder = Path(args.folder)
    options = {**DEFAULTS, **(saved_options(folder) if args.restore else {})}
    for name in DEFAULTS:
        given = getattr(args, name)
        if given is not None:
            options[name] = given
    try:
        # (here, not in the client that launches us: while the fork template imports)
        try:
            ensure_installed()
        except OSError as exc:
            raise ClusterError(f"the engine kernel spec could not be installed: {exc}") from exc
        engine_options = json.loads(args.engine_options)
        if not isinstance(engine_options, dict):
            raise ValueError("--engine-options must be a JSON object")
        controller = Controller(
            folder,
            ip=args.ip,
            cluster_id=args.cluster_id,
            parent_pid=args.parent_pid or None,
            curve=args.curve,
            restore=args.restore,
            engines=args.engines,
            engine_options=engine_options,
            min_engines=args.min_engines,
            start_timeout=args.start_timeout,
            **options,
        )
    except (ClusterError, TypeError, ValueError) as exc:
        # (what launched us reads this line; see kernel_engine.clusters.wait_ready)
        print(json.dumps({"status": "error", "message": str(exc)}), flush=True)
        logging.getLogger("kernel_engine.controller").error("%s", exc)
        return 1
    controller.write_files()
    controller.start(args.n)
    tune_gc()
    sys.setswitchinterval(SWITCH_INTERVAL)
    return controller.run()


SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the GIL while another waits for it (Python's default: 5 ms).
The task store's writer builds a batch's rows in Python for milliseconds at a time; with
the default, the event loop could wait up to 5 ms for the GIL each batch while the
engines ran out of tasks (likewise behind a reader thread answering a large query).
Load-balanced tiny tasks with the SQLite store, five alternated pairs of 3x10,000-task
maps: median 2,765 -> 2,893 tasks/s; within this machine's noise, no worse anywhere."""


GC_THRESHOLDS = (50_000, 20, 20)
"""The controller's garbage collector thresholds (Python's default: 700, 10, 10). Its
objects are few and long-lived (engines, records) and its garbage is messages, freed by
reference counting: at 2,000 load-balanced tasks a second, the default thresholds ran a
collection every few tasks, each walking every young object, and a full one every few
hundred. Measured with 20,000 tiny tasks (controller CPU per task, medians of 3
alternated runs): 307 -> 278 µs with the in-memory store, 455 -> 406 µs with SQLite (its
writer thread allocates a row per task)."""


def tune_gc() -> None:
    """Collect what starting made, keep it out of later collections (``gc.freeze``), and
    collect less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


if __name__ == "__main__":
    sys.exit(main())
