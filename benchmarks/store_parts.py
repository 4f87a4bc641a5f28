#!/usr/bin/env python
"""Where the SQLite task database's cost per tiny task goes, in one process, no cluster.

    .venv/bin/python benchmarks/store_parts.py [--tasks 1000] [--rounds 40] [--repeat 3]

The load-balanced rate with ``db="sqlite"`` is what issue 10 bounds (at most 10% below
``db="memory"``'s: ``benchmarks/lb_cpu.py``). On a 2-core machine that rate follows the
CPU every process spends a task, so this splits the store's share of it, each part timed
with ``time.thread_time`` on one thread (the CPU of that thread alone, so other load on
the machine moves the figures much less than it moves a rate):

- **hub, on the controller's loop thread**: ``Hub.submitted``, ``assigned`` and
  ``completed`` of ``--tasks`` tasks at a time, as the controller calls them for a
  load-balanced task (its request queued, then taken, then its reply), with each store:
  ``memory`` (no file) and ``sqlite`` (the puts queued for the writer; the queue is
  emptied between rounds, untimed);
- **writer**: what the writer thread does with those puts, on this thread (a store whose
  thread does not run): taking a batch of them from the queue (``take``), the Python of
  its write (``write, Python``: the rows' values, the frames packed), the multi-row
  upserts (``insert``) and the rest of the transaction (``commit``: BEGIN, COMMIT with its
  WAL frames and checkpoints).

Medians of ``--repeat`` runs, in us a task. The frames are those of ``store_bench.py``
(a tiny ``apply_request`` of a function pickled by value, and its reply).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from store_bench import reply, request  # (benchmarks/ is this script's folder)

from kernel_engine.controller.hub import Hub
from kernel_engine.controller.sqlite_store import SqliteLog

CLIENT = b"7466dd60ba2c2e9b-0000"
ENGINE_UUID = "cfed7b29-fa89e9bac3943f364014e1b6"
DATE = "2026-12-04T16:44:27.383106+00:00"


class Unthreaded(SqliteLog):
    """A store whose writer thread does nothing: its work is done by calling
    ``_take`` and ``_write`` on the caller's thread."""

    def _run(self) -> None:
        self._starting = False


def _frames(tasks: int, base: int) -> list[tuple[str, list[bytes], list[bytes]]]:
    """(msg_id, request frames, reply frames after the delimiter) of ``tasks`` tasks."""
    out = []
    for i in range(tasks):
        msg_id = f"{base:08x}{i:024x}"
        req = request(msg_id, i)
        rep = reply(msg_id, req[0], i)
        out.append((msg_id, req, [b"signature", *rep]))
    return out


def hub_costs(db: str, tasks: int, rounds: int, folder: str) -> dict[str, float]:
    """us a task of the hub's three calls, with the ``db`` store."""
    log = None
    if db == "sqlite":
        log = Unthreaded(os.path.join(folder, f"hub-{time.monotonic_ns()}.db"))
        log.max_pending = log.max_pending_bytes = 1 << 62  # (nothing takes the queue)
    hub = Hub(log=log, engine_uuid=lambda eid: ENGINE_UUID)
    spent = {"submitted": 0.0, "assigned": 0.0, "completed": 0.0}
    clock = time.thread_time
    try:
        for r in range(rounds):
            batch = _frames(tasks, r)
            t0 = clock()
            for msg_id, req, _ in batch:
                hub.submitted(msg_id, "apply_request", CLIENT, None, DATE, None, req)
            t1 = clock()
            for k, (msg_id, _, _) in enumerate(batch):
                hub.assigned(msg_id, k & 1)
            t2 = clock()
            for msg_id, _, rep in batch:
                hub.completed(msg_id, "ok", DATE, DATE, rep)
            t3 = clock()
            spent["submitted"] += t1 - t0
            spent["assigned"] += t2 - t1
            spent["completed"] += t3 - t2
            if log is not None:  # (what the writer would have taken)
                log._queue.clear()
                log._held.clear()
                log._held_bytes = 0
    finally:
        if log is not None:
            log._con.close()
    return {k: v / (tasks * rounds) * 1e6 for k, v in spent.items()}


def writer_costs(tasks: int, rounds: int, folder: str) -> dict[str, float]:
    """us a task of the writer's parts, for batches of ``tasks`` tasks."""
    log = Unthreaded(os.path.join(folder, f"writer-{time.monotonic_ns()}.db"))
    log._make_room(0, 0)
    spent = {"take": 0.0, "write, Python": 0.0, "insert": 0.0, "commit": 0.0}
    clock = time.thread_time
    inserting = [0.0]
    insert: Callable[..., Any] = log._insert

    def timed_insert(*args: Any) -> None:
        t = clock()
        try:
            insert(*args)
        finally:
            inserting[0] += clock() - t

    log._insert = timed_insert  # type: ignore[method-assign,assignment]
    con = log._con
    execute = con.execute
    committing = [0.0]

    class TimedConnection:
        """The writer's connection, timing its BEGIN and COMMIT."""

        def __getattr__(self, name: str) -> Any:
            return getattr(con, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql not in ("BEGIN", "COMMIT"):
                return execute(sql, *args)
            t = clock()
            try:
                return execute(sql, *args)
            finally:
                committing[0] += clock() - t

    log._con = TimedConnection()  # type: ignore[assignment]
    try:
        for r in range(rounds):
            now = time.time()
            for msg_id, req, rep in _frames(tasks, r):
                fields: dict[str, Any] = {"msg_type": "apply_request"}
                fields["client_uuid"] = CLIENT[:16].decode()
                fields.update(status="pending", submitted=now, request=req)
                log.put_made(msg_id, fields, queued=True)
                log.taken(msg_id, {"engine_id": 1})
                done: dict[str, Any] = {"engine_id": 1, "engine_uuid": ENGINE_UUID}
                done["status"] = "ok"
                done.update(started=now, completed=now, received=now, result=rep[1:])
                log.put_made(msg_id, done)
            t0 = clock()
            batch = log._take()
            t1 = clock()
            before = inserting[0] + committing[0]
            log._write(batch)
            t2 = clock()
            spent["take"] += t1 - t0
            spent["write, Python"] += (t2 - t1) - (inserting[0] + committing[0] - before)
        spent["insert"], spent["commit"] = inserting[0], committing[0]
    finally:
        log._con = con  # type: ignore[assignment]
        con.close()
    return {k: v / (tasks * rounds) * 1e6 for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks a round (a batch)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"memory": [], "sqlite": [], "writer": []}
    with tempfile.TemporaryDirectory(prefix="px-store-parts-") as folder:
        for _ in range(args.repeat):
            for db in ("memory", "sqlite"):
                runs[db].append(hub_costs(db, args.tasks, args.rounds, folder))
            runs["writer"].append(writer_costs(args.tasks, args.rounds, folder))
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    print("| hub, loop thread | submitted | assigned | completed | all, us a task |")
    print("|---|---|---|---|---|")
    for db in ("memory", "sqlite"):
        m = med[db]
        cells = " | ".join(f"{m[k]:.2f}" for k in ("submitted", "assigned", "completed"))
        print(f"| {db} | {cells} | {sum(m.values()):.2f} |")
    w = med["writer"]
    print()
    print(f"| writer | {' | '.join(w)} | all, us a task |")
    print("|---" * (len(w) + 2) + "|")
    print(f"| sqlite | {' | '.join(f'{v:.2f}' for v in w.values())} | {sum(w.values()):.2f} |")


if __name__ == "__main__":
    main()
