#!/usr/bin/env python
"""Where a load-balanced tiny task's CPU goes: each process's CPU per task over long maps.

    .venv/bin/python benchmarks/lb_cpu.py [--db sqlite,memory] [--tasks 10000] [--rounds 3]
        [--time-limit S]

For each task store in ``--db`` (taking turns, ``--rounds`` times), a fresh 2-engine
cluster runs ``--tasks``-task maps of ``noop1`` with ``chunksize=1`` (after a warm-up
map), three per round, and prints for each store the medians of: tasks a second, and the
CPU per task of the engines (together), the controller and this client (from ``/proc``:
every thread of each process). The rate moves with the machine's load; the CPU per task
much less, and the rate ratio between stores is meaningful when they alternate in one run.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
# (the engines import the workloads too: they inherit this from the controller)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (BENCH_DIR, os.environ.get("PYTHONPATH", "")) if p
)

from workloads import noop1  # noqa: E402  (needs BENCH_DIR on sys.path)

import jupyter_ext as jx  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User and system CPU of every thread of ``pid`` so far."""
    ticks = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def one_round(
    db: str, tasks: int, time_limit: float | None = None
) -> list[tuple[float, float, float, float]]:
    """(tasks/s, engines, controller and client CPU per task in us) of three maps
    (each task with ``time_limit``, if given)."""
    cluster = jx.Cluster(n=2, db=db)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=60)
        view = rc.load_balanced_view()
        view.time_limit = time_limit
        view.map_sync(noop1, range(min(tasks, 3000)), chunksize=1)
        engines = rc[:].apply_sync(os.getpid)
        controller = cluster.controller_pid
        assert controller is not None
        out = []
        for _ in range(3):
            e0 = sum(map(cpu_seconds, engines))
            k0, c0, t0 = cpu_seconds(controller), time.process_time(), time.perf_counter()
            view.map_sync(noop1, range(tasks), chunksize=1)
            elapsed = time.perf_counter() - t0
            e1 = sum(map(cpu_seconds, engines))
            k1, c1 = cpu_seconds(controller), time.process_time()
            per_task = 1e6 / tasks
            out.append(
                (tasks / elapsed, (e1 - e0) * per_task, (k1 - k0) * per_task, (c1 - c0) * per_task)
            )
        return out
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,memory", help="task stores, in turn")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks a map")
    parser.add_argument("--rounds", type=int, default=3, help="clusters per store")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="every task's time_limit (s)"
    )
    args = parser.parse_args()
    stores = args.db.split(",")
    samples: dict[str, list[tuple[float, float, float, float]]] = {db: [] for db in stores}
    for r in range(args.rounds):
        for db in stores if r % 2 == 0 else stores[::-1]:
            samples[db].extend(one_round(db, args.tasks, args.time_limit))
            print(f"round {r + 1}: {db} done", file=sys.stderr)
    print("| store | tasks/s | engines us/task | controller us/task | client us/task |")
    print("|---|---|---|---|---|")
    for db, rows in samples.items():
        med = [statistics.median(row[i] for row in rows) for i in range(4)]
        print(f"| {db} | {med[0]:,.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:.0f} |")
    if len(stores) == 2:
        a, b = (statistics.median(row[0] for row in samples[db]) for db in stores)
        print(f"\n{stores[0]} / {stores[1]} rate: {a / b:.2f}x")


if __name__ == "__main__":
    main()
