#!/usr/bin/env python
"""Micro-benchmark of the SQLite task database (``kernel_engine.controller.sqlite_store``).

    .venv/bin/python benchmarks/store_bench.py [--records 1000000] [--rate 10000]
                                               [--seconds 3] [--dir /tmp]

Every task is two puts, as the controller makes them: its submission (client, type,
times, the request's frames: header, parent, metadata, content, the function pickled by
value (as a notebook's functions travel; the store keeps it once for all tasks) and the arguments
of a tiny ``apply_request``) and its completion (engine, times, the reply's frames, less
the parent header, which the controller does not store). Measured, on the calling thread
unless said otherwise:

- ``put alone``: the best of 5 ``timeit`` runs of 20,000 puts, the writer idle;
- ``paced``: ``--rate`` tasks a second for ``--seconds`` seconds, sleeping between
  bursts as an event loop would: the cost of each put (p50, p99, p99.9, max) while the
  writer works alongside;
- ``stream``: ``--records`` tasks as fast as one thread can put them (each completion
  1,000 tasks after its submission), with the default limits (1 GiB, 7 days): put cost,
  the time callers spent blocked by backpressure, the process's CPU a task (the puts
  and the writer together), records written a second (until ``flush`` returns), the
  database's size and the process's RSS before, at peak and after;
- ``reopen`` (``quick_check`` included) and a few reads on the final database;
- ``big``: ``--big`` tasks whose request (then, as many again, whose reply) carries one
  ``--big-mib`` MiB buffer, one every ``--big-pace`` seconds as pushes to an engine come:
  the process's CPU per task (the writer's, mostly) and how long the caller was blocked.

A baseline row times a function that takes the same keyword arguments and does nothing:
what the call alone costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import timeit
import uuid
from array import array
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_engine import serialize
from kernel_engine.controller.sqlite_store import SqliteLog

SESSION = str(uuid.uuid4())
CLIENT = str(uuid.uuid4())
ENGINE = str(uuid.uuid4())


def noop1(x: Any) -> Any:
    return x


noop1.__module__ = "__main__"  # (pickled by value, as a notebook's functions travel)


def request(msg_id: str, i: int) -> list[bytes]:
    """The frames of a tiny ``apply_request`` (``noop1(i)``), as a client sends them."""
    header = {
        "msg_id": msg_id,
        "msg_type": "apply_request",
        "username": "user",
        "session": SESSION,
        "date": "2026-05-01T12:00:00.000000Z",
        "version": "5.3",
    }
    metadata = {"after": [], "follow": [], "timeout": None, "targets": None, "retries": 0}
    parts = [json.dumps(p).encode() for p in (header, {}, metadata, {})]
    return parts + [bytes(b) for b in serialize.pack_apply(noop1, (i,), {})]


def reply(msg_id: str, parent: bytes, i: int) -> list[bytes]:
    """The frames of its ``apply_reply``."""
    header = {
        "msg_id": str(uuid.uuid4()),
        "msg_type": "apply_reply",
        "username": "user",
        "session": ENGINE,
        "date": "2026-05-01T12:00:00.001000Z",
        "version": "5.3",
    }
    metadata = {
        "engine_id": 1,
        "engine_uuid": ENGINE,
        "status": "ok",
        "started": "2026-05-01T12:00:00.000500Z",
        "completed": "2026-05-01T12:00:00.000900Z",
    }
    parts = [json.dumps(header).encode(), parent, json.dumps(metadata).encode()]
    parts.append(json.dumps({"status": "ok"}).encode())
    return parts + [bytes(b) for b in serialize.dumps(i)]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples the RSS every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss())


def pct(samples: array, p: float) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]) if ordered else 0.0


def row(name: str, samples: array) -> list[str]:
    return [
        name,
        f"{pct(samples, 50):,.0f}",
        f"{pct(samples, 99):,.0f}",
        f"{pct(samples, 99.9):,.0f}",
        f"{max(samples):,.0f}",
        f"{len(samples):,}",
    ]


def tasks(n: int) -> list[tuple[str, list[bytes], list[bytes]]]:
    """``n`` tasks' ids and frames, made before timing (random ids, few distinct bytes)."""
    one_request = request("x" * 32, 1)
    one_reply = reply("x" * 32, one_request[0], 1)
    out = []
    for _ in range(n):
        msg_id = uuid.uuid4().hex  # as kernel_engine.wire makes them: random
        req = [one_request[0].replace(b"x" * 32, msg_id.encode()), *one_request[1:]]
        out.append((msg_id, req, [one_reply[0], b"{}", *one_reply[2:]]))
    return out


