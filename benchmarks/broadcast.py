"""What one call to every engine costs the client: one broadcast message against N sends.

For N = 2, 8 and 32 real engines (one cluster each), times ``bview.apply_sync(noop)`` and
``bview.push({'a': small})`` on ``rc.broadcast_view()`` two ways:

- **per engine**: one ``apply_request`` per engine, sent by the client itself (straight
  to each engine's task lane, as every DirectView did before broadcasts, and as a
  BroadcastView did too);
- **broadcast**: one message to the controller, which sends it on to each engine
  (``kernel_engine.controller.broadcast``).

For each, the wall time per call, the client's CPU time per call (this process: the
calling thread and the client's IO thread, which receives the N replies) and the
controller's, as medians of ``--repeat`` runs of ``--calls`` calls each (the two ways
taking turns), and the messages the client receives per call (a batch counts as one;
counted in ``--calls`` more calls, untimed), printed as a Markdown table: per engine →
broadcast (ratio). Per engine, each engine's reply comes back as a message of its own;
a broadcast's replies come back together (``kernel_engine.controller.fanin``). Either way
the client checks, reads and resolves each of the N replies::

    .venv/bin/python benchmarks/broadcast.py [--engines 2,8,32] [--calls 50] [--repeat 5]
        [--ways broadcast] [--big]

``--ways broadcast`` times the broadcast alone (no per engine column); ``--big`` adds
``push`` of one 1 MiB numpy array, by the BroadcastView and by ``rc[:]`` (a DirectView,
which sends as it chooses: its row has the same figure in both columns). The row
``rc[0].apply_sync(noop)`` is a control: one engine's request, the same work at every N
(both columns alike), whose cost still grows with N on a machine that N engines share
with the client. A second table gives the client's CPU per extra engine: the
least-squares slope of the client CPU per call over N, in us per engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import psutil

import jupyter_ext as jx

TIMEOUT = 60.0


def noop() -> None:
    return None


MODES = {"per engine": None, "broadcast": 2}
"""The two ways, as the view's ``fan_out_from``."""


def _time(view: Any, call: Any, calls: int, controller: psutil.Process) -> tuple[float, ...]:
    """(wall, client CPU, controller CPU) per call of one run of ``calls``, in ms."""
    c0 = controller.cpu_times()
    w0, p0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call(view).get(TIMEOUT)
    wall, cpu = time.perf_counter() - w0, time.process_time() - p0
    c1 = controller.cpu_times()
    ctl = (c1.user + c1.system) - (c0.user + c0.system)
    return wall / calls * 1e3, cpu / calls * 1e3, ctl / calls * 1e3


def _messages(view: Any, call: Any, calls: int) -> float:
    """Messages the client's IO thread received per call, over ``calls`` calls: each batch
    message once, each reply that came alone once (counted by wrapping the IO thread's
    handlers, which costs a little: these calls are not timed)."""
    io = view.client.transport.io
    count = {"alone": 0, "batches": 0, "in_batch": False}
    on_reply, batch = io.on_reply, io._batch

    def counting_reply(frames: Any) -> None:
        count["alone"] += not count["in_batch"]
        on_reply(frames)

    def counting_batch(handler: Any, frames: Any) -> None:
        count["batches"] += 1
        count["in_batch"] = True
        try:
            batch(handler, frames)
        finally:
            count["in_batch"] = False

    io.on_reply, io._batch = counting_reply, counting_batch
    try:
        for _ in range(calls):
            call(view).get(TIMEOUT)
    finally:
        io.on_reply, io._batch = on_reply, batch
    return (count["alone"] + count["batches"]) / calls


def _big() -> Any:
    import numpy

    return numpy.ones(1 << 17)  # 1 MiB of float64


WORKLOADS = {
    "bview.apply_sync(noop)": lambda v: v.apply_async(noop),
    "bview.push({'a': small})": lambda v: v.push({"a": list(range(10))}, block=False),
    "rc[0].apply_sync(noop)": lambda v: v.apply_async(noop),
}

CONTROL = "rc[0].apply_sync(noop)"
"""One engine's request, the same work at every N: how much more a call costs the client on
a machine busy with N engines (its caches shared with them), whatever it sends."""

