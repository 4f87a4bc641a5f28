"""The transport: one client's connection to its cluster.

:class:`Transport` owns everything that moves a request: the IO thread and its sockets
(:mod:`._io`), the direct lanes (:mod:`._lanes`) and the table of live requests
(:mod:`._request`), plus what a client keeps of finished work (``results``,
``metadata``, ``history``, all bounded). ``Client`` is a facade over it, and this is the
interface views and AsyncResults use (and nothing else of the client's):

- :meth:`submit` sends a request on its path and returns its :class:`~._request.Request`;
- :meth:`ask` / :meth:`tell` send a request to the controller itself (and wait / not);
- :meth:`targets` turns a view's ``targets`` into engine ids;
- :meth:`post` sends a message no kernel answers (a frontend's comm message for a widget
  on an engine), recording nothing;
- :meth:`interrupt`, :meth:`abort`, :meth:`fetch_records`, :meth:`wait`,
  :meth:`add_iopub_handler` / :meth:`remove_iopub_handler` (and the hooks
  :mod:`._widgets` uses: :meth:`add_submit_hook`, :meth:`add_engine_gone_handler`);
- :meth:`status`, :meth:`add_status_handler` / :meth:`remove_status_handler`: the
  controller's status stream, subscribed to only while a handler wants it.

Whatever says an engine is gone (the controller's event, a shutdown's reply, the lanes'
own check of the engine's process, a lane that closed under a send) comes to one place,
:meth:`fail_engine`; whatever says the controller is gone, to :meth:`_controller_lost`.
When it answers again (after a pause, or restarted on the cluster folder with the same key
and ports), :meth:`_back` takes requests again and learns the engines anew.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import math
import operator
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import zmq

from kernel_engine import clusters, processes, protocol, replies, serialize, shm, wire
from kernel_engine.engine.datapub import DATA_MESSAGE
from kernel_engine.errors import (
    REMOTE_ERROR_CLASSES,
    ClusterError,
    EngineError,
    InvalidTarget,
    LaunchError,
    NoEnginesRegistered,
    RemoteError,
)

from ._batch import SubmitBatch
from ._bounded import BoundedDict, History
from ._interrupts import deferred_interrupts
from ._io import IOThread
from ._lanes import HereSocket
from ._metadata import ExecuteReply, Metadata
from ._request import LANE_PATHS, Refused, Request, Requests, settle_all

log = logging.getLogger("jupyter_ext")

BACK_WAIT = 3.0
"""Seconds a request waits, when the controller was lost and a new one runs in its place,
for this client to reconnect to it (instead of failing at once)."""

MAX_RESULT_BYTES = 256 * 2**20
"""Bytes of results a client keeps in ``results`` by default (see :class:`Transport`):
before, pulling a 512 MiB array ten times kept ten of them, and every pull after the first
ran at a quarter of the speed, its pages fresh from a process that kept growing."""

_OK = {"status": "ok"}
"""The content of an apply reply whose result is in its buffers."""

WEIGHED_FROM = 4096
"""Results smaller than this (bytes received) are not weighed against ``max_result_bytes``:
``max_results`` of them are small, and weighing each would cost a tiny task's reply."""

IopubHandler = Callable[[int, wire.Message], None]
StatusHandler = Callable[[dict[str, Any]], None]
SubmitHook = Callable[[str], None]
EngineGoneHandler = Callable[[int], None]


CONNECT = protocol.ConnectRequest(reads=(protocol.MERGED_REPLIES,))
"""What a client says when it connects: it reads replies merged (:mod:`kernel_engine.replies`)."""

CONNECT_RETRY_S = 0.2
"""Seconds after which a client's first request, unanswered, is sent again (then twice as
long each time, up to :data:`CONNECT_RETRY_MAX_S`): see :meth:`Transport._connect`."""
CONNECT_RETRY_MAX_S = 2.0
CONNECT_COPIES = 4
"""Copies of a client's first request it waits on at most (the oldest is forgotten)."""

HERE_POLL_MS = 50
"""Milliseconds between a blocking call's looks, while it waits on its own socket, at
whether its request ended another way (its engine lost, the client closed)."""

INTERRUPT_GRACE = 5.0
"""Seconds a blocking call that Ctrl-C stopped waits for the engines it interrupted."""


