"""Stand-in engines (``benchmarks/standins.py``) against a real controller.

The 1,000-engine benchmark registers lightweight stand-ins that speak the engine's side
of the protocol; this keeps them honest as the protocol changes: 50 of them, in a thread
of this process, register with a controller that has no engines of its own, take a
load-balanced map and an apply-to-all, stay alive on heartbeats, and leave when the
cluster stops.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kernel_engine import wire
from kernel_engine.controller.engines import FILES_KEPT_FREE, FILES_PER_ENGINE
from kernel_engine.errors import LaunchError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from standins import Fleet, tiny  # (benchmarks/ is not a package)

N = 50


def test_standins_register_serve_and_leave(cluster_factory):
    cluster = cluster_factory(n=0)
    rc = cluster.start_and_connect_sync()
    cluster_factory.pids.append(cluster.controller_pid)  # (the stand-ins are this process)
    fleet = Fleet(json.loads(cluster.connection_file.read_text()), N, "standin-test")
    stop = threading.Event()
    server = threading.Thread(target=fleet.serve, args=(stop,), name="standins", daemon=True)
    server.start()
    try:
        ids = fleet.register(timeout=30)
        assert len(set(ids)) == N
        rc.wait_for_engines(N, timeout=30)
        assert sorted(rc.ids) == sorted(ids)
        info = rc.engine_info(ids[0])
        assert info["hostname"] == "standin-test"

        results = rc.load_balanced_view().map(tiny, range(500), chunksize=1, block=False)
        done = results.get(timeout=30)  # (each stand-in answers [its id]; map flattens)
        assert len(done) == 500
        assert set(done) <= set(ids)
        assert len(set(done)) > N // 2  # spread over the stand-ins, not one of them

        everyone = rc[:].apply_async(tiny).get(timeout=30)
        assert sorted(r[0] for r in everyone) == sorted(ids)
        assert sum(s.applied for s in fleet.standins) == 500 + N

        t0 = time.monotonic()
        status = rc.queue_status()
        assert time.monotonic() - t0 < 2.0, "the controller answers slowly"
        assert {k for k in status if isinstance(k, int)} == set(ids)
        assert len(rc.ids) == N  # (no stand-in lost its heartbeat meanwhile)
    finally:
        cluster.stop_cluster_sync(timeout=20)
        server.join(10)
        stop.set()
        server.join(5)
        left = fleet.live
        fleet.close()
    assert not server.is_alive()
    assert left == 0, f"{left} stand-ins were not told to shut down"


def test_a_controller_out_of_files_refuses_registrations_whole_and_serves_on(cluster_factory):
    # (a limit on open files lower than its engines need: each registration beyond it is
    # refused with the limit named, leaves nothing half open, and the others serve)
    cluster = cluster_factory(n=0, db="memory")
    rc = cluster.start_and_connect_sync()
    pid = cluster.controller_pid
    cluster_factory.pids.append(pid)
    limit = len(os.listdir(f"/proc/{pid}/fd")) + FILES_KEPT_FREE + 4 * FILES_PER_ENGINE
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    fleet = Fleet(json.loads(cluster.connection_file.read_text()), 12, "standin-test")
    stop = threading.Event()
    server = threading.Thread(target=fleet.serve, args=(stop,), name="standins", daemon=True)
    server.start()
    try:
        with pytest.raises(RuntimeError, match=r"registration refused: .*ulimit -n"):
            fleet.register(timeout=30)
        ids, since, deadline = rc.ids, time.monotonic(), time.monotonic() + 20
        while time.monotonic() < min(since + 1.0, deadline):  # (until none joins for 1 s)
            time.sleep(0.1)
            if rc.ids != ids:
                ids, since = rc.ids, time.monotonic()
        assert 2 <= len(ids) < 12, ids
        assert sorted(r[0] for r in rc[:].apply_async(tiny).get(timeout=30)) == ids
        assert {k for k in rc.queue_status() if isinstance(k, int)} == set(ids)
        with pytest.raises(LaunchError, match=r"not started: .*ulimit -n"):
            cluster.start_engines_sync(1)
        assert rc.ids == ids
    finally:
        cluster.stop_cluster_sync(timeout=20)
        stop.set()
        server.join(10)
        fleet.close()
    assert not server.is_alive()


class _Forger(wire.Wire):
    """Reads messages with the cluster's key; signs what it sends with another."""

    def pack(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], list[Any]]:
        header, frames = super().pack(*args, **kwargs)
        at = frames.index(wire.DELIM)
        frames[at + 1] = wire.Wire(b"not the cluster's key").sign(frames[at + 2 : at + 6])
        return header, frames


def test_replies_not_signed_with_the_key_are_dropped_by_the_controller(cluster_factory):
    # (an engine's port taken over once the engine died: the controller's socket
    # reconnects to whatever holds it. Here a stand-in's replies go out signed with
    # another key: none reaches a record or a client, merged or whole; the others serve on)
    cluster = cluster_factory(n=0)
    rc = cluster.start_and_connect_sync()
    cluster_factory.pids.append(cluster.controller_pid)
    fleet = Fleet(json.loads(cluster.connection_file.read_text()), 3, "standin-test")
    stop = threading.Event()
    server = threading.Thread(target=fleet.serve, args=(stop,), name="standins", daemon=True)
    server.start()
    try:
        ids = fleet.register(timeout=30)
        rc.wait_for_engines(3, timeout=30)
        impostor = fleet.standins[0]
        impostor.wire = _Forger(fleet.key, session=impostor.uuid)
        forged = rc[impostor.engine_id].apply_async(tiny)
        both = rc.broadcast_view(targets=[impostor.engine_id, ids[1]]).apply_async(tiny)
        with pytest.raises(TimeoutError):
            forged.get(timeout=1.0)
        assert not both.ready()  # (the real part alone, never merged with the forged one)
        assert rc[ids[1]].apply_sync(tiny) == [ids[1]]  # (the others serve on)
        pending = {r["msg_id"] for r in rc.db_query({"completed": None}, keys=["msg_id"])}
        assert forged.msg_ids[0] in pending and both.msg_ids[0] in pending
        assert both.msg_ids[1] not in pending
    finally:
        cluster.stop_cluster_sync(timeout=20)
        server.join(10)
        stop.set()
        server.join(5)
        fleet.close()
    log = (cluster.folder / "controller.log").read_text()  # (drops are logged by the stop)
    assert f"reply from engine {impostor.engine_id}: invalid HMAC signature" in log