BIG_WORKLOADS = {
    "bview.push({'a': 1 MiB array})": lambda v: v.push({"a": _big()}, block=False),
    "dview.push({'a': 1 MiB array})": lambda v: v.push({"a": _big()}, block=False),
}

Row = tuple[str, int, str, float, float, float, float]


def run(n: int, calls: int, repeat: int, modes: dict[str, Any], big: bool) -> list[Row]:
    """The rows of one cluster of ``n`` engines; the ways take turns, run by run, so
    that a busy moment of the machine hits each."""
    rows = []
    t0 = time.perf_counter()
    workloads = {**WORKLOADS, **(BIG_WORKLOADS if big else {})}
    with jx.Cluster(n=n) as rc:
        rc.wait_for_engines(n, timeout=120)
        print(f"N={n}: started in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        controller = psutil.Process(rc.cluster.controller_pid)
        for name, call in workloads.items():
            view = (
                rc.broadcast_view()
                if name.startswith("bview")
                else rc[rc.ids[0]]
                if name == CONTROL
                else rc[:]
            )
            default = view.fan_out_from
            ways = modes if name.startswith("bview") else dict.fromkeys(modes, default)
            samples: dict[str, list[tuple[float, ...]]] = {mode: [] for mode in ways}
            for _ in range(repeat):
                for mode, fan_out_from in ways.items():
                    view.fan_out_from = fan_out_from
                    for _ in range(3):  # (warm up: lanes pinged, functions cached)
                        call(view).get(TIMEOUT)
                    samples[mode].append(_time(view, call, calls, controller))
            for mode, got in samples.items():
                view.fan_out_from = ways[mode]
                messages = _messages(view, call, calls)
                wall, cpu, ctl = (statistics.median(x) for x in zip(*got))
                rows.append((name, n, mode, wall, cpu, ctl, messages))
                print(
                    f"  {name} {mode}: {wall:.2f} ms, cpu {cpu:.2f} / {ctl:.2f}, "
                    f"{messages:.2f} messages",
                    file=sys.stderr,
                )
    return rows


def table(rows: list[Row]) -> str:
    """Per call, in ms: per engine → broadcast (ratio), or the broadcast alone."""
    out = [
        "| call | N | wall ms | client CPU ms | controller CPU ms | client messages |",
        "|---|---|---|---|---|---|",
    ]
    by = {(name, n, mode): figures for name, n, mode, *figures in rows}
    for name, n in dict.fromkeys((name, n) for name, n, *_ in rows):
        after = by[name, n, "broadcast"]
        before = by.get((name, n, "per engine"))
        if before is None:
            cells = [f"{a:.2f}" for a in after]
        else:
            cells = [
                f"{b:.2f} → {a:.2f} ({a / b:.2f}x)" if b else f"{b:.2f} → {a:.2f}"
                for b, a in zip(before, after)
            ]
        out.append(f"| `{name}` | {n} | {' | '.join(cells)} |")
    return "\n".join(out)


def slopes(rows: list[Row]) -> str:
    """The client's CPU per extra engine (us), the least-squares slope over N, per way."""
    out = ["| call | way | client CPU us per extra engine |", "|---|---|---|"]
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name, n, mode, _wall, cpu, *_ in rows:
        points.setdefault((name, mode), []).append((n, cpu))
    for (name, mode), got in points.items():
        if len({n for n, _ in got}) < 2:
            continue
        slope = statistics.linear_regression([n for n, _ in got], [c for _, c in got]).slope
        out.append(f"| `{name}` | {mode} | {slope * 1e3:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="2,8,32", help="engine counts, comma-separated")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure")
    parser.add_argument(
        "--ways", choices=("both", "broadcast"), default="both", help="the ways to time"
    )
    parser.add_argument("--big", action="store_true", help="also push a 1 MiB array")
    args = parser.parse_args()
    modes = MODES if args.ways == "both" else {"broadcast": MODES["broadcast"]}
    rows: list[Row] = []
    for n in (int(x) for x in args.engines.split(",")):
        rows += run(n, args.calls, args.repeat, modes, args.big)
    print(table(rows))
    print()
    print(slopes(rows))


if __name__ == "__main__":
    main()