class Transport:
    """A connection to a cluster: sockets, requests, and what came back.

    Parameters
    ----------
    connection_file
        The cluster's ``client.json`` (or a cluster id); by default the newest running
        cluster's.
    timeout
        Seconds to wait for the controller to answer the first request.
    max_results
        How many finished tasks' results and metadata (and msg_ids in ``history``) are
        kept; the oldest go first (AsyncResults keep their own), so memory stays bounded.
    max_result_bytes
        Bytes of results kept (as received; results under :data:`WEIGHED_FROM` bytes
        weigh nothing), the oldest weighed ones going first but never the newest: a
        result dropped here is still its AsyncResult's; ``get_result`` then asks the
        controller, whose store keeps results within its own limits (big ones in the
        SQLite store's files; none over 1 MiB in the in-memory store). None: no byte
        bound (``max_results`` alone).
    """

    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        timeout: float | None = 10.0,
        max_results: int = 10_000,
        max_result_bytes: int | None = MAX_RESULT_BYTES,
    ):
        if connection_file is not None and not isinstance(connection_file, (str, os.PathLike)):
            raise TypeError(
                "connection_file must be a path, a cluster id or None, not "
                f"{type(connection_file).__name__} ({connection_file!r:.40})"
            )
        protocol.check_seconds("timeout", timeout)
        protocol.check_int("max_results", max_results, 1, 2**40)
        if max_result_bytes is not None:
            protocol.check_int("max_result_bytes", max_result_bytes, 0, 2**62)
        path = clusters.find_connection_file(connection_file)
        self.connection_file = str(path)
        self.info: dict[str, Any] = clusters.read_connection_file(path, "ip")
        self.cluster_id: str = self.info.get("cluster_id", "")
        self.wire = wire.Wire(self.info["key"].encode(), username="client")
        self.requests = Requests(self._path_of)
        self.results: BoundedDict[str, Any] = BoundedDict(max_results, max_result_bytes)
        self.metadata: BoundedDict[str, Metadata] = BoundedDict(max_results)
        self.history: History[str] = History(max_results)
        self.engines: dict[int, dict[str, Any]] = {}
        self.dead: dict[int, str] = {}
        self._maps: dict[tuple[int, Any], bool] = {}  # (engine id, pid): see maps_results
        self._iopub_handlers: list[IopubHandler] = []
        self._submit_hooks: list[SubmitHook] = []
        self._engine_gone_handlers: list[EngineGoneHandler] = []
        self._status_handlers: list[StatusHandler] = []
        self._status_subscribed = False  # (IO thread)
        # direct requests failed when the controller was lost, whose end it never heard of
        self._unreported: BoundedDict[str, int] = BoundedDict(max_results)
        # broadcasts sent lately -> their parts' msg_ids (should the controller refuse one)
        self._broadcasts: BoundedDict[str, tuple[str, ...]] = BoundedDict(1024)
        # engines registered since the controller came back (IO thread)
        self._registered: set[int] = set()
        self._told_no_engines = False  # (warned that tasks wait with every engine gone)
        self._asked_no_engines = False  # (asked the controller before saying so)
        # rejoining a controller that answers again: probes sent, their replies, welcomes
        self._probes: dict[str, dict[str, Any] | None] = {}
        self._welcomes: set[str] = set()
        self._probe_sent = 0.0
        self.closed = False
        self.pid = _PROCESS[0]
        """The process this client was connected in (see :meth:`_check_process`)."""
        self._welcomed = threading.Event()
        self._loading = threading.local()  # (see _read_here, check_blocking)
        self.io = IOThread(
            self.info,
            self.wire,
            self._on_reply,
            self._on_iopub,
            self._controller_lost,
            self._answering,
            self.connection_file,
        )
        self.io.on_replies = self._on_replies
        self.io.on_tick = self._tick
        try:
            try:
                reply = self._connect(timeout)
            except (TimeoutError, EngineError) as exc:
                within = "in time" if timeout is None else f"within {timeout} s"
                raise TimeoutError(
                    f"the controller at {self.io.address} did not answer {within} "
                    f"(connection file {self.connection_file}): {exc}"
                ) from None
            self._take_engines(reply)
            self._await_iopub(timeout)
        except BaseException:
            # (a refusal, a malformed reply, a Ctrl-C: no IO thread is left running)
            self.close()
            raise

    def _connect(self, timeout: float | None) -> dict[str, Any]:
        """The content of the controller's first reply to this client.

        Requests leave from our sending socket and replies come to our receiving one, each
        connected by zmq on its own schedule: should the first request reach the
        controller before the receiving socket's connection is complete, the reply finds
        no peer and is lost (seen in CI: a client of a just-started cluster waited its 10 s
        out). So the request goes again, at doubling intervals, until one is answered; a
        connect request can be repeated (see :meth:`_await_iopub`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        answered = threading.Event()
        first: list[Any] = []  # (the copy answered first)
        sent: list[Request] = []
        interval = CONNECT_RETRY_S

        def done(request: Any) -> None:
            first.append(request)
            answered.set()

        try:
            while True:
                request = self.tell(protocol.CONNECT_REQUEST, CONNECT)
                request.add_done_callback(done)
                sent.append(request)
                if len(sent) > CONNECT_COPIES:  # (waiting for ever: the oldest go)
                    self.requests.drop([sent.pop(0).msg_id])
                wait = interval if deadline is None else min(interval, deadline - time.monotonic())
                if answered.wait(max(wait, 0)):
                    if not self._back_in_time(first[0], deadline):
                        break
                    answered.clear()  # (the controller was silent a while: ask it again)
                    first.clear()
                    interval = CONNECT_RETRY_S
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the controller did not answer {protocol.CONNECT_REQUEST} in {timeout} s"
                    )
                interval = min(interval * 2, CONNECT_RETRY_MAX_S)
            reply: dict[str, Any] = first[0].result()
        finally:
            self.requests.drop(r.msg_id for r in sent if not r.done())
        if reply.get("status") == "error":
            raise _hub_error(reply)
        return reply

    def _back_in_time(self, answer: Request, deadline: float | None) -> bool:
        """Whether a connect request that failed because the controller fell silent (its
        heartbeat unanswered: paused or out of reach, not known dead) is to go again: the
        controller answered again before ``deadline`` (None: waiting for ever). A silence
        shorter than the time the caller gave is not a failure to answer in that time."""
        if not isinstance(answer.exception(), EngineError) or not self.io.lost_by_heartbeat:
            return False
        # (a while at a time: a controller known gone meanwhile, killed while paused, is
        # not waited for, for ever when the caller gave no timeout)
        while True:
            if not self._heartbeat_listens():
                return False  # (nobody there: a wrong port, a controller that stopped)
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            if self.io.wait_back(min(left, 2.0)):
                return True
            if not self.io.lost_by_heartbeat:
                return not self.io.lost

    def _heartbeat_listens(self) -> bool:
        """Whether the controller's heartbeat address takes TCP connections: a paused
        controller's does (its system accepts them for it), a wrong port or a controller
        that is gone refuses them. No answer at all (out of reach) counts as taking them."""
        if self.info.get("transport", "tcp") != "tcp":
            return True
        try:
            address = (self.info["ip"], int(self.info["hb_port"]))
            with socket.create_connection(address, timeout=1.0):
                return True
        except ConnectionRefusedError:
            return False
        except (OSError, KeyError, TypeError, ValueError):
            return True

    def _await_iopub(self, timeout: float | None) -> None:
        """Return once this client's iopub subscription receives (so no output is missed).

        A zmq subscription takes effect a little after connecting; until then the engines'
        output and status messages would be dropped. Each connect request makes the
        controller publish a welcome; we repeat it until one arrives.
        """
        deadline = time.monotonic() + (timeout or 10.0)
        while not self._welcomed.wait(0.05):
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("no message from the controller's iopub socket")
            self.tell(protocol.CONNECT_REQUEST, CONNECT)

    def _take_engines(self, reply: dict[str, Any]) -> None:
        """The engines a connect reply lists (any thread; lanes set up on the IO thread)."""
        infos = [
            protocol.EngineInfo.from_content(i).to_content() for i in reply["engines"].values()
        ]
        for info in infos:
            self.engines[info["id"]] = info
        if infos:
            self._told_no_engines = False  # (engines again: say it anew when all go)
        lanes = self.io.lanes
        if lanes is not None:
            self.io.call_soon(lambda: lanes.add_engines(infos))

    # ----- engines

    @property
    def ids(self) -> list[int]:
        """The ids of the engines that are ready, sorted."""
        return sorted(self.engines)

    def engine_info(self, engine_id: int) -> dict[str, Any]:
        """``pid``, ``hostname``, ``uuid`` and ``connection_info`` (with the key) of one
        engine."""
        try:
            info = dict(self.engines[engine_id])
        except KeyError:
            raise InvalidTarget(f"no engine with id {engine_id}; ids are {self.ids}") from None
        conn = dict(info["connection_info"])
        conn["key"] = self.wire.key.decode()
        info["connection_info"] = conn
        return info

    def targets(self, targets: Any) -> list[int]:
        """Engine ids for a view's ``targets``: None/'all', an id (a negative one counts
        from the last engine, as IPython Parallel's), a slice, or ids."""
        if type(targets) is int and targets in self.engines:  # (``rc[0]``: every call)
            return [targets]
        ids = self.ids
        if targets is None or (isinstance(targets, str) and targets == "all"):
            if not ids:
                raise NoEnginesRegistered("the cluster has no engines")
            return ids
        if isinstance(targets, slice):
            return ids[targets]
        one = engine_id_of(targets)
        if one is not None:
            if one < 0 and -len(ids) <= one:  # (as IPython Parallel's: from the last)
                one = ids[one]
            targets = [one]
        # (a mapping would name its keys: {0: 1} stopped engine 0 in a shutdown)
        if isinstance(targets, (str, bytes, Mapping)) or not isinstance(targets, Iterable):
            raise TypeError(f"targets must be an engine id, ids, a slice or 'all', not {targets!r}")
        out = []
        for given in targets:
            t = engine_id_of(given)
            if t is not None and t in self.dead and t not in self.engines:
                raise EngineError("EngineError", self.dead[t], None, {"engine_id": t})
            if t is None or t not in self.engines:
                raise InvalidTarget(f"no engine with id {given!r}; ids are {ids}")
            out.append(t)
        return out

    def wait_for_engines(self, n: int, timeout: float | None = 60.0) -> None:
        """Wait until at least ``n`` engines are ready; RuntimeError once the client is
        closed (no engine can register with it then), or on its IO thread (which alone
        takes registrations in)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(self.engines) < n:
            self.check_blocking("wait_for_engines")
        while len(self.engines) < n:
            if self.closed:
                raise RuntimeError(
                    f"this Client is closed: {len(self.engines)} of {n} engines ready"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.engines)} of {n} engines ready after {timeout} s")
            time.sleep(0.02)

    def wait_for_engines_ready(self, ids: Sequence[int], timeout: float | None = 60.0) -> None:
        """Wait until engines ``ids`` are ready; raise ClusterError if one dies starting
        (RuntimeError as :meth:`wait_for_engines`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not all(i in self.engines for i in ids):
            self.check_blocking("waiting for engines")
        while True:
            dead = [i for i in ids if i in self.dead]
            if dead:
                raise ClusterError(f"engine {dead[0]} failed to start: {self.dead[dead[0]]}")
            if all(i in self.engines for i in ids):
                return
            if self.closed:
                raise RuntimeError(f"this Client is closed: engines {list(ids)} not ready")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"engines {list(ids)} not ready after {timeout} s")
            time.sleep(0.02)

    # ----- sending

    def submit(
        self,
        route: bytes,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: Sequence[Any] = (),
        metadata: dict[str, Any] | bytes | None = None,
        engine_id: int | None = None,
        track: bool = False,
        kind: str = "apply",
        md_extra: dict[str, Any] | None = None,
        wait: bool = False,
        on_sent: Callable[[str], None] | None = None,
        here_later: list[tuple[Request, HereSocket]] | None = None,
    ) -> Request:
        """Send a request (any thread) and return it, a future the IO thread resolves.

        ``route`` is where it goes (:func:`kernel_engine.protocol.route_frame`, or the
        controller's ``hub``/``lb`` routes); ``engine_id`` the engine a routed request is
        for (None for load-balanced and controller requests).

        ``wait``: the caller waits for the request anyway (a blocking call). When it
        would go to an engine's lane directly with nothing else of this client's in
        flight to that engine, it goes on the calling thread's own socket, and this
        returns once the thread has read the reply there itself (see :meth:`wait_here_all`).
        ``on_sent(msg_id)`` is called once it has left (before that wait).

        ``here_later``: a call that waits for several requests sends them all first: one
        sent on the calling thread's own socket is added to this list, for
        :meth:`wait_here_all` to wait for, instead of being waited for here.
        """
        self._check_open()
        lost = self.io.lost
        if lost and not self.io.wait_back(BACK_WAIT, only_if_restarted=True):
            raise EngineError("EngineError", lost)
        header, frames = self.wire.pack(msg_type, content, None, metadata, buffers)
        msg_id = header["msg_id"]
        md = Metadata(msg_id=msg_id, submitted=datetime.now(timezone.utc), engine_id=engine_id)
        if md_extra:
            md.update(md_extra)
        channel = "controller" if engine_id is None else route.split(b":", 1)[0].decode()
        req = Request(msg_id, md, kind, channel, frames, route, track, header)
        if kind != "hub":
            for hook in self._submit_hooks:  # (before it is sent: before any of its output)
                hook(msg_id)
        lanes, here, sent = self.io.lanes, None, False
        pairs = [] if here_later is None else here_later  # (sent on the thread's own socket)
        try:
            with deferred_interrupts():  # (taken into the table and sent, or neither)
                if (
                    wait
                    and engine_id is not None
                    and channel == "lane"
                    and lanes is not None
                    and threading.get_ident() != self.io.thread_id
                ):
                    here = lanes.here(engine_id)
                try:
                    path = None
                    if here is not None and not self.requests.add_alone(req, "here"):
                        lanes.here_done(here)  # type: ignore[union-attr]
                        here = None
                    if here is None:
                        path = self.requests.add(req)
                    if kind != "hub":
                        self.metadata[msg_id] = md
                        self.history.append(msg_id)
                    if here is not None:
                        self._send_here(req, here)
                        sent = True
                        pairs.append((req, here))  # (waited for, or left: never neither)
                    elif path is not None:
                        self._send(req, path)
                    if on_sent is not None:
                        on_sent(msg_id)
                except Refused as exc:  # (not taken: nothing to withdraw)
                    if here is not None:
                        lanes.here_done(here)  # type: ignore[union-attr]
                    raise self.refused(exc) from None
                except BaseException as exc:  # (another signal's handler raising, say)
                    if not sent:
                        self._withdraw([req], exc)
                        if here is not None:
                            lanes.here_done(here)  # type: ignore[union-attr]
                    raise
            if pairs and here_later is None:
                self.wait_here_all(pairs)
        except BaseException as exc:  # (Ctrl-C, held back until the section's end, say)
            if here_later is None:
                self.leave_here_all(pairs, exc)  # (what wait_here_all has not left)
            raise
        return req

    def _send_here(self, req: Request, here: HereSocket) -> None:
        """Send ``req``, taken on the ``here`` path, on the calling thread's own socket."""
        frames, req.frames = req.frames, None
        lanes = self.io.lanes
        assert frames is not None and req.engine_id is not None and lanes is not None
        here.msg_id = req.msg_id
        if lanes.note(req.engine_id, req.header or {}, req.metadata.get("label")):
            self.io.wake()  # (it sends the notices when they are due)
        req.tracker = wire.send_frames(here.socket, frames, track=req.track)

    def _read_here(self, req: Request, frames: list[Any]) -> tuple[wire.Message, Any]:
        """A reply read on ``req``'s thread's own socket, and its result unpickled when it
        answers ``req`` (None otherwise: taken in the general way).

        A blocking call that code run by the unpickling makes, and that would wait in
        the general way, is refused (:meth:`check_blocking`): it could wait behind ``req``
        (or another reply of the same call) that only this thread takes in."""
        msg = self.wire.unpack(frames[1:])
        if msg.parent_id != req.msg_id or msg.content.get("status") != "ok":
            return msg, None
        loading = getattr(self._loading, "now", False)
        self._loading.now = True
        try:
            # (a result's segment keeps its name until the reply is taken in: Ctrl-C
            # before that gives the reply to the IO thread, which reads it again)
            return msg, self.outcome(msg, req.metadata, req.msg_id, unlink=False)
        finally:
            self._loading.now = loading

    def _take_here(self, req: Request, frames: list[Any], msg: wire.Message, outcome: Any) -> bool:
        """Take in the reply :meth:`_read_here` read (call with Ctrl-C held back, for as
        long as it takes: the table then sends every request other threads queued behind
        ``req``, which may be thousands); whether it was ``req``'s."""
        if msg.parent_id != req.msg_id:  # (a late reply to an earlier call, say)
            self.io._safely(self._on_reply, frames)
            return False
        lanes = self.io.lanes
        assert lanes is not None
        lanes.direct_done(req.msg_id, req.engine_id, msg.metadata, _kept_reply(msg, frames))
        received = datetime.now(timezone.utc)
        with self.requests.lock:  # (the IO thread adds output under it: see _on_iopub)
            outcome = self._read(req, msg, msg.metadata, None, received, outcome)
            done = self.requests.replied(req.msg_id, outcome, time.monotonic(), self._send)
        self._settle(done)
        return True

    def _leave_here(
        self,
        req: Request,
        here: HereSocket,
        exc: BaseException | None,
        frames: list[Any] | None,
    ) -> None:
        """The calling thread stops waiting for ``req`` on its own socket before taking
        its reply in (``exc``: Ctrl-C, say; None: ``req`` ended another way). The IO
        thread takes the socket over, and ``frames`` (a reply read but not taken in) too,
        and reads what still comes while ``req`` is live or its outcome is still to be
        told to the controller (after Ctrl-C, :meth:`leave_here_all` interrupts the
        engine). After its reply was taken in, the socket simply stays the thread's."""
        lanes = self.io.lanes
        assert lanes is not None
        if here.msg_id != req.msg_id:
            lanes.here_done(here)
            return
        msg_id = req.msg_id
        with deferred_interrupts():
            here.msg_id = ""
            if frames is not None:
                got = frames
                self.io.call_soon(lambda: self._on_reply(got))

            def wanted() -> bool:
                return msg_id in self.requests.live or msg_id in self._unreported

            if lanes.abandon(here, lambda s: self.io.take_over(s, wanted)):
                self.io.wake()

    def wait_here_all(
        self, pairs: list[tuple[Request, HereSocket]], also: Sequence[Request] = ()
    ) -> None:
        """Read the replies to ``pairs``' requests, each on the calling thread's own socket
        to its engine, and take them in as the IO thread would have (two thread hand-offs
        less: see ``benchmarks/roundtrip.py``). Returns once each has ended, whoever ended
        it (its engine or the controller lost, the client closed: looked at every
        :data:`HERE_POLL_MS`); one that ended another way leaves its socket to the IO
        thread, which reads the reply should it still come (to tell the controller).

        A reply is read whole or not at all, and the table takes it in with Ctrl-C held
        back (it may send requests other threads queued behind it); only reading it
        (unpickling) is interrupted. On any exception, the sockets of those not answered
        go to the IO thread (:meth:`leave_here_all`: after Ctrl-C, their engines and
        those running ``also``, the call's requests that went the general way, are
        interrupted together) and it is raised. ``pairs`` is emptied as they are dealt
        with, so a caller that leaves them after an exception leaves none twice."""
        # (a call to one engine polls with its socket's own poller: it ends once that
        # pair is dealt with; a call to several unregisters each pair dealt with)
        own = len(pairs) > 1
        poller = zmq.Poller() if own else pairs[0][1].poller
        for _, here in pairs if own else ():
            poller.register(here.socket, zmq.POLLIN)
        by_socket = {here.socket: (req, here) for req, here in pairs}
        lanes = self.io.lanes
        assert lanes is not None
        frames: list[Any] | None = None
        reading: tuple[Request, HereSocket] | None = None
        try:
            while pairs and not self.closed:
                ended = [p for p in pairs if p[0].done()]  # (ended another way)
                for req, here in ended:
                    with deferred_interrupts():  # (dropped and left, or neither)
                        if own:
                            poller.unregister(here.socket)
                        self._leave_here(req, here, None, None)
                        _drop_pair(pairs, here)
                if not pairs:
                    break
                for sock, _ in poller.poll(HERE_POLL_MS):
                    reading = by_socket[sock]
                    with deferred_interrupts():
                        try:
                            frames = wire.recv_frames(sock, wire.NOBLOCK)
                        except zmq.Again:
                            reading = None
                            continue
                    req, here = reading
                    read = self._read_here(req, frames)
                    with deferred_interrupts(long=True):  # (it may send many: see _take_here)
                        answered = self._take_here(req, frames, *read)
                        frames = None
                        if answered:
                            here.msg_id = ""  # (answered: the socket stays the thread's)
                            _drop_pair(pairs, here)
                            if own:
                                poller.unregister(sock)
                            lanes.here_done(here)
                    reading = None
        except BaseException as exc:
            got, frames = frames, None
            self.leave_here_all(pairs, exc, reading, got, also)
            raise
        self.leave_here_all(pairs, None)  # (the client closed)
        self.io.flush_if_due()

    def leave_here_all(
        self,
        pairs: list[tuple[Request, HereSocket]],
        exc: BaseException | None,
        reading: tuple[Request, HereSocket] | None = None,
        frames: list[Any] | None = None,
        also: Sequence[Request] = (),
    ) -> None:
        """:meth:`_leave_here` for each of ``pairs`` (emptied), ``frames`` being a reply
        read on ``reading``'s socket and not taken in; after Ctrl-C, their engines and
        those running ``also`` are interrupted together."""
        left = list(also)
        while pairs:
            with deferred_interrupts():  # (taken out of ``pairs`` once left, not before)
                req, here = pairs[-1]
                got = frames if reading is not None and reading[1] is here else None
                self._leave_here(req, here, exc, got)
                pairs.pop()
                left.append(req)
        if isinstance(exc, KeyboardInterrupt):
            live = [r for r in left if not r.done()]
            if live:  # (as a blocking call's wait does: at most INTERRUPT_GRACE s)
                with contextlib.suppress(Exception):
                    self.interrupt([r.msg_id for r in live])
                    concurrent.futures.wait(live, INTERRUPT_GRACE)

    def submit_batch(
        self,
        msg_type: str,
        metadata: bytes,
        track: bool = False,
        md_extra: dict[str, Any] | None = None,
    ) -> SubmitBatch:
        """Load-balanced requests of one call, sent many to a message (see
        :mod:`._batch`): ``add`` each, then ``close`` (or use it as a context manager)."""
        self._check_open()
        lost = self.io.lost
        if lost and not self.io.wait_back(BACK_WAIT, only_if_restarted=True):
            raise EngineError("EngineError", lost)
        return SubmitBatch(self, self._submit_hooks, msg_type, metadata, track, md_extra)

    @property
    def direct(self) -> bool:
        """Whether this client sends requests to the engines' task lanes itself."""
        return self.io.lanes is not None

    def maps_results(self, engine_id: int) -> bool:
        """Whether engine ``engine_id`` may send this client its very large results in
        shared memory (:data:`kernel_engine.shm.REPLY_KEY`): this client reaches its lane
        and maps its host's segments (asked once per engine process)."""
        info = self.engines.get(engine_id)
        if info is None or self.io.lanes is None:
            return False
        key = (engine_id, info.get("pid"))
        known = self._maps.get(key)
        if known is None:
            if len(self._maps) > 4096:
                self._maps.clear()
            known = self._maps[key] = shm.enabled() and shm.is_local(info)
        return known

    def depend_on(self, msg_ids: Sequence[str]) -> None:
        """Tasks about to be sent wait for ``msg_ids``: those that this client sent to
        engines directly are watched, so that the controller hears at once when they
        finish (not up to ``_lanes.FLUSH_EVERY`` later, which would hold the tasks back)."""
        lanes = self.io.lanes
        if lanes is None or not msg_ids:
            return
        live = self.requests.live
        mine = [
            m
            for m in msg_ids
            if (req := live.get(m)) is not None and (req.path is None or req.path in LANE_PATHS)
        ]
        if mine:
            lanes.watch(mine)

    def submit_broadcast(
        self,
        targets: Sequence[int],
        msg_type: str,
        content: dict[str, Any],
        buffers: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
        track: bool = False,
        kind: str = "apply",
        md_extra: dict[str, Any] | None = None,
    ) -> list[Request] | None:
        """Send the same request to several engines in one message, which the controller
        fans out (see :mod:`kernel_engine.controller.broadcast`); returns one request per
        target, in order, each with a msg_id of its own (any thread).

        Returns None, sending nothing, when a target still has requests of this client in
        flight on another path (its lane, or its shell for an apply): the caller sends
        per engine then, so that each engine's requests keep their order.
        """
        self._check_open()
        lost = self.io.lost
        if lost and not self.io.wait_back(BACK_WAIT, only_if_restarted=True):
            raise EngineError("EngineError", lost)
        request = protocol.BroadcastRequest(
            msg_type, tuple(targets), wire.new_msg_ids(len(targets)), content
        )
        channel = request.channel
        asked = request.to_content()
        if channel == "lane":  # (an apply's replies folded, see kernel_engine.replies)
            asked[replies.FOLD_ASKED] = True
        header, frames = self.wire.pack(protocol.BROADCAST_REQUEST, asked, None, metadata, buffers)
        common = {"submitted": datetime.now(timezone.utc), **(md_extra or {})}
        mds = Metadata.many(request.msg_ids, request.targets, **common)
        reqs = Request.many(request.msg_ids, mds, kind, channel, track)
        with deferred_interrupts():  # (taken into the table and sent, or neither)
            try:
                if not self.requests.add_all(reqs, "routed" if channel == "lane" else "shell"):
                    return None
                hooks = self._submit_hooks
                if hooks:
                    for msg_id in request.msg_ids:
                        for hook in hooks:  # (before it is sent: before any of its output)
                            hook(msg_id)
                self.metadata.put_all(request.msg_ids, mds)
                self.history.extend(request.msg_ids)
                self._broadcasts[header["msg_id"]] = request.msg_ids
                tracker = self.io.send([protocol.BROADCAST_ROUTE, *frames], track=track)
            except Refused as exc:  # (none taken)
                raise self.refused(exc) from None
            except BaseException as exc:
                self._withdraw(reqs, exc)
                raise
        if tracker is not None:
            for req in reqs:
                req.tracker = tracker
        return reqs

    def refused(self, exc: Refused) -> Exception:
        """What a caller raises when the table refused a request: RuntimeError when this
        client is closed, else EngineError (the controller is lost)."""
        if self.closed:
            return RuntimeError(str(exc))
        return EngineError("EngineError", str(exc))

    def _withdraw(self, reqs: list[Request], exc: BaseException) -> None:
        """Requests the table took that were not sent after all (``exc`` stopped their
        sending): they leave the table and the order books, failed with ``exc``, and
        requests held back behind them go (any thread)."""
        error = exc if isinstance(exc, Exception) else RuntimeError(f"not sent: {exc!r}")
        self._settle(self.requests.withdraw(reqs, error, self._send))

    def _broadcast_refused(self, parts: tuple[str, ...], content: dict[str, Any]) -> None:
        """The controller refused a broadcast whole: each of its parts fails (IO thread)."""
        for msg_id in parts:
            req = self.requests.get(msg_id)
            if req is None:
                continue
            error = self._error(content, req.metadata, msg_id)
            self._settle(
                self.requests.replied(msg_id, (False, error), time.monotonic(), self._send)
            )

    def _send(self, req: Request, path: str) -> bool:
        """Send a request admitted on ``path`` (any thread); False if its lane closed."""
        frames = req.frames
        req.frames = None
        assert frames is not None
        if path != "direct":
            req.tracker = self.io.send([req.route, *frames], track=req.track)
            return True
        eid = req.engine_id
        lanes = self.io.lanes
        lane, first = None, False
        if lanes is not None and eid is not None:
            lane, first = lanes.start(eid, req.header or {}, req.metadata.get("label"))
        try:
            if lane is None:
                raise zmq.ZMQError(msg="no lane")
            req.tracker = self.io.send(frames, track=req.track, lane=lane)
            if first:
                self.io.wake()  # (it sends the notices when they are due)
            return True
        except zmq.ZMQError:  # the lane closed under us: its engine just died
            if eid is not None:
                reason = self.dead.get(eid) or f"engine {eid} is gone"
                self.io.call_soon(lambda: self.fail_engine(eid, reason))
            return False

    def _path_of(self, eid: int, channel: str) -> str:
        if channel == "shell":
            return "shell"
        lanes = self.io.lanes
        return "direct" if lanes is not None and lanes.usable(eid) else "routed"

    def post(
        self,
        engine_id: int,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[Any] = (),
        msg_id: str | None = None,
    ) -> bool:
        """Send a message no kernel answers (a frontend's ``comm_msg`` or ``comm_close``
        for a comm on engine ``engine_id``) to the engine's shell, through the controller
        (any thread). Nothing waits for it, so no request is recorded here or in the
        controller.

        Returns whether it was sent (not when the client is closed, the controller lost,
        or the engine gone). Raises ValueError for what the controller would drop.
        """
        if msg_type not in protocol.COMM_MESSAGES:
            raise ValueError(f"{msg_type!r} is not one of {sorted(protocol.COMM_MESSAGES)}")
        protocol.CommMessage.from_content(content)
        if self.closed or self.io.lost or engine_id not in self.engines:
            return False
        self._check_process("sending a message")
        header = self.wire.header(msg_type, msg_id)
        _, frames = self.wire.pack(msg_type, content, None, metadata, buffers, header=header)
        protocol.check_comm_size(len(buffers), sum(memoryview(f).nbytes for f in frames[1:]))
        try:
            self.io.send([protocol.route_frame("shell", engine_id), *frames])
        except zmq.ZMQError:  # closed meanwhile
            return False
        return True

    def tell(self, msg_type: str, request: Any) -> Request:
        """Send a request to the controller itself; returns its future (the reply's
        content, or an exception)."""
        return self.submit(protocol.HUB_ROUTE, msg_type, request.to_content(), kind="hub")

    def ask(self, msg_type: str, request: Any, timeout: float | None = 30.0) -> dict[str, Any]:
        """Send a request to the controller itself and return the reply's content."""
        self.check_blocking(msg_type)
        future = self.tell(msg_type, request)
        try:
            reply: dict[str, Any] = future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the controller did not answer {msg_type} in {timeout} s") from None
        if reply.get("status") == "error":
            raise _hub_error(reply)
        return reply

    # ----- receiving (on the IO thread)

    def _on_reply(self, frames: list[Any]) -> None:
        route = frames[0].bytes
        if route == wire.DELIM:  # straight from an engine's lane
            self._on_lane_reply(frames)
            return
        msg = self.wire.unpack(frames[2:])
        if route == protocol.HUB_ROUTE and msg.msg_type == replies.REPLIES:
            self._take_replies(msg)
            return
        if route == protocol.HUB_ROUTE and msg.msg_type == protocol.REPLIES_DROPPED:
            self._replies_dropped(msg.content)
            return
        engine_id = None if route == protocol.HUB_ROUTE else _engine_of(route)
        self._take_reply(msg, msg.metadata, engine_id)

    def _on_replies(self, messages: list[list[Any]]) -> None:
        """The messages of one batch from the controller (its outbox gathers them), each
        read as :meth:`_on_reply` would, in order: runs of replies to our tasks (the bulk
        of a map's) are taken into the table and settled together, under one hold of
        each lock, before anything else of the batch is handled."""
        received = datetime.now(timezone.utc)
        taken: dict[str, tuple[tuple[bool, Any], int | None]] = {}
        for frames in messages:
            self.io._safely(self._one_of_batch, frames, taken, received)
        self._take_all(taken)

    def _take_all(self, taken: dict[str, tuple[tuple[bool, Any], int | None]]) -> None:
        """Take the replies read so far (msg_id -> outcome, engine id) into the table and
        settle what they finished."""
        if taken:
            read = [(msg_id, outcome, eid) for msg_id, (outcome, eid) in taken.items()]
            taken.clear()
            self._settle(self.requests.replied_all(read, time.monotonic(), self._send))

    def _one_of_batch(
        self,
        frames: list[Any],
        taken: dict[str, tuple[tuple[bool, Any], int | None]],
        received: datetime,
    ) -> None:
        """A message of a batch: a task's reply goes through :meth:`_take_one`; anything
        else is handled as :meth:`_on_reply` handles it, once what came before it is
        settled."""
        route = frames[0].bytes
        if route == wire.DELIM or route == protocol.HUB_ROUTE:
            self._take_all(taken)
            self._on_reply(frames)
            return
        self._take_one(self.wire.unpack(frames[2:]), _engine_of(route), taken, received)

    def _take_one(
        self,
        msg: wire.Message | replies.Reply,
        engine_id: int | None,
        taken: dict[str, tuple[tuple[bool, Any], int | None]],
        received: datetime,
    ) -> None:
        """A reply among others: read into ``taken`` when it answers a live task of ours;
        else (unknown, to the controller, a probe's, a refused copy's, a second reply to a
        task of ``taken``) taken alone, as :meth:`_take_reply` does, after what was read
        before it."""
        msg_id = msg.parent_id
        req = self.requests.get(msg_id)
        if (
            req is None
            or req.kind == "hub"
            or msg_id in self._probes
            or msg_id in taken
            or msg.content.get("px_error") == protocol.DUPLICATE
        ):
            self._take_all(taken)
            self._take_reply(msg, msg.metadata, engine_id)  # (the rare way)
            return
        taken[msg_id] = self._read(req, msg, msg.metadata, engine_id, received), engine_id

    def _replies_dropped(self, content: dict[str, Any]) -> None:
        """The controller dropped messages for this client, which did not read them for
        long (a process stopped, say; see ``kernel_engine.controller.outbox``): ask for
        the outcome of each task of ours pending on the controller's paths (IO thread).
        Those that ended are settled from their records; those still running get their
        replies as ever; those the controller no longer knows fail, saying why."""
        log.warning(
            "jupyter-px client: the controller dropped %s message(s) for this client, "
            "which did not read them in time; asking for its tasks' outcomes again",
            content.get("messages", "some"),
        )
        with self.requests.lock:
            pending = [
                msg_id
                for msg_id, req in self.requests.live.items()
                if req.kind != "hub" and req.path not in LANE_PATHS and req.outcome is None
            ]
        for start in range(0, len(pending), RECORDS_AT_ONCE):
            chunk = pending[start : start + RECORDS_AT_ONCE]
            future = self.tell(protocol.RESULT_REQUEST, protocol.ResultRequest(tuple(chunk)))
            future.add_done_callback(functools.partial(self.io._safely, self._recovered, chunk))

    def _recovered(self, msg_ids: list[str], future: concurrent.futures.Future[Any]) -> None:
        """Settle, from the controller's records, those of ``msg_ids`` that ended."""
        reply = future.result()
        if reply.get("status") == "error":
            log.warning("jupyter-px client: asking for outcomes again failed: %s", reply)
            return
        records = self._records(reply)
        now, done = time.monotonic(), []
        for msg_id in msg_ids:
            req = self.requests.get(msg_id)
            if req is None or req.outcome is not None:
                continue  # (its reply came meanwhile)
            record, stored = records.get(msg_id, (None, None))
            if record is not None and record.get("status") == "pending":
                continue  # (still running: its reply will come)
            if stored is not None:
                outcome, md = stored
                req.metadata.update((k, v) for k, v in md.items() if v is not None)
            else:
                why = (
                    "its reply was dropped by the controller (this client did not read "
                    "for too long)"
                    + ("" if record is None else ", and the controller kept no copy of it")
                )
                outcome = (False, EngineError("EngineError", why, None, {"msg_id": msg_id}))
            if (eid := req.engine_id) is None and record is not None:
                eid = engine_id_of(record.get("engine_id"))
            done += self.requests.replied(msg_id, outcome, now, self._send, eid)
        self._settle(done)

    def _on_lane_reply(self, frames: list[Any]) -> None:
        msg = self.wire.unpack(frames[1:])
        lanes = self.io.lanes
        if msg.msg_type == protocol.LANE_PING_REPLY:
            if lanes is not None:
                lanes.on_ping_reply(msg.parent_id)
            return
        req = self.requests.get(msg.parent_id)
        if lanes is not None and req is not None and req.path in LANE_PATHS:
            lanes.direct_done(req.msg_id, req.engine_id, msg.metadata, _kept_reply(msg, frames))
        elif lanes is not None and req is None and msg.parent_id in self._unreported:
            # failed here when the controller was lost; the controller still waits to hear
            eid = self._unreported.pop(msg.parent_id)
            lanes.direct_done(msg.parent_id, eid, msg.metadata, _kept_reply(msg, frames))
        self._take_reply(msg, msg.metadata, None)

    def _take_reply(
        self, msg: wire.Message | replies.Reply, reply_md: dict[str, Any], engine_id: int | None
    ) -> None:
        """A reply to one of our requests (or to a request of ours it never saw)."""
        msg_id = msg.parent_id
        content = msg.content
        if msg_id in self._probes:
            self._probe_answered(msg_id, content, False)
            return
        if content.get("px_error") == protocol.DUPLICATE:
            log.warning("jupyter-px client: the controller refused a copy of %s", msg_id)
            return
        req = self.requests.get(msg_id)
        if req is None:
            parts = self._broadcasts.pop(msg_id, None)
            if parts is not None:
                self._broadcast_refused(parts, content)
                return
            self.requests.replied(msg_id, (False, None), time.monotonic(), self._send)
            return
        if req.kind == "hub":
            content["_buffers"] = msg.buffers
            outcome: tuple[bool, Any] = (True, content)
        else:
            outcome = self._read(req, msg, reply_md, engine_id, datetime.now(timezone.utc))
        done = self.requests.replied(msg_id, outcome, time.monotonic(), self._send, engine_id)
        self._settle(done)

    def _take_replies(self, msg: wire.Message) -> None:
        """The replies one merged message carried (engine replies to tasks; a
        broadcast's, mostly): each read as :meth:`_take_reply` would, then taken into the
        table and settled together (a bad one: dropped, counted, alone; a malformed
        message fails the tasks it names).

        A broadcast's replies are paid for once per part, so the common one (an apply's
        reply ``{"status": "ok"}`` to a live task of ours, folded or not) is read here in
        one pass, without the objects and calls of the general way (:meth:`_take_one`),
        which takes every other reply, and any that fails here, with the same outcome."""
        try:
            got = replies.parts(msg)
        except replies.MalformedReplies as exc:
            self._fail_malformed(exc)
            raise
        received = datetime.now(timezone.utc)
        taken: dict[str, tuple[tuple[bool, Any], int | None]] = {}
        live, probes, loads = self.requests.live, self._probes, serialize.loads
        pickle_loads = pickle.loads  # (a result of one frame: what serialize.loads does)
        for msg_id, eid, msg_type, reply_md, content, bufs in got:
            req = live.get(msg_id)
            if (
                req is not None
                and msg_type == protocol.APPLY_REPLY
                and content == _OK
                and req.kind != "hub"
                and msg_id not in taken
                and msg_id not in probes
            ):
                try:
                    md = req.metadata
                    if md.get("engine_id") is None:
                        md["engine_id"] = eid
                    md["received"] = received
                    md.update_from_reply(reply_md)
                    value = loads(bufs) if len(bufs) != 1 else pickle_loads(bufs[0])
                except Exception:  # (a result that does not load: the general way says so)
                    pass
                else:
                    md["status"] = "ok"
                    if bufs and (size := sum(map(len, bufs))) >= WEIGHED_FROM:
                        req.nbytes = size
                    taken[msg_id] = (True, value), eid
                    continue
            reply = replies.Reply(msg_id, msg_type, reply_md, content, bufs)
            self.io._safely(self._take_one, reply, eid, taken, received)
        self._take_all(taken)

    def _fail_malformed(self, exc: replies.MalformedReplies) -> None:
        """The controller sent a malformed merged message: the tasks of ours it names fail
        with an error saying so (rather than wait for ever for replies it lost)."""
        failed = []
        for msg_id in exc.msg_ids:
            req = self.requests.get(msg_id)
            if req is None or req.kind == "hub":
                continue
            md = req.metadata
            info = {"engine_id": md.get("engine_id"), "msg_id": msg_id}
            why = f"its reply came in a message the controller garbled ({exc})"
            md["error"] = error = RemoteError("MessageError", why, None, info)
            md["status"] = "error"
            failed.append((msg_id, (False, error), None))
        if failed:
            self._settle(self.requests.replied_all(failed, time.monotonic(), self._send))

    def _read(
        self,
        req: Request,
        msg: wire.Message | replies.Reply,
        reply_md: dict[str, Any],
        engine_id: int | None,
        received: datetime,
        outcome: tuple[bool, Any] | None = None,
    ) -> tuple[bool, Any]:
        """A task's reply into its metadata; returns its outcome (``outcome``, if it was
        read already)."""
        md = req.metadata
        if engine_id is not None and md.get("engine_id") is None:
            md["engine_id"] = engine_id
        md["received"] = received
        md.update_from_reply(reply_md)
        shared = msg.content.get(shm.CONTENT_KEY)
        if outcome is None:
            outcome = self.outcome(msg, md, req.msg_id)
        elif outcome[0] and shared is not None:  # (read by _read_here, its name kept)
            shm.drop_result(shared)
        md["status"] = "ok" if outcome[0] else "error"
        buffers = msg.buffers
        if buffers and outcome[0]:
            size = sum(map(len, buffers))  # (received frames: len is bytes)
            if shared is not None:  # (a mapped segment's: it read, so its size is valid)
                size += shared["size"]
            if size >= WEIGHED_FROM:
                req.nbytes = size
        return outcome

    def outcome(
        self, msg: wire.Message | replies.Reply, md: Metadata, msg_id: str, unlink: bool = True
    ) -> tuple[bool, Any]:
        """(succeeded, result or error) of a reply (``unlink=False``: the name of a
        result's segment stays, see :func:`kernel_engine.shm.take_result`)."""
        content = msg.content
        if content.get("status") != "ok":
            return False, self._error(content, md, msg_id)
        if msg.msg_type != protocol.APPLY_REPLY:
            return True, ExecuteReply(msg_id, content, md)
        try:
            shared = content.get(shm.CONTENT_KEY)
            if shared is None:
                return True, serialize.loads(msg.buffers)
            info = self.engines.get(md["engine_id"])
            pid = info.get("pid") if info is not None else None
            frames = shm.take_result(shared, msg.buffers, unlink, pid if type(pid) is int else None)
            try:
                return True, serialize.loads(frames)
            except Exception:
                if not unlink:  # (a failed outcome: no reading again would do better)
                    shm.drop_result(shared)
                raise
        except Exception as exc:
            info = {"engine_id": md["engine_id"], "msg_id": msg_id}
            return False, RemoteError(
                "SerializationError", f"could not load the result: {exc}", None, info
            )

    @staticmethod
    def _error(content: dict[str, Any], md: Metadata, msg_id: str) -> RemoteError:
        info = {
            "engine_id": md.get("engine_id"),
            "engine_uuid": md.get("engine_uuid"),
            "msg_id": msg_id,
        }
        cls = REMOTE_ERROR_CLASSES.get(str(content.get("px_error", "")), RemoteError)
        traceback = content.get("traceback", [])
        err = cls(
            str(content.get("ename", "Error")),
            str(content.get("evalue", "")),
            traceback if isinstance(traceback, (list, str)) else [],
            info,
        )
        md["error"] = err
        return err

    def _settle(self, done: list[Request]) -> None:
        """Requests the table finished: keep their results, resolve their futures."""
        msg_ids, values, sizes = [], [], []
        weighed = False
        for req in done:
            outcome = req.outcome
            if outcome is not None and req.kind != "hub":
                msg_ids.append(req.msg_id)
                values.append(outcome[1])
                sizes.append(nbytes := req.nbytes)
                weighed = weighed or nbytes > 0
        try:
            self.results.put_all(msg_ids, values, sizes if weighed else None)
        finally:  # (whatever happens there, nobody waits for ever)
            settle_all(done)

    def _on_iopub(self, frames: list[Any]) -> None:
        topic = frames[0].bytes
        if len(frames) < 7:
            return  # not a Jupyter message (ipykernel's XPUB welcome, say)
        msg = self.wire.unpack(frames[2:])
        if topic == protocol.EVENT_TOPIC:
            self._on_event(msg)
            return
        if topic == protocol.STATUS_TOPIC:
            if msg.msg_type == protocol.CLUSTER_STATUS:
                for status_handler in list(self._status_handlers):
                    self.io._safely(status_handler, msg.content)  # (each, whatever another does)
            return
        try:
            engine_id = int(topic.rsplit(b".", 1)[1])
        except (IndexError, ValueError):
            return
        msg_id = msg.parent_id
        for handler in list(self._iopub_handlers):
            handler(engine_id, msg)
        req = self.requests.get(msg_id)
        if req is None:
            # data a task published, or what it displayed, just before it returned comes
            # after its reply when that came straight from the engine's lane (iopub goes
            # through the controller): it still belongs in the task's metadata (what it
            # printed does not: the reply carries all of that)
            late = self.metadata.get(msg_id) if msg.msg_type in _LATE_OUTPUTS else None
            if late is None:
                return
            if msg.msg_type == DATA_MESSAGE:
                late["data"] = {**late["data"], **serialize.loads(msg.buffers)}
            else:
                late["outputs"] = [*late["outputs"], msg.content]
            return
        md = req.metadata
        msg_type, content = msg.msg_type, msg.content
        if msg_type == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            with self.requests.lock:  # (a thread taking in its own reply: see _take_here)
                if req.kind == "execute" or req.outcome is None:
                    md[name] = md.get(name, "") + str(content.get("text", ""))
        elif msg_type in ("display_data", "update_display_data"):
            md["outputs"] = [*md["outputs"], content]
        elif msg_type == "execute_result":
            md["execute_result"] = content
        elif msg_type == "execute_input":
            md["execute_input"] = content.get("code")
        elif msg_type == "error":
            md["error"] = content
        elif msg_type == DATA_MESSAGE:
            md["data"] = {**md["data"], **serialize.loads(msg.buffers)}
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self._settle(self.requests.output_done(msg_id))

    def _on_event(self, msg: wire.Message) -> None:
        content = msg.content
        if msg.msg_type == protocol.ENGINE_REGISTERED:
            info = protocol.EngineInfo.from_content(content.get("engine")).to_content()
            self.engines[info["id"]] = info
            self._registered.add(info["id"])
            self._told_no_engines = False
            self.dead.pop(info["id"], None)  # (an engine that came back with its id)
            if self.io.lanes is not None:
                self.io.lanes.add_engine(info)
        elif msg.msg_type == protocol.ENGINE_UNREGISTERED:
            eid = protocol.check_int("engine_id", content.get("engine_id"))
            reason = content.get("reason")
            self.fail_engine(eid, reason if isinstance(reason, str) else f"engine {eid} died")
        elif msg.msg_type == protocol.IOPUB_WELCOME:
            self._welcomed.set()
            token = content.get("token")
            if isinstance(token, str) and token in self._probes:
                self._probe_answered(token, None, True)
        elif msg.msg_type == protocol.CONTROLLER_STOPPING:
            self._controller_lost("the controller stopped")

    # ----- the end of engines and of the controller

    def fail_engine(self, eid: int, reason: str) -> None:
        """Engine ``eid`` is gone (IO thread; a second call changes nothing): it leaves
        ``ids``, its lane closes, and every request addressed to it fails with an
        EngineError saying ``reason``."""
        self.engines.pop(eid, None)
        self._registered.discard(eid)
        self.dead[eid] = reason
        for handler in list(self._engine_gone_handlers):
            handler(eid)
        first = reason.splitlines()[0]
        lanes = self.io.lanes
        if lanes is not None:
            lanes.remove_engine(eid)
        done = self.requests.fail_engine(eid, lambda r: _engine_error(first, r))
        # (no reply can come now to tell the controller of: it sees the engine die)
        for msg_id in [m for m, e in list(self._unreported.items()) if e == eid]:
            self._unreported.pop(msg_id, None)
        if lanes is not None:
            for req in done:
                if req.path in LANE_PATHS:
                    lanes.direct_done(req.msg_id, eid, {"status": "error"})
        self._settle(done)
        if not self.engines and not self._told_no_engines:
            self._check_no_engines(eid, first)

    def _waiting_unassigned(self) -> int:
        """Our tasks that wait for the controller to assign them an engine."""
        with self.requests.lock:
            return sum(
                1
                for req in self.requests.live.values()
                if req.kind != "hub" and req.engine_id is None and req.outcome is None
            )

    def _check_no_engines(self, eid: int, reason: str) -> None:
        """Every engine is gone: if tasks of ours may wait in the controller's queue, ask
        it for its queue, and warn once its answer came (IO thread).

        The controller publishes an engine's end (on iopub) before it sends the replies of
        the tasks that end with it (those it does not retry, on the reply socket): counted
        now, tasks failing this very moment were said to wait. Its answer to a request sent
        now comes after those replies, so the count then is what waits. A controller that
        stops (its cluster stopping) never answers: nothing is said."""
        if self._asked_no_engines or self.io.lost or self.closed:
            return
        if not self._waiting_unassigned():
            return
        self._asked_no_engines = True
        try:
            future = self.tell(protocol.QUEUE_REQUEST, protocol.QueueRequest(()))
        except Exception:
            self._asked_no_engines = False
            return
        answered = functools.partial(self._tell_no_engines, eid, reason)
        future.add_done_callback(functools.partial(self.io._safely, answered))

    def _tell_no_engines(
        self, eid: int, reason: str, future: concurrent.futures.Future[Any]
    ) -> None:
        """The controller answered (see :meth:`_check_no_engines`): warn (once, until an
        engine registers) if tasks of ours still wait in its queue, which would otherwise
        wait in silence."""
        self._asked_no_engines = False
        if future.exception() is not None or self.engines or self._told_no_engines:
            return
        if self.closed or self.io.lost:
            return
        waiting = self._waiting_unassigned()
        if waiting:
            self._told_no_engines = True
            log.warning(
                "jupyter-px client: every engine is gone (the last, engine %d: %s); %d "
                "load-balanced task(s) of this client wait in the controller's queue until "
                "an engine registers: start engines, or end them with rc.abort()",
                eid,
                reason,
                waiting,
            )

    def engines_gone(self, reasons: dict[int, str], timeout: float = 10.0) -> None:
        """Apply what the controller said of engines it stopped now, not when its event
        arrives (any thread; returns once the IO thread has done it)."""

        def apply() -> None:
            for eid, reason in reasons.items():
                self.fail_engine(eid, reason)

        self.io.call_and_wait(apply, timeout)

    def _controller_lost(self, reason: str) -> None:
        """Everything waiting fails: the controller is gone or out of reach (IO thread).

        Requests that went to a lane directly may still finish there; should their replies
        come, the controller (if it is back) is told, since nobody else can tell it. Their
        errors are not kept in ``results``: ``get_result`` then asks the controller's
        records, which know how they really ended.
        """
        done = self.requests.fail_all(lambda r: _engine_error(reason, r), refuse=reason)
        for req in done:
            if req.path in LANE_PATHS and req.engine_id is not None:
                self._unreported[req.msg_id] = req.engine_id
        self._settle(done)
        for req in done:
            # not their outcome, only ours: the controller's records (get_result, once it
            # is back or restarted) tell how they ended
            self.results.pop(req.msg_id, None)

    def _answering(self) -> None:
        """The lost controller, or one restarted in its place, answers pings (IO thread):
        rejoin it before taking requests again.

        Each socket reconnects on its own: a request sent the moment pings are echoed
        could have its reply dropped (the receiving socket not connected yet) and wait for
        ever, and engine events published meanwhile be missed. So a probe (a connect
        request outside the request table) goes out at each echo; once one's reply came
        back and its iopub welcome too, replies and events reach this client, its engines
        are learnt anew from that reply, and requests are taken again.
        """
        now = time.monotonic()
        if not self._probes:
            self._registered.clear()  # (engines registering from now on are back)
        elif now - self._probe_sent < 0.2:
            return
        header, frames = self.wire.pack(protocol.CONNECT_REQUEST, CONNECT.to_content())
        self._probes[header["msg_id"]] = None
        while len(self._probes) > 16:
            self._probes.pop(next(iter(self._probes)))
        self._welcomes &= self._probes.keys()
        self._probe_sent = now
        try:
            self.io.send([protocol.HUB_ROUTE, *frames])
        except zmq.ZMQError:
            pass

    def _probe_answered(self, msg_id: str, reply: dict[str, Any] | None, welcome: bool) -> None:
        """A probe's reply or its welcome arrived (IO thread); with both, rejoined."""
        if reply is not None:
            self._probes[msg_id] = reply
        if welcome:
            self._welcomes.add(msg_id)
        got = self._probes.get(msg_id)
        if got is None or msg_id not in self._welcomes or not self.io.lost:
            return
        self._probes.clear()
        self._welcomes.clear()
        self.requests.accept()
        if got.get("status") != "error":
            self._reconcile(got)
        self.io.back()

    def _reconcile(self, reply: dict[str, Any]) -> None:
        """The engines a controller that came back has (IO thread): those it has ready,
        those it is still adopting (out of ``ids`` until they register), and the others,
        gone."""
        self._take_engines(reply)
        ready = {int(i) for i in reply.get("engines", {})}
        starting = {int(i) for i in reply.get("starting", [])}
        dead = reply.get("dead", {})
        for eid in list(self.engines):
            if eid in ready or eid in self._registered:
                continue
            if eid in starting:  # (being adopted: back in ids once it registers)
                self.engines.pop(eid, None)
                continue
            why = dead.get(str(eid)) if isinstance(dead, dict) else None
            if not isinstance(why, str):
                why = f"engine {eid} did not come back with the controller"
            self.fail_engine(eid, why)

    def _tick(self) -> None:
        """Every 0.5 s on the IO thread: executes whose output never ended, engines whose
        process is gone while a lane holds their requests."""
        self._settle(self.requests.tick(time.monotonic()))
        lanes = self.io.lanes
        if lanes is not None:
            for eid, reason in lanes.tick(time.monotonic(), self.requests.busy, processes.running):
                self.fail_engine(eid, reason)

    # ----- for views and AsyncResults

    @property
    def outstanding(self) -> set[str]:
        """msg_ids of tasks submitted and not finished."""
        return self.requests.outstanding()

    def add_iopub_handler(self, handler: IopubHandler) -> None:
        """Call ``handler(engine_id, msg)`` on the IO thread for every engine output."""
        self._iopub_handlers.append(handler)

    def remove_iopub_handler(self, handler: IopubHandler) -> None:
        if handler in self._iopub_handlers:
            self._iopub_handlers.remove(handler)

    def status(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The cluster's status now, as the controller's status stream has it (engines,
        their tasks, counts, throughput, latest errors; see
        :mod:`kernel_engine.controller.status`). It counts every request this client
        sent before the call."""
        return self.ask(protocol.STATUS_REQUEST, protocol.Empty(), timeout=timeout)

    def add_status_handler(self, handler: StatusHandler) -> None:
        """Call ``handler(status)`` on the IO thread for each status the controller
        publishes (a few a second at most). The controller publishes only while some
        client subscribes: this client does while it has handlers."""
        self._status_handlers.append(handler)
        self.io.call_soon(self._subscribe_status)

    def remove_status_handler(self, handler: StatusHandler) -> None:
        """Stop calling ``handler``; with the last one gone, unsubscribe."""
        with contextlib.suppress(ValueError):  # (two threads may remove it at once)
            self._status_handlers.remove(handler)
        if not self.closed:
            self.io.call_soon(self._subscribe_status)

    def _subscribe_status(self) -> None:
        """Subscribed to the status stream exactly while there are handlers (IO thread)."""
        wanted = bool(self._status_handlers)
        if wanted != self._status_subscribed:
            self.io.subscribe(protocol.STATUS_TOPIC, wanted)
            self._status_subscribed = wanted

    def add_submit_hook(self, hook: SubmitHook) -> None:
        """Call ``hook(msg_id)`` on the submitting thread for every task, before it is sent
        (so before any of its output can arrive)."""
        self._submit_hooks.append(hook)

    def add_engine_gone_handler(self, handler: EngineGoneHandler) -> None:
        """Call ``handler(engine_id)`` on the IO thread when an engine is gone."""
        self._engine_gone_handlers.append(handler)

    def remove_handlers(self, *handlers: Callable[..., None]) -> None:
        """Stop calling these iopub handlers, submit hooks and engine-gone handlers."""
        for handler in handlers:
            for registry in (
                self._iopub_handlers,
                self._submit_hooks,
                self._engine_gone_handlers,
            ):
                if handler in registry:
                    registry.remove(handler)  # type: ignore[arg-type]

    def interrupt(self, msg_ids: list[str], signum: int = int(signal.SIGINT)) -> list[int]:
        """Signal (SIGINT by default) the engines running these requests, wherever the
        scheduler put them; returns the engines signalled."""
        request = protocol.SignalRequest(
            signum, tuple(self.requests.direct_engines(msg_ids)), tuple(msg_ids)
        )
        targets: list[int] = self.ask(protocol.SIGNAL_REQUEST, request, timeout=10)["targets"]
        return targets

    def abort(
        self, msg_ids: list[str], targets: list[int] | None = None, block: bool = True
    ) -> None:
        """Do not run these requests (those already running finish)."""
        request = protocol.AbortRequest(tuple(msg_ids), None if targets is None else tuple(targets))
        if block:
            self.ask(protocol.ABORT_REQUEST, request)
        else:
            self.tell(protocol.ABORT_REQUEST, request)

    def fetch_records(self, msg_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], Any]]:
        """The controller's records of these tasks, with their outcome when stored (asked
        for :data:`RECORDS_AT_ONCE` at a time: the controller reads at most 10,000 from
        its file for one request, and after a restart its memory holds none)."""
        out: dict[str, tuple[dict[str, Any], Any]] = {}
        ids = list(msg_ids)
        for start in range(0, max(len(ids), 1), RECORDS_AT_ONCE):
            chunk = tuple(ids[start : start + RECORDS_AT_ONCE])
            out.update(
                self._records(self.ask(protocol.RESULT_REQUEST, protocol.ResultRequest(chunk)))
            )
        return out

    def _records(self, reply: dict[str, Any]) -> dict[str, tuple[dict[str, Any], Any]]:
        """(record, (outcome, metadata) or None) by msg_id, of a result request's reply."""
        frames = list(reply["_buffers"])
        out: dict[str, tuple[dict[str, Any], Any]] = {}
        for msg_id, record in reply["records"].items():
            if record is None:
                continue
            outcome = None
            n = reply["frame_counts"].get(msg_id)
            if n:
                part, frames = frames[:n], frames[n:]
                msg = self.wire.unpack(part)
                md = Metadata(msg_id=msg_id, engine_id=record.get("engine_id"))
                md.update_from_reply(msg.metadata)
                for key in ("submitted", "completed"):  # (the controller's account)
                    if md.get(key) is None and isinstance(record.get(key), str):
                        md[key] = wire.parse_date(record[key])
                outcome = (self.outcome(msg, md, msg_id), md)
            out[msg_id] = (record, outcome)
        return out

    def futures_for(self, jobs: Any) -> list[concurrent.futures.Future[Any]]:
        """Futures for msg_ids or AsyncResults (default: everything outstanding)."""
        if jobs is None:
            jobs = list(self.outstanding)
        if isinstance(jobs, (str, concurrent.futures.Future)):
            jobs = [jobs]
        out: list[concurrent.futures.Future[Any]] = []
        for job in jobs:
            if isinstance(job, concurrent.futures.Future):
                out.append(job)
            elif isinstance(job, str):
                req = self.requests.get(job)
                if req is not None:
                    out.append(req)
            else:
                raise TypeError(f"cannot wait for {type(job).__name__}")
        return out

    def wait(
        self,
        futures: Iterable[concurrent.futures.Future[Any]],
        timeout: float | None,
        first: bool = False,
    ) -> bool:
        """Wait for all (or with ``first``, any) of ``futures``; whether they are done."""
        futures = list(futures)
        how = concurrent.futures.FIRST_COMPLETED if first else concurrent.futures.ALL_COMPLETED
        if timeout != 0 and not all(f.done() for f in futures):
            self.check_blocking("waiting")
        done, not_done = concurrent.futures.wait(futures, timeout, how)
        return bool(done) if first else not not_done

    # ----- lifetime

    def close(self) -> None:
        """Stop the IO thread and close the sockets (the cluster keeps running); whatever
        still waits for a reply fails at once, since none can come now."""
        if self.closed:
            return
        self.closed = True
        if _PROCESS[0] != self.pid:
            return  # (a forked child's copy: the sockets and the thread are the parent's)
        self.io.stop()
        why = "this Client is closed: no reply can reach it (the work may still run)"
        self._settle(self.requests.fail_all(lambda r: _closed_error(why, r), refuse=why))

    def _check_open(self) -> None:
        """Refuse a request of a closed client, or of a forked child's copy."""
        if self.closed:
            raise RuntimeError("this Client is closed")
        self._check_process("sending a request")

    def _check_process(self, what: str) -> None:
        """Refuse to send or wait in a child forked from the process this client was
        connected in: the child has a copy of the client without its IO thread, so a
        request there was never sent and a wait never ended."""
        if _PROCESS[0] != self.pid:
            raise RuntimeError(
                f"{what} would wait for ever: this Client was connected in process "
                f"{self.pid}, and process {os.getpid()} is a child forked from it, which "
                "has none of its threads; connect a new Client in the child"
            )

    def check_blocking(self, what: str) -> None:
        """Refuse to block the IO thread: a wait there (in a done-callback, say) would wait
        for a reply that only this thread could deliver, for ever; or to wait in a forked
        child (see :meth:`_check_process`)."""
        self._check_process(what)
        if threading.get_ident() == self.io.thread_id:
            raise RuntimeError(
                f"{what} would wait for ever: it was called on the client's IO thread "
                "(from a done-callback?); wait from another thread, or chain futures"
            )
        if getattr(self._loading, "now", False):
            raise RuntimeError(
                f"{what} would wait for ever: it was called while the result of a blocking "
                "call was loading (unpickling) on this thread, and could wait behind a "
                "reply that only this thread takes in; make the call after the result loads"
            )