def run_tasks(
    put: Callable[..., None],
    work: list[tuple[str, list[bytes], list[bytes]]],
    lag: int,
    every: int = 1,
    rate: float | None = None,
) -> tuple[array, array]:
    """Submit ``work``; complete task ``i - lag`` after submitting task ``i``; time every
    ``every``-th put (ns). With ``rate``, sleep to keep ``rate`` tasks a second."""
    clock = time.perf_counter_ns
    submits, completes = array("q"), array("q")
    start = time.monotonic()
    n = len(work)
    for i in range(n + lag):
        if rate is not None and i % 50 == 0:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        timed = i % every == 0
        if i < n:
            msg_id, req, _ = work[i]
            now = time.time()
            t0 = clock()
            put(
                msg_id,
                msg_type="apply_request",
                client_uuid=CLIENT,
                engine_id=None,
                label=None,
                status="pending",
                submitted=now,
                after=[],
                follow=[],
                request=req,
            )
            if timed:
                submits.append(clock() - t0)
        if i >= lag:
            msg_id, _, rep = work[i - lag]
            now = time.time()
            t0 = clock()
            put(
                msg_id,
                status="ok",
                engine_id=1,
                engine_uuid=ENGINE,
                started=now,
                completed=now,
                received=now,
                result=rep,
            )
            if timed:
                completes.append(clock() - t0)
    return submits, completes


def put_alone(path: str, task: tuple[str, list[bytes], list[bytes]]) -> list[str]:
    """Best-of-5 ns per put of a submission and of a completion, against a no-op call."""
    store = SqliteLog(path, batch_interval=3600.0, max_pending=10**7, max_pending_bytes=1 << 40)

    def nothing(msg_id: str, **fields: Any) -> None:
        pass

    names = {"CLIENT": CLIENT, "ENGINE": ENGINE, "req": task[1], "rep": task[2]}
    submission = (
        "{}('m', msg_type='apply_request', client_uuid=CLIENT, engine_id=None, label=None,"
        " status='pending', submitted=1.0, after=[], follow=[], request=req)"
    )
    completion = (
        "{}('m', status='ok', engine_id=1, engine_uuid=ENGINE, started=1.0, completed=1.0,"
        " received=1.0, result=rep)"
    )
    out = []
    for stmt in (submission, completion):
        best = [
            min(timeit.repeat(stmt.format("f"), globals={**names, "f": f}, number=20_000)) / 2e-5
            for f in (store.put, nothing)
        ]
        out.append(f"{best[0]:,.0f} / {best[1]:,.0f}")
    store.close()
    return out


