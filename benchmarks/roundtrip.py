#!/usr/bin/env python
"""A blocking call's round trip, with and without the calling thread reading its reply.

    .venv/bin/python benchmarks/roundtrip.py [--calls 5000] [--pairs 3] [--db sqlite]

Each pair runs two fresh 2-engine clusters, one after the other, in child processes: one
with ``JUPYTER_PX_HERE=1`` (the default: ``rc[0].apply_sync`` sends on a socket of the
calling thread's own and reads the reply there) and one with ``JUPYTER_PX_HERE=0`` (the
reply comes through the client's IO thread). Each times ``--calls`` calls of
``rc[0].apply_sync(noop)`` after a warm-up and prints p50/p90/p99 in ms, the client's and
the controller's CPU per call in us (from ``/proc``, every thread), and how the calls
slower than 1 ms are spaced: their median gap in ms (the client sends the controller its
notices of direct calls every 20 ms, and the controller's work on them is what slows
those calls on this 2-core machine). Linux only.

A second table says where the slowest calls lose their time: each call's three legs from
its metadata (``submitted`` to ``started``: the request's way to the engine's lane and its
reading there; ``started`` to ``completed``: the run; ``completed`` to ``received``: the
reply's way back), as medians over the fastest half of the calls and over the slowest 5%,
and the share of those slowest calls during which this process collected garbage
(``gc.callbacks``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from lb_cpu import cpu_seconds  # (benchmarks/ is this script's folder)


def noop() -> None:
    pass


def child(calls: int, db: str) -> dict[str, float]:
    import jupyter_ext as jx

    cluster = jx.Cluster(n=2, db=db)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=60)
        view = rc[0]
        for _ in range(500):
            view.apply_sync(noop)
        controller = cluster.controller_pid
        assert controller is not None
        k0, c0 = cpu_seconds(controller), cpu_seconds(os.getpid())
        starts, took, legs = [], [], []
        collections: list[float] = []  # (when this process began a collection)
        perf = time.perf_counter

        def collected(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                collections.append(perf())

        gc.callbacks.append(collected)
        try:
            for _ in range(calls):
                t0 = perf()
                view.apply_sync(noop)
                took.append(perf() - t0)
                starts.append(t0)
                legs.append(_legs(rc.metadata[rc.history[-1]]))
        finally:
            gc.callbacks.remove(collected)
        k1, c1 = cpu_seconds(controller), cpu_seconds(os.getpid())
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    q = statistics.quantiles(took, n=100)
    by_time = sorted(range(calls), key=took.__getitem__)
    fastest, slowest = by_time[: calls // 2], by_time[calls - max(1, calls // 20) :]
    leg_medians = {
        f"{leg}_{part}_ms": statistics.median(legs[i][k] for i in part_ids) * 1e3
        for k, leg in enumerate(LEGS)
        for part, part_ids in (("fast", fastest), ("slow", slowest))
    }
    with_gc = sum(
        1 for i in slowest if any(starts[i] <= t <= starts[i] + took[i] for t in collections)
    )
    slow = [t for t, d in zip(starts, took) if d > 1e-3]
    gaps = [b - a for a, b in itertools.pairwise(slow)]
    return {
        "p50": q[49] * 1e3,
        "p90": q[89] * 1e3,
        "p99": q[98] * 1e3,
        "client_us": (c1 - c0) / calls * 1e6,
        "controller_us": (k1 - k0) / calls * 1e6,
        "slow": len(slow),
        "gap_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
        **leg_medians,
        "slow_with_gc": with_gc / len(slowest),
    }


def _legs(md: dict[str, Any]) -> tuple[float, float, float]:
    """(submitted to started, started to completed, completed to received) in seconds."""
    submitted, started, completed, received = (
        md[k] for k in ("submitted", "started", "completed", "received")
    )
    return (
        (started - submitted).total_seconds(),
        (completed - started).total_seconds(),
        (received - completed).total_seconds(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--db", default="sqlite", choices=("sqlite", "memory"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.calls, args.db)))
        return
    rows: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
    for pair in range(args.pairs):
        for here in ("1", "0"):
            env = {**os.environ, "JUPYTER_PX_HERE": here}
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--calls", str(args.calls), "--db", args.db],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows[here].append(got)
            print(
                f"pair {pair + 1} JUPYTER_PX_HERE={here}: "
                + ", ".join(f"{k} {v:.3g}" for k, v in got.items()),
                flush=True,
            )
    print()
    print(
        "| JUPYTER_PX_HERE | p50 ms | p90 ms | p99 ms | client CPU us/call | "
        "controller CPU us/call | calls > 1 ms | their median gap ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    medians = {
        here: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for here, runs in rows.items()
    }
    for here, med in medians.items():
        print(
            f"| {here} | {med['p50']:.3f} | {med['p90']:.3f} | {med['p99']:.3f} | "
            f"{med['client_us']:.0f} | {med['controller_us']:.0f} | {med['slow']:.0f} | "
            f"{med['gap_ms']:.1f} |"
        )
    print()
    print(
        "| JUPYTER_PX_HERE | to the engine, ms: fastest half / slowest 5% | run, ms | "
        "back, ms | slowest 5% with a GC here |"
    )
    print("|---|---|---|---|---|")
    for here, med in medians.items():
        cells = [f"{med[f'{leg}_fast_ms']:.3f} / {med[f'{leg}_slow_ms']:.3f}" for leg in LEGS]
        print(f"| {here} | {' | '.join(cells)} | {med['slow_with_gc']:.0%} |")


LEGS = ("in", "run", "out")


if __name__ == "__main__":
    main()