def _kept_reply(msg: wire.Message, frames: list[Any]) -> list[Any] | None:
    """A lane reply's frames (after the delimiter) for the controller's record of the
    request; None for one whose result was in a segment, which its reader unlinked: the
    record keeps no result, as for any too large to keep."""
    return None if shm.CONTENT_KEY in msg.content else frames[1:]


def engine_id_of(value: Any) -> int | None:
    """``value`` as an engine id: an int, or any integral type (numpy's ``int64``, an
    element of ``np.arange``) as an int; None for anything else, bools included."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


_PROCESS = [os.getpid()]
"""This process's id, kept current in forked children (no system call per send)."""
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))

_LATE_OUTPUTS = frozenset({DATA_MESSAGE, "display_data", "update_display_data"})
"""What a task published on iopub that is kept when it comes after the task's reply."""

RECORDS_AT_ONCE = 5000
"""Tasks whose records one request asks for (the controller reads at most 10,000 from
its file for one)."""


def _engine_of(route: bytes) -> int | None:
    return int(route) if route.isdigit() and len(route) < 10 else None


def _engine_error(reason: str, req: Request) -> EngineError:
    info = {"engine_id": req.engine_id, "msg_id": req.msg_id}
    return EngineError("EngineError", reason, None, info)


def _closed_error(reason: str, req: Request) -> RemoteError:
    return RemoteError(
        "ClientClosed", reason, None, {"engine_id": req.engine_id, "msg_id": req.msg_id}
    )


def _hub_error(reply: dict[str, Any]) -> Exception:
    """The exception for an error reply of the controller itself."""
    ename, evalue = str(reply.get("ename", "Error")), str(reply.get("evalue", ""))
    builtin = {"TypeError": TypeError, "ValueError": ValueError, "KeyError": KeyError}
    if ename in builtin:
        return builtin[ename](evalue)
    if ename == "InvalidTarget":
        return InvalidTarget(evalue)
    if ename == "LaunchError":  # (engines it could not start: as when a cluster starts)
        return LaunchError(evalue)
    return RemoteError(ename, evalue)


def _drop_pair(pairs: list[tuple[Request, HereSocket]], here: HereSocket) -> None:
    """Take the pair of ``here`` out of ``pairs`` (by identity)."""
    pairs[:] = [p for p in pairs if p[1] is not here]