def big_frames(path: str, n: int, mib: int, pace: float) -> tuple[float, float, float]:
    """(process CPU per task in ms, seconds the caller was blocked, seconds until all was
    committed after the last put) of ``n`` tasks with a ``mib`` MiB buffer each."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * mib)
    store = SqliteLog(path)
    cpu0 = time.process_time()
    for i in range(n):
        msg_id = str(uuid.uuid4())
        push = i < n // 2
        store.put(
            msg_id,
            msg_type="apply_request",
            client_uuid=CLIENT,
            status="pending",
            submitted=time.time(),
            request=[b"{}", b"{}", b"{}", b"{}", payload if push else b"x"],
        )
        store.put(
            msg_id,
            status="ok",
            completed=time.time(),
            result=[b"{}", b"{}", b"{}", b"{}", b"r" if push else payload],
        )
        time.sleep(pace)
    t0 = time.perf_counter()
    store.flush()
    tail = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    blocked = store.blocked_seconds
    store.close()
    return cpu / n * 1e3, blocked, tail


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="tasks streamed")
    parser.add_argument("--rate", type=float, default=10_000, help="tasks/s of the paced run")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the paced run")
    parser.add_argument("--dir", default=None, help="where the database files go")
    parser.add_argument("--big", type=int, default=16, help="tasks with a big buffer")
    parser.add_argument("--big-mib", type=int, default=64, help="MiB of each big buffer")
    parser.add_argument("--big-pace", type=float, default=0.06, help="seconds between them")
    args = parser.parse_args()
    for name, least in (("records", 1), ("rate", 1), ("seconds", 0.1), ("big", 0), ("big_mib", 1)):
        if not getattr(args, name) >= least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if not args.big_pace >= 0:  # (nan too)
        parser.error("--big-pace must not be negative")
    folder = tempfile.mkdtemp(prefix="px-store-bench-", dir=args.dir)
    MiB = 1 << 20
    try:
        paced_work = tasks(int(args.rate * args.seconds))
        sizes = [sum(map(len, paced_work[0][1])), sum(map(len, paced_work[0][2]))]
        print(f"request frames {sizes[0]} B, reply frames {sizes[1]} B", file=sys.stderr)

        def nothing(msg_id: str, **fields: Any) -> None:
            pass

        base_s, base_c = run_tasks(nothing, paced_work, lag=100, rate=args.rate)

        alone = put_alone(os.path.join(folder, "alone.db"), paced_work[0])

        store = SqliteLog(os.path.join(folder, "paced.db"))
        paced_s, paced_c = run_tasks(store.put, paced_work, lag=100, rate=args.rate)
        paced_blocked = store.blocked_seconds
        store.close()
        del paced_work

        print(f"making {args.records:,} tasks...", file=sys.stderr)
        work = tasks(args.records)
        path = os.path.join(folder, "tasks.db")
        rss_before = rss()
        peak = PeakRSS()
        peak.start()
        store = SqliteLog(path)
        start, cpu_start = time.perf_counter(), time.process_time()
        stream_s, stream_c = run_tasks(store.put, work, lag=1000, every=10)
        put_seconds = time.perf_counter() - start
        store.flush()
        elapsed = time.perf_counter() - start
        stream_cpu = time.process_time() - cpu_start
        peak.stop.set()
        peak.join()
        rss_after = rss()
        blocked = store.blocked_seconds
        size = store.size_bytes()
        count = store.count()
        store.close()
        del work

        t0 = time.perf_counter()
        store = SqliteLog(path)
        reopen = time.perf_counter() - t0
        last = store.history()[-1]
        t0 = time.perf_counter()
        for _ in range(100):
            store.get(last)
        get_ms = (time.perf_counter() - t0) * 10
        t0 = time.perf_counter()
        n_hist = len(store.history())
        hist_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_q = len(store.query({"completed": {"$gte": time.time() - 3600}}, ["status"], 1000))
        query_ms = (time.perf_counter() - t0) * 1000
        store.close()

        big_rows = []
        if args.big:
            big_path = os.path.join(folder, "big.db")
            big = big_frames(big_path, args.big, args.big_mib, args.big_pace)
            what = f"{args.big} tasks of {args.big_mib} MiB"
            big_rows = [
                [f"{what}: CPU per task, ms", f"{big[0]:.0f}"],
                [f"{what}: caller blocked, s", f"{big[1]:.2f}"],
                [f"{what}: committed after, s", f"{big[2]:.2f}"],
            ]

        head = ["put() on the caller's thread, ns", "p50", "p99", "p99.9", "max", "samples"]
        print(
            table(
                head,
                [
                    row("baseline: no-op call, submission", base_s),
                    row("baseline: no-op call, completion", base_c),
                    row(f"paced {args.rate:,.0f} tasks/s: submission", paced_s),
                    row(f"paced {args.rate:,.0f} tasks/s: completion", paced_c),
                    row("stream (1 in 10 timed): submission", stream_s),
                    row("stream (1 in 10 timed): completion", stream_c),
                ],
            )
        )
        print()
        print(
            table(
                ["stream of tiny tasks", "value"],
                [
                    ["put alone (writer idle): submission / no-op call, ns", alone[0]],
                    ["put alone (writer idle): completion / no-op call, ns", alone[1]],
                    ["paced run: callers blocked, s", f"{paced_blocked:.2f}"],
                    ["tasks (2 puts each)", f"{args.records:,}"],
                    ["putting took, s", f"{put_seconds:.1f}"],
                    ["callers blocked by backpressure, s", f"{blocked:.1f}"],
                    ["until all committed, s", f"{elapsed:.1f}"],
                    ["tasks written/s (sustained)", f"{args.records / elapsed:,.0f}"],
                    [
                        "CPU a task (the puts and the writer), us",
                        f"{stream_cpu / args.records * 1e6:.1f}",
                    ],
                    ["records kept (default retention)", f"{count:,}"],
                    ["database + WAL size, MiB", f"{size / MiB:,.1f}"],
                    ["bytes per kept record", f"{size / max(count, 1):,.0f}"],
                    ["RSS before opening, MiB", f"{rss_before / MiB:,.1f}"],
                    ["RSS peak while streaming, MiB", f"{peak.peak / MiB:,.1f}"],
                    ["RSS after flush, MiB", f"{rss_after / MiB:,.1f}"],
                    ["reopen (quick_check included), s", f"{reopen:.2f}"],
                    ["get(msg_id), ms", f"{get_ms:.2f}"],
                    [f"history() of {n_hist:,}, s", f"{hist_s:.2f}"],
                    [f"query completed in last hour, limit 1000 ({n_q}), ms", f"{query_ms:.1f}"],
                    *big_rows,
                ],
            )
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
