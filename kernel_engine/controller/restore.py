"""Restarting a controller on the folder of one that died: what it takes over, what it ends.

A controller started with ``restore=True`` (``--restore``) serves the cluster of one that
died (SIGKILL included) in the same folder:

- the folder's ``client.json`` gives it the dead one's key, ports, cluster id and, for an
  encrypted cluster, with ``controller-secret.json``, its CurveZMQ keypair, so every
  client's sockets reconnect by themselves (:func:`previous_connection`, :func:`keypair`);
- ``cluster.json`` gives the options it ran with (:func:`saved_options`) and its engines:
  each whose process still runs (checked to be that engine, not a reuse of its PID) and
  whose connection file is there is adopted, with its id (:class:`Restorer`);
- the task store's pending records, the tasks in flight when it died, are ended: with the
  reply an adopted engine kept for the dead controller (it sends those right before its
  setup reply, and the router records them), else with an ``EngineError`` saying the
  controller restarted. A load-balanced task's engine is written with its outcome only,
  so a pending one may be on any adopted engine: it waits for every adoption to end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from kernel_engine import clusters, protocol, wire
from kernel_engine.errors import ClusterError

from .engines import EngineSet
from .hub import Hub, TaskRecord

log = logging.getLogger("kernel_engine.controller")

RESTARTED = "the controller restarted while this task was in flight"
"""How a record a dead controller left pending ends, when no reply was kept for it."""

NOTICE_GRACE = 3.0
"""Seconds a record left pending on an engine that was adopted waits before it is ended
with an error. A request a client sent to the engine's lane directly was answered to
the client, which tells the controller in its next notice of direct requests (up to
0.25 s late, and only once its socket has reconnected to this controller): the notice
then ends the record with its true outcome."""

Outcome = Callable[[str, int | None, bool], None]


class Restorer:
    """The engines a restarted controller adopts, and the records the dead one left.

    Parameters
    ----------
    folder
        The cluster folder.
    wire
        Signs the error replies stored for records ended here.
    engines, hub
        The engine set (which adopts) and the task records.
    outcome
        Tells load balancing how a record ended (its dependents may run).
    call_later
        ``call_later(delay, callback)``: a timer on the controller's loop (for
        :data:`NOTICE_GRACE`; None: records are ended at once).
    """

    def __init__(
        self,
        folder: Path,
        wire: wire.Wire,
        engines: EngineSet,
        hub: Hub,
        outcome: Outcome,
        call_later: Callable[[float, Callable[[], None]], None] | None = None,
    ):
        self.folder = folder
        self.wire = wire
        self.engines = engines
        self.hub = hub
        self.outcome = outcome
        self.call_later = call_later
        self.adopting: set[int] = set()
        # records left pending, by the engine they were on (None: not known)
        self._pending: dict[int | None, list[tuple[TaskRecord, dict[str, Any]]]] = {}

    def start(self) -> None:
        """Adopt the engines still running; end the records whose engine did not survive
        (the others as their engine's adoption ends)."""
        listed = clusters.engine_records(self.folder)
        self.engines.skip_ids(list(listed))
        unreached: dict[int, str] = {}
        for eid, entry in sorted(listed.items()):
            started = entry.get("pid_started")
            started = started if isinstance(started, str) else None
            pid = int(entry["pid"])
            info = clusters.read_json(self.folder / f"engine-{eid}.json")
            if not clusters.is_engine(pid, self.folder, eid, started):
                log.info("engine %i (pid %i) did not outlive the last controller", eid, pid)
                clusters.remove_dead_engine_files(self.folder, eid, info)
            elif info is None or info.get("key") != self.wire.key.decode():
                log.warning("engine %i (pid %i): no usable connection file; left alone", eid, pid)
            elif self.engines.adopt(eid, info, pid, started) is None:
                unreached[eid] = f"engine {eid} could not be reached (see the log)"
            else:
                self.adopting.add(eid)
        for record, header in self.hub.restore():
            on = record.engine_id
            if on is None or on in self.adopting:
                self._pending.setdefault(on, []).append((record, header))
            else:
                self._fail(record, header, unreached.get(on, f"engine {on} did not outlive it"))
        self._end(None)
        log.info("restored the cluster; adopting engines %s", sorted(self.adopting))

    def engine_back(self, eid: int) -> None:
        """Engine ``eid`` is set up: the replies it kept came before its setup reply, so
        what it held and is still pending got none."""
        if eid in self.adopting:
            self.adopting.discard(eid)
            self._end(eid, grace=NOTICE_GRACE)

    def engine_lost(self, eid: int, why: str) -> None:
        """Engine ``eid`` died (or refused) before it was adopted."""
        if eid in self.adopting:
            self.adopting.discard(eid)
            self._end(eid, why)

    def _end(
        self, eid: int | None, why: str = "no engine kept a reply for it", grace: float = 0.0
    ) -> None:
        """End the records left pending on engine ``eid`` (after ``grace`` seconds, unless
        a client's notice ends them first); those of no known engine once no engine is
        left to adopt."""
        ended = self._pending.pop(eid, []) if eid is not None else []
        if ended and grace and self.call_later is not None:
            self.call_later(grace, lambda: self._fail_all(ended, why))
            ended = []
        if not self.adopting:
            ended += self._pending.pop(None, [])
        self._fail_all(ended, why)

    def _fail_all(self, ended: list[tuple[TaskRecord, dict[str, Any]]], why: str) -> None:
        for record, header in ended:
            if self.hub.is_restored(record.msg_id):
                self._fail(record, header, why)

    def _fail(self, record: TaskRecord, header: dict[str, Any], why: str) -> None:
        frames = protocol.fail_reply(
            self.wire,
            record.client,
            header,
            record.engine_id,
            "EngineError",
            f"{RESTARTED} ({why})",
        )
        self.hub.completed(record.msg_id, "error", frames=frames[3:])  # (from the signature on)
        self.outcome(record.msg_id, record.engine_id, False)


def previous_connection(folder: Path) -> dict[str, Any]:
    """The connection file a dead controller left in ``folder`` ({} if none: the restored
    cluster then gets a new key and ports).

    Raises
    ------
    ClusterError
        When the folder's controller still runs.
    """
    state = clusters.read_cluster(folder)
    if state.running and state.controller_pid != os.getpid():
        raise ClusterError(
            f"cannot restore cluster {state.cluster_id}: its controller still runs "
            f"(pid {state.controller_pid})"
        )
    previous = clusters.read_json(folder / clusters.CLIENT_FILE) or {}
    if not previous:
        log.warning(
            "no %s in %s: the restored cluster gets a new key", clusters.CLIENT_FILE, folder
        )
    return previous


def port(previous: dict[str, Any], name: str) -> int:
    """The ``<name>_port`` of the previous connection file (0: any)."""
    value = previous.get(f"{name}_port")
    return value if isinstance(value, int) and 0 < value < 65536 else 0


def keypair(folder: Path, previous: dict[str, Any]) -> tuple[bytes, bytes]:
    """The CurveZMQ keypair: the dead controller's when restoring (clients know its public
    key), else a new one.

    Raises
    ------
    ClusterError
        When the dead controller's secret key is not in the folder.
    """
    if not previous.get("curve_serverkey"):
        return zmq.curve_keypair()
    saved = clusters.read_json(folder / clusters.CONTROLLER_SECRET_FILE) or {}
    if saved.get("curve_publickey") != previous["curve_serverkey"]:
        raise ClusterError(
            f"cannot restore the encrypted cluster in {folder}: its controller's secret key "
            f"({clusters.CONTROLLER_SECRET_FILE}) is missing"
        )
    return saved["curve_publickey"].encode(), str(saved["curve_secretkey"]).encode()


def save_keypair(folder: Path, pair: tuple[bytes, bytes]) -> None:
    """Keep an encrypted cluster's controller keypair in its folder (mode 0600), for a
    controller restarted there (:func:`keypair`)."""
    public, secret = pair
    clusters.write_private_json(
        folder / clusters.CONTROLLER_SECRET_FILE,
        {"curve_publickey": public.decode(), "curve_secretkey": secret.decode()},
    )


def saved_options(folder: Path) -> dict[str, Any]:
    """The options the folder's last controller ran with (``cluster.json``), for a
    restarted one."""
    info = clusters.read_json(folder / clusters.CLUSTER_FILE) or {}
    options = info.get("options")
    return dict(options) if isinstance(options, dict) else {}
