"""Routing: requests a client addresses to one engine, every engine reply, iopub relay.

A request to ``lane:N``, ``shell:N`` or ``control:N`` is forwarded as frames (never
re-signed, never unpickled) and recorded in :class:`~.inflight.Inflight` until engine N
answers; the answer goes back to the client that asked, tagged with the engine's id.
Replies to load-balanced tasks are the balancer's to judge (a retried attempt is dropped).
Replies an adopted engine kept for a controller that died end that controller's records
(:meth:`~.hub.Hub.is_restored`), or make them when that controller had not written them.
Requests a client sent to a lane itself reach the controller as notices
(:meth:`Router.direct_notice`), so their records and dependencies stay complete.
A frontend's comm message for a widget on an engine is forwarded to that engine's shell
and forgotten (:meth:`Router.post`): kernels do not answer them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from kernel_engine import protocol, wire
from kernel_engine.wire import DropLog, Message

from .balancer import Balancer
from .engines import Engine, EngineSet
from .hub import Hub
from .inflight import MAX_DIRECT, Inflight, Pending

Head = tuple[int, bytes]
"""What the router read of an engine's reply to an apply request: (engine id, metadata
frame)."""

log = logging.getLogger("kernel_engine.controller")


class Router:
    """Forwards frames between the client socket and engine sockets.

    Parameters
    ----------
    wire
        Packs the controller's own error replies.
    engines, inflight, hub, balancer
        The engine set, what is in flight, the task records, load balancing.
    send_client
        Sends frames on the client socket.
    dead
        Why each engine that left the cluster left (engine id -> reason).
    drops
        Counts dropped input.
    send_reply
        ``send_reply(msg_id, frames, head)``: sends the answer to a routed request (its
        engine's reply, or the controller's error in its place; ``head``, for an engine's
        reply to an apply request, what was read of it: (engine id, metadata frame), else
        None); by default ``send_client(frames)`` (the controller holds a broadcast's
        replies there to send them together, see :mod:`.fanin`).
    """

    def __init__(
        self,
        wire: wire.Wire,
        engines: EngineSet,
        inflight: Inflight,
        hub: Hub,
        balancer: Balancer,
        send_client: Callable[[list[Any]], None],
        dead: Mapping[int, str],
        drops: DropLog,
        send_reply: Callable[[str, list[Any], Head | None], None] | None = None,
    ):
        self.wire = wire
        self.engines = engines
        self.inflight = inflight
        self.hub = hub
        self.balancer = balancer
        self.send_client = send_client
        self.dead = dead
        self.drops = drops
        self.send_reply = send_reply or (lambda _, frames, head: send_client(frames))
        self.adopting: Collection[int] = ()
        """The engines a restarted controller is adopting (the :class:`~.restore.Restorer`'s
        set): replies they send before their setup reply are ones they kept."""

    def forward(
        self,
        client: bytes,
        channel: str,
        eid: int,
        msg: Message,
        frames: list[Any],
        keep_request: bool = True,
    ) -> None:
        """A request to one engine's ``channel`` (``frames``: signature onwards; kept in
        its record unless not ``keep_request``), or one part of a broadcast."""
        engine = self.engines.ready(eid)
        if engine is None:
            starting = self.engines.engines.get(eid)
            if eid in self.dead:
                why = ("EngineError", self.dead[eid])
            elif starting is not None and starting.adopted:
                why = (
                    "EngineError",
                    f"engine {eid} is not back yet: a restarted controller adopts it once "
                    "the task it was running ends",
                )
            elif starting is not None:
                why = ("EngineError", f"engine {eid} is not ready yet")
            else:
                why = ("EngineError", f"no engine with id {eid}")
            self.send_reply(
                msg.msg_id, protocol.fail_reply(self.wire, client, msg.header, eid, *why), None
            )
            return
        self.inflight.add(msg.msg_id, Pending(client, msg.header, eid, channel, "routed"))
        self.hub.submitted(
            msg.msg_id,
            msg.msg_type,
            client,
            eid,
            wire.header_date(msg.header),
            request=frames[1:] if keep_request else None,  # (from the header on)
        )
        self.balancer.heard_of(msg.msg_id)
        self.engines.send(eid, channel, [client, wire.DELIM, *frames])

    def post(self, client: bytes, eid: int, frames: list[Any]) -> None:
        """A message no kernel answers (a frontend's comm message, checked at the edge) to
        engine ``eid``'s shell: forwarded and forgotten (nothing waits for a reply, so
        nothing is recorded); dropped if the engine is not ready."""
        if self.engines.ready(eid) is None:
            self.drops.drop(f"a comm message for engine {eid}, which is not ready")
            return
        self.engines.send(eid, "shell", [client, wire.DELIM, *frames])

    def from_engine(self, engine: Engine, channel: str, frames: list[Any]) -> None:
        """An engine's reply: ``[client, DELIM, signature, header, parent, metadata, ...]``
        (or a batch of them)."""
        if wire.is_batch(frames):
            try:
                messages = wire.unpack_batch(frames)
            except wire.MessageError as exc:
                self.drops.drop(f"from engine {engine.id}: {exc}")
                return
            for message in messages:
                self._reply(engine, channel, message)
            return
        self._reply(engine, channel, frames)

    def _reply(self, engine: Engine, channel: str, frames: list[Any]) -> None:
        if len(frames) < 7 or wire.delimiter_at(frames) != 1:
            self.drops.drop(f"malformed reply from engine {engine.id}")
            return
        try:
            # (checked though it comes on a socket this controller connected to the engine:
            # once the engine is dead, any local process may take its port over, and the
            # socket reconnects to it)
            _, parent_bytes, md_bytes, _ = self.wire.verify(frames[2:])
            parent = wire.loads_object(parent_bytes, "parent header")
            metadata = wire.loads_object(md_bytes, "metadata")
        except wire.MessageError as exc:
            self.drops.drop(f"reply from engine {engine.id}: {exc}")
            return
        msg_id = parent.get("msg_id")
        status = metadata.get("status") or "ok"
        if not isinstance(msg_id, str):
            self.drops.drop(f"reply from engine {engine.id} without a parent msg_id")
            return
        pending = self.inflight.get(msg_id)
        if pending is not None:
            if pending.engine_id != engine.id:
                # (an engine answering another's request, a buggy or hostile one: the
                # request stays where it is, and its real reply still finds its client)
                self.drops.drop(f"reply from engine {engine.id} to another engine's request")
                return
            self.inflight.pop(msg_id)
        if pending is None and self.hub.is_restored(msg_id):
            # a task a dead controller sent: the engine kept its reply for us. Its client
            # was told its controller was lost; the record gets the real outcome.
            self.balancer.outcome(msg_id, engine.id, status == "ok")
            self.hub.assigned(msg_id, engine.id)
            self._record_outcome(msg_id, status, metadata, channel, frames)
            return
        if pending is None and engine.id in self.adopting:
            self._kept_unrecorded(engine, msg_id, parent, status, metadata, channel, frames)
            return
        if pending is None or pending.kind == "lb":
            if not self.balancer.owns(msg_id):
                self.drops.drop(f"reply from engine {engine.id} to nothing it was sent")
                return
            if not self.balancer.runs_on(msg_id, engine.id):
                # (a task queued here, or dispatched to another engine: taken as final,
                # this reply ended the task for its client, and the real one was dropped)
                self.drops.drop(f"reply from engine {engine.id} to a task it was not given")
                return
            if not self.balancer.reply(engine.id, msg_id, frames, status):
                return  # a retried attempt: the scheduler sent the task elsewhere
        elif channel != "control":
            self.balancer.outcome(msg_id, engine.id, status == "ok")
        apply = channel != "control" and parent.get("msg_type") == protocol.APPLY_REQUEST
        head = (engine.id, md_bytes) if apply else None
        self.send_reply(msg_id, [frames[0], engine.route, *frames[1:]], head)
        self._record_outcome(msg_id, status, metadata, channel, frames)

    def _kept_unrecorded(
        self,
        engine: Engine,
        msg_id: str,
        parent: dict[str, Any],
        status: str,
        metadata: dict[str, Any],
        channel: str,
        frames: list[Any],
    ) -> None:
        """A reply an engine being adopted kept for a dead controller, to a task that
        controller had sent but not yet written to its file (it commits every
        ``BATCH_INTERVAL``): the record is made from the reply (its request is lost), so
        the task's client finds its result. One the file has finished is a duplicate."""
        msg_type = parent.get("msg_type")
        if (
            channel == "control"
            or not 0 < len(msg_id) <= wire.MAX_ID_LENGTH
            or msg_type not in (protocol.APPLY_REQUEST, "execute_request")
        ):
            self.drops.drop(f"a reply engine {engine.id} kept, to no task")
            return
        if self.hub.outcomes([msg_id], wait=0):  # (the file: what the dead one wrote)
            self.drops.drop(f"a reply engine {engine.id} kept, to a task already ended")
            return
        date = parent.get("date")
        client = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
        self.hub.submitted(
            msg_id, msg_type, client, engine.id, date if isinstance(date, str) else None
        )
        self.balancer.outcome(msg_id, engine.id, status == "ok")
        self._record_outcome(msg_id, status, metadata, channel, frames)

    def _record_outcome(
        self, msg_id: str, status: str, metadata: dict[str, Any], channel: str, frames: list[Any]
    ) -> None:
        """An engine's reply into its record (its frames kept, but for the control
        channel's: a task's reply, or a cell's, with its error when it failed)."""
        self.hub.completed(
            msg_id,
            "ok" if status == "ok" else "error",
            metadata.get("started"),
            metadata.get("completed"),
            frames[2:] if channel != "control" else None,
        )

    def direct_notice(self, client: bytes, msg: Message) -> None:
        """A client's account of requests it sent to engines' lanes itself.

        Each submitted request becomes a hub record (and a valid dependency for the
        scheduler); each completed one gets its outcome and, when small, its reply frames,
        sliced out of the joined buffers. A request both sent and answered since the
        client's last notice (``done``) is recorded with its outcome at once.
        """
        size = len(msg.frames[4])
        if size > protocol.MAX_NOTICE_BYTES:  # (before it is parsed)
            raise ValueError(
                f"a direct notice's content is at most {protocol.MAX_NOTICE_BYTES} bytes, "
                f"not {size}"
            )
        notice = protocol.DirectNotice.from_content(msg.content)
        for sub in notice.submitted:
            self._direct_submitted(client, sub, True)
        blobs = iter(msg.buffers)
        for sub, done in notice.done:
            frames = self._reply_frames(done, blobs)
            if frames is False:
                return
            if self._direct_submitted(client, sub, False):
                self._direct_completed(done, frames)
        for done in notice.completed:
            frames = self._reply_frames(done, blobs)
            if frames is False:
                return
            held = self.inflight.get(done.msg_id)
            if held is not None and held.kind == "direct" and held.client == client:
                self.inflight.pop(done.msg_id)
            record = self.hub.get(done.msg_id)
            # (a record read back from the file, or restored, names its client by uuid,
            # the identity's first 16 characters)
            if record is None or record.client[:16] != client[:16]:
                continue  # not this client's request: nothing to say about it
            self._direct_completed(done, frames)

    def _direct_submitted(
        self, client: bytes, sub: protocol.DirectSubmitted, in_flight: bool
    ) -> bool:
        """Record a direct request (False: its msg_id was seen before, it is ignored);
        ``in_flight``: not answered yet, so held as in flight on its engine, or failed
        at once if that engine is gone."""
        if self.hub.known(sub.msg_id) or sub.msg_id in self.inflight:
            self.drops.drop("a direct notice naming a msg_id seen before")
            return False
        if in_flight and self.inflight.direct >= MAX_DIRECT:
            # (not recorded: its result still reaches its client, straight from the lane)
            who = protocol.client_uuid(client)
            self.drops.drop(
                f"a direct request of client {who}: {MAX_DIRECT} are held unanswered already"
            )
            return False
        self.hub.submitted(sub.msg_id, sub.msg_type, client, sub.engine_id, sub.date, sub.label)
        self.balancer.heard_of(sub.msg_id)
        if not in_flight:
            return True
        header = {"msg_id": sub.msg_id, "msg_type": sub.msg_type, "date": sub.date}
        if sub.engine_id in self.engines.engines:  # (ready, or still being adopted)
            pending = Pending(client, header, sub.engine_id, "lane", "direct")
            self.inflight.add(sub.msg_id, pending)
        else:  # gone before we heard of it (a notice a restarted controller gets late)
            why = self.dead.get(sub.engine_id) or f"engine {sub.engine_id} is gone"
            failed = protocol.fail_reply(
                self.wire, client, header, sub.engine_id, "EngineError", why
            )
            self.hub.completed(sub.msg_id, "error", frames=failed[3:])
            self.balancer.outcome(sub.msg_id, sub.engine_id, False)
        return True

    def _reply_frames(self, done: protocol.DirectCompleted, blobs: Iterator[Any]) -> Any:
        """The reply frames a notice kept for ``done`` (None: none), taken from
        ``blobs``; False when their sizes do not match (the rest of the notice is then
        ignored)."""
        if not done.sizes:
            return None
        # (as bytes: the frames, sliced copies of a reply the client found small enough
        # to keep, then go to the hub and the store as they are, where memoryviews cost
        # each of them more per frame than the copies do)
        blob = wire.as_bytes(next(blobs, b""))
        if len(blob) != sum(done.sizes):
            self.drops.drop("a direct notice whose sizes do not match its buffers")
            return False
        frames, at = [], 0
        for size in done.sizes:
            frames.append(blob[at : at + size])
            at += size
        return frames

    def _direct_completed(self, done: protocol.DirectCompleted, frames: list[Any] | None) -> None:
        # (with no engine too: a request the client failed itself; dependents wait for it)
        self.balancer.outcome(done.msg_id, done.engine_id, done.status == "ok")
        self.hub.completed(done.msg_id, done.status, done.started, done.completed, frames)

    def fail_engine(self, engine_id: int, reason: str) -> None:
        """An engine is gone: answer every request it held with an ``EngineError`` (the
        balancer decides about load-balanced ones; clients fail their direct ones)."""
        for msg_id, pending in self.inflight.pop_engine(engine_id):
            if pending.kind == "lb":
                continue
            frames = protocol.fail_reply(
                self.wire, pending.client, pending.header, engine_id, "EngineError", reason
            )
            self.hub.completed(msg_id, "error", frames=frames[3:])  # (from the signature on)
            self.balancer.outcome(msg_id, engine_id, False)
            if pending.kind == "routed":
                self.send_reply(msg_id, frames, None)
