"""The hub: the one owner of task records.

Records hold what the controller saw (who submitted, which engine, when, the outcome)
and, for small ones, the request's and the reply's frames themselves, so another client
can fetch a result (``Client.get_result``) or run a task again (``Client.resubmit``).

Two stores, one interface (this class):

- in memory only (``db="memory"``): the records below, bounded;
- SQLite (the default, ``db="sqlite"``): the same bounded records in memory, for the
  controller's own decisions on the hot path, and every record, its request, its
  reply and its output written to a file by the :class:`~.sqlite_store.SqliteLog`'s own
  thread, in batches. Reads that memory cannot answer (an old task's result, a query,
  the whole history) go to the file; it survives the controller, and a restarted one
  reads it again.

Memory stays bounded however many tasks run:

- at most :attr:`Hub.max_records` records: past that, the records finished longest ago
  go first; records of live (pending) tasks are never evicted;
- at most :attr:`Hub.max_result_bytes` of stored results: past that, the oldest stored
  results are dropped (their records stay).

Both evictions take the oldest entry of a queue in completion order, so each costs O(1)
amortised, never a scan of the records. Entries of records forgotten meanwhile (purged)
are skipped when they reach the front, and the queues are compacted when such entries
outnumber live ones.

A controller restarted on the cluster folder takes the file's pending records back into
memory (:meth:`Hub.restore`): the tasks a dead controller had in flight. It then ends
each of them (:meth:`Hub.completed`), with the reply an adopted engine kept for it or
with an error.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernel_engine import protocol
from kernel_engine.wire import LEN_IS_BYTES, PROTOCOL_VERSION, parse_date

from .query import DEFAULT_KEYS, check_keys, check_query, matches
from .sqlite_store import MAX_OUTPUT, TRUNCATED

log = logging.getLogger(__name__)

PENDING = "pending"
STATUSES = frozenset({"ok", "error", "aborted", "unknown"})
"""How a task ended; ``unknown``: its client sent it to a lane itself and was lost before
saying how it ended."""


def _stamp(date: Any) -> float | None:
    """An ISO date from a message as a timestamp (a float costs a third of the string)."""
    parsed = parse_date(date) if isinstance(date, str) else None
    if parsed is None:
        return None
    try:
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError):  # (a naive date the local clock cannot take)
        return None


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def _split(blob: bytes | None, sizes: tuple[int, ...]) -> list[memoryview]:
    if blob is None:
        return []
    view, frames, at = memoryview(blob), [], 0
    for size in sizes:
        frames.append(view[at : at + size])
        at += size
    return frames


def _join(frames: list[Any]) -> tuple[bytes, tuple[int, ...]]:
    if LEN_IS_BYTES.issuperset(map(type, frames)):  # (received frames, or bytes)
        return b"".join(frames), tuple(map(len, frames))
    views = [memoryview(getattr(f, "buffer", f)) for f in frames]
    return b"".join(views), tuple(v.nbytes for v in views)


class TaskRecord:
    """What the hub knows of one request (times as timestamps; ``reply`` the reply's
    frames joined, cut up again by ``reply_sizes``)."""

    __slots__ = (
        "client",
        "completed",
        "engine_id",
        "label",
        "msg_id",
        "msg_type",
        "received",
        "reply",
        "reply_sizes",
        "request",
        "request_sizes",
        "started",
        "status",
        "submitted",
    )

    def __init__(
        self,
        msg_id: str,
        msg_type: str,
        client: bytes,
        engine_id: int | None,
        submitted: float,
        label: str | None,
    ):
        self.msg_id = msg_id
        self.msg_type = msg_type
        self.client = client
        self.engine_id = engine_id
        self.submitted = submitted
        self.label = label
        self.started: float | None = None
        self.completed: float | None = None
        self.received: float | None = None  # (when the reply came here)
        self.status = PENDING
        self.reply: bytes | None = None
        self.reply_sizes: tuple[int, ...] = ()
        self.request: bytes | None = None
        self.request_sizes: tuple[int, ...] = ()

    def reply_frames(self) -> list[memoryview]:
        """The stored reply's frames (after the delimiter); empty if none is stored."""
        return _split(self.reply, self.reply_sizes)

    def request_frames(self) -> list[memoryview]:
        """The stored request's frames (header, parent, metadata, content, buffers)."""
        return _split(self.request, self.request_sizes)

    @property
    def stored_bytes(self) -> int:
        return len(self.reply or b"") + len(self.request or b"")

    @property
    def finished(self) -> bool:
        return self.status != PENDING

    def summary(self) -> dict[str, Any]:
        """The record as JSON, without the result frames."""
        return {
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "client_uuid": protocol.client_uuid(self.client),
            "engine_id": self.engine_id,
            "submitted": _iso(self.submitted),
            "started": _iso(self.started),
            "completed": _iso(self.completed),
            "status": self.status,
            "label": self.label,
            "result_stored": self.reply is not None,
        }


class Hub:
    """Task records keyed by msg_id, with O(1) amortised eviction; written through to a
    :class:`~.sqlite_store.SqliteLog` when there is one (``log``)."""

    def __init__(
        self,
        max_records: int = 50_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        max_one_result: int = protocol.MAX_STORED_RESULT,
        log: Any = None,
        engine_uuid: Callable[[int], str | None] = lambda eid: None,
        sign: Callable[[list[Any]], bytes] | None = None,
    ):
        self.max_records = max_records
        self.max_result_bytes = max_result_bytes
        self.max_one_result = max_one_result
        self.log = log
        self.engine_uuid = engine_uuid
        self.sign = sign  # (signs replies read back from the file, which keeps no signatures)
        self.records: dict[str, TaskRecord] = {}
        self.result_bytes = 0
        self._finished: deque[str] = deque()  # completion order; may hold forgotten ids
        self._stored: deque[str] = deque()  # records with frames, oldest first
        self._clients: dict[bytes, bytes] = {}  # one bytes object per client identity
        self._output_chars: dict[tuple[str, str], int] = {}  # output kept per record
        self._restored: set[str] = set()  # pending records a dead controller left
        # without a file: each resubmitted record's new msg_id, and what tasks that reply
        # with no copy of their output (an execute_request's) printed, bounded in all
        self._resubmitted: dict[str, str] = {}
        self._texts: dict[str, dict[str, str]] = {}
        self._text_chars = 0
        # told of each record started ("submitted"), placed on an engine ("assigned") and
        # ended ("completed", with the reply's frames if any): the status board's feed
        self.on_task: Callable[[str, TaskRecord, list[Any] | None], None] | None = None

    def close(self) -> None:
        """Write what is left to the file and close it (if there is one)."""
        if self.log is not None:
            self.log.close()

    def known(self, msg_id: str) -> bool:
        """Whether a record of ``msg_id`` is in memory (live, or finished lately)."""
        return msg_id in self.records

    def get(self, msg_id: str) -> TaskRecord | None:
        """The record of ``msg_id`` in memory (every live task's is; a finished one until it
        is evicted), or None."""
        return self.records.get(msg_id)

    def read_many(self, msg_ids: list[str]) -> dict[str, TaskRecord]:
        """The records of those of ``msg_ids`` the file has (with their reply frames):
        for the reader thread, never the loop."""
        if self.log is None or not msg_ids:
            return {}
        rows = self.log.get_many(msg_ids, keys=_ROW_KEYS)
        frames = self.log.frames_many(list(rows), "result")
        return {m: _from_row(row, frames.get(m), self.sign) for m, row in rows.items()}

    def read_requests(
        self, msg_ids: list[str]
    ) -> dict[str, tuple[tuple[int | None, bool] | str, dict[str, Any] | None]]:
        """(outcome, request or None) of those of ``msg_ids`` the file has: for the reader
        thread (see :meth:`outcome`)."""
        if self.log is None or not msg_ids:
            return {}
        keys = ["status", "engine_id", "header", "metadata", "content", "buffers"]
        out: dict[str, tuple[tuple[int | None, bool] | str, dict[str, Any] | None]] = {}
        for msg_id, row in self.log.get_many(msg_ids, keys=keys).items():
            status = row["status"]
            outcome = PENDING if status == PENDING else (row["engine_id"], status == "ok")
            request = {k: row[k] for k in keys[2:]} if row.get("header") else None
            out[msg_id] = (outcome, request)
        return out

    def submitted(
        self,
        msg_id: str,
        msg_type: str,
        client: bytes,
        engine_id: int | None,
        date: str | None = None,
        label: str | None = None,
        request: list[Any] | None = None,
        after: tuple[str, ...] = (),
        follow: tuple[str, ...] = (),
    ) -> TaskRecord:
        """Record a new request (its msg_id must not be :meth:`known`); ``request``: its
        frames (header, parent, metadata, content, buffers), kept when small enough."""
        if len(self._clients) > 10_000:
            self._clients.clear()
        client = self._clients.setdefault(client, client)
        submitted = _stamp(date) or time.time()
        record = TaskRecord(msg_id, sys.intern(msg_type), client, engine_id, submitted, label)
        self.records[msg_id] = record
        if self.on_task is not None:
            self.on_task("submitted", record, None)
        if request is not None and self.log is None:  # (the file keeps it otherwise)
            blob, sizes = _join(request)
            if len(blob) <= self.max_one_result:
                record.request, record.request_sizes = blob, sizes
                self._count_stored(record)
        if self.log is not None:
            # (None is left out: a new record's fields are NULL by default, and the store
            # writes records without a None faster)
            fields: dict[str, Any] = {
                "msg_type": msg_type,
                "client_uuid": protocol.client_uuid(client),
            }
            if engine_id is not None:
                fields.update(self._engine_fields(engine_id))
            if label is not None:
                fields["label"] = label
            fields["status"] = PENDING
            fields["submitted"] = submitted
            # (empty dependencies are left out too: NULL reads as [] as "[]" does)
            if after:
                fields["after"] = list(after)
            if follow:
                fields["follow"] = list(follow)
            if request is not None:
                fields["request"] = request
            # a task for no engine yet waits in the queue: its record is held back until
            # an engine takes it (see SqliteLog.put_queued)
            self.log.put_made(msg_id, fields, queued=engine_id is None)
        while len(self.records) > self.max_records and self._evict_finished():
            pass
        return record

    def _engine_fields(self, engine_id: int, new: bool = True) -> dict[str, Any]:
        """``engine_id`` and ``engine_uuid`` for a put; a new record's leaves an unknown
        uuid out (NULL either way), an update's sets it (not left from another engine)."""
        uuid = self.engine_uuid(engine_id)
        if uuid is None and new:
            return {"engine_id": engine_id}
        return {"engine_id": engine_id, "engine_uuid": uuid}

    def restore(self) -> list[tuple[TaskRecord, dict[str, Any]]]:
        """Take the file's pending records (a dead controller's tasks in flight) back into
        memory, still pending; returns them with their request headers (a header made up
        from the record when the request was not kept)."""
        if self.log is None:
            return []
        keys = ["msg_id", "msg_type", "client_uuid", "engine_id", "label", "submitted", "header"]
        out = []
        for row in self.log.pending(keys=keys):
            msg_id = row["msg_id"]
            if msg_id in self.records:
                continue
            msg_type = row.get("msg_type") or protocol.APPLY_REQUEST
            record = TaskRecord(
                msg_id,
                sys.intern(msg_type),
                str(row.get("client_uuid") or "").encode(),
                row.get("engine_id"),
                row.get("submitted") or time.time(),
                row.get("label"),
            )
            self.records[msg_id] = record
            self._restored.add(msg_id)
            header = row.get("header")
            if not isinstance(header, dict) or header.get("msg_id") != msg_id:
                header = {
                    "msg_id": msg_id,
                    "msg_type": msg_type,
                    "username": "",
                    "session": "",
                    "date": _iso(record.submitted),
                    "version": PROTOCOL_VERSION,
                }
            out.append((record, header))
        return out

    def is_restored(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is a dead controller's task, not ended yet."""
        return msg_id in self._restored

    def assigned(self, msg_id: str, engine_id: int) -> None:
        record = self.records.get(msg_id)
        if record is not None:
            record.engine_id = engine_id
            if self.log is not None:  # (a running task's record names its engine)
                self.log.taken(msg_id, self._engine_fields(engine_id))
            if self.on_task is not None:
                self.on_task("assigned", record, None)

    def completed(
        self,
        msg_id: str,
        status: str,
        started: str | None = None,
        completed: str | None = None,
        frames: list[Any] | None = None,
    ) -> None:
        """Record a task's outcome; keep its reply frames when they are small enough."""
        record = self.records.get(msg_id)
        if record is None or record.finished:
            return
        if self._restored:
            self._restored.discard(msg_id)
        record.status = status if status in STATUSES else "error"
        record.started = _stamp(started) or record.started
        record.received = received = time.time()
        record.completed = _stamp(completed) or received
        self._finished.append(record.msg_id)
        if self.on_task is not None:
            self.on_task("completed", record, frames)
        if frames is not None:
            blob, sizes = _join(frames)
            if len(blob) <= self.max_one_result:
                record.reply, record.reply_sizes = blob, sizes
                self._count_stored(record)
        if self.log is not None:
            fields = (
                {} if record.engine_id is None else self._engine_fields(record.engine_id, False)
            )
            fields["status"] = record.status
            if record.started is not None:
                fields["started"] = record.started
            fields["completed"] = record.completed
            fields["received"] = received
            if frames is not None:
                fields["result"] = _to_store(frames)
            self.log.put_made(msg_id, fields)
        self._compact()

    def resubmitted(self, old: str, new: str) -> None:
        """``old`` ran again as ``new``."""
        if self.log is not None:
            self.log.put(old, resubmitted=new)
        elif old in self.records:
            self._resubmitted[old] = new

    def output(self, msg_id: str, name: str, text: str) -> None:
        """What a task printed (``stdout``/``stderr``): kept in the file, if there is one,
        up to the file's limit per record; what is past it is not even queued, so a task
        that floods its output costs no memory here. Without a file, what no reply
        carries is kept in memory (:meth:`_keep_text`)."""
        if self.log is None:
            self._keep_text(msg_id, name, text)
            return
        key = (msg_id, name)
        seen = self._output_chars.get(key, 0)
        if seen > self.log.MAX_OUTPUT:
            return
        if len(self._output_chars) > 10_000:
            self._output_chars.clear()
        self._output_chars[key] = seen + len(text)
        self.log.append_output(msg_id, name, text)

    def _keep_text(self, msg_id: str, name: str, text: str) -> None:
        """Keep what a task printed, in memory, when its reply will not carry it (a
        function call's reply has its output in its metadata): up to the file's limit per
        record, and :attr:`max_result_bytes` / 4 characters in all, the oldest dropped."""
        record = self.records.get(msg_id)
        if record is None or record.msg_type == protocol.APPLY_REQUEST:
            return
        texts = self._texts.get(msg_id)
        if texts is None:
            texts = self._texts[msg_id] = {}
        old = texts.get(name, "")
        if len(old) > MAX_OUTPUT:
            return
        new = old + text
        if len(new) > MAX_OUTPUT:
            new = new[:MAX_OUTPUT] + TRUNCATED
        texts[name] = new
        self._text_chars += len(new) - len(old)
        while self._text_chars > self.max_result_bytes // 4 and self._texts:
            dropped = self._texts.pop(next(iter(self._texts)))
            self._text_chars -= sum(map(len, dropped.values()))

    def _count_stored(self, record: TaskRecord) -> None:
        self.result_bytes += record.stored_bytes
        self._stored.append(record.msg_id)
        while self.result_bytes > self.max_result_bytes and self._drop_oldest_frames():
            pass

    def outcome(
        self, msg_id: str, wait: float | None = 1.0
    ) -> tuple[int | None, bool] | str | None:
        """(engine id, succeeded) of a finished task, ``"pending"``, or None if unknown.

        Memory first, then one indexed row of the file, waiting at most ``wait`` seconds
        for the writer (on the loop: a dependency named by a task memory has forgotten;
        past the wait it answers from what the file holds then)."""
        return self.outcomes([msg_id], wait).get(msg_id)

    def outcomes(
        self, msg_ids: list[str], wait: float | None = 1.0
    ) -> dict[str, tuple[int | None, bool] | str]:
        """:meth:`outcome` of many msg_ids (the unknown ones left out): memory first, then
        the file, with one wait for the writer for them all."""
        out: dict[str, tuple[int | None, bool] | str] = {}
        rest = []
        for msg_id in msg_ids:
            record = self.records.get(msg_id)
            if record is None:
                rest.append(msg_id)
            elif not record.finished:
                out[msg_id] = PENDING
            else:
                out[msg_id] = (record.engine_id, record.status == "ok")
        if rest and self.log is not None:
            out.update(self.log.outcomes(rest, wait))
        return out

    def _evict_finished(self) -> bool:
        """Forget the record finished longest ago; False if no finished record is left."""
        while self._finished:
            msg_id = self._finished.popleft()
            record = self.records.get(msg_id)
            if record is not None and record.finished:
                self._forget(msg_id)
                return True
        return False

    def _drop_oldest_frames(self) -> bool:
        while self._stored:
            record = self.records.get(self._stored.popleft())
            if record is not None and record.stored_bytes:
                self.result_bytes -= record.stored_bytes
                record.reply = record.request = None
                record.reply_sizes = record.request_sizes = ()
                return True
        return False

    def _compact(self) -> None:
        """Drop queue entries of forgotten records once they outnumber the live ones."""
        slack = len(self.records) + 1024
        if len(self._finished) > 2 * slack:
            self._finished = deque(
                m for m in self._finished if (r := self.records.get(m)) is not None and r.finished
            )
        if len(self._stored) > 2 * slack:
            self._stored = deque(
                m for m in self._stored if (r := self.records.get(m)) is not None and r.stored_bytes
            )

    def _forget(self, msg_id: str) -> None:
        record = self.records.pop(msg_id, None)
        if record is not None:
            self.result_bytes -= record.stored_bytes
        if self._resubmitted:
            self._resubmitted.pop(msg_id, None)
        if self._texts:
            texts = self._texts.pop(msg_id, None)
            if texts:
                self._text_chars -= sum(map(len, texts.values()))

    def purge(self, msg_ids: tuple[str, ...] | None, engine_ids: tuple[int, ...] | None) -> int:
        """Forget finished records: the given ones, those of the engines, or all (None),
        in memory and in the file; returns how many. (The loop calls
        :meth:`forget_finished`, and the reader thread :meth:`purge_file`.)"""
        n = self.forget_finished(msg_ids, engine_ids)
        return n if self.log is None else self.purge_file(msg_ids, engine_ids)

    def purge_file(
        self, msg_ids: tuple[str, ...] | None, engine_ids: tuple[int, ...] | None
    ) -> int:
        """Forget finished records in the file; how many."""
        return 0 if self.log is None else int(self.log.purge(msg_ids, engine_ids))

    def forget_finished(
        self, msg_ids: tuple[str, ...] | None, engine_ids: tuple[int, ...] | None
    ) -> int:
        """Forget finished records in memory; how many."""
        if msg_ids is None and engine_ids is None:
            chosen = [m for m, r in self.records.items() if r.finished]
        else:
            chosen = [m for m in msg_ids or () if m in self.records]
            if engine_ids:
                wanted = set(engine_ids)
                chosen += [m for m, r in self.records.items() if r.engine_id in wanted]
            chosen = [m for m in dict.fromkeys(chosen) if self.records[m].finished]
        for msg_id in chosen:
            self._forget(msg_id)
        if msg_ids is None and engine_ids is None:
            self._finished.clear()
            self._stored = deque(m for m in self._stored if m in self.records)
        self._compact()
        return len(chosen)

    def history(self) -> list[str]:
        """Every msg_id with a record, in submission order (from the file when there is
        one: the reader thread's call)."""
        if self.log is not None:
            return list(self.log.history())
        return list(self.records)

    def query(
        self, query: dict[str, Any], keys: tuple[str, ...] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """At most ``limit`` records matching ``query`` (the predecessor's operators, see
        :mod:`.query`), with ``keys`` (default: all but buffers), in submission order.
        Dates are timestamps here. From the file when there is one: the reader thread's
        call; :func:`check_query` and :func:`check_keys` first, on the loop."""
        checked = check_query(query)
        wanted = list(DEFAULT_KEYS if keys is None else check_keys(list(keys)))
        if self.log is not None:
            return list(self.log.query(checked, wanted, limit))
        out: list[dict[str, Any]] = []
        for record in self.records.values():
            if limit is not None and len(out) >= limit:
                break
            row = _row_of(record, self.engine_uuid)
            row["resubmitted"] = self._resubmitted.get(record.msg_id)
            texts = self._texts.get(record.msg_id)
            if texts:
                for name, text in texts.items():
                    if row.get(name) is None:
                        row[name] = text
            if matches(row, checked):
                out.append({k: row.get(k) for k in wanted})
        return out

    def query_capped(
        self,
        query: dict[str, Any],
        keys: tuple[str, ...] | None,
        limit: int,
        max_bytes: int,
    ) -> tuple[list[dict[str, Any]], bool]:
        """:meth:`query` of the file, reading at most ``max_bytes``; whether it stopped
        there. The reader thread's call."""
        assert self.log is not None
        wanted = list(DEFAULT_KEYS if keys is None else check_keys(list(keys)))
        rows, cut = self.log.query_capped(check_query(query), wanted, limit, max_bytes)
        return list(rows), cut

    def kept_request(self, msg_id: str) -> dict[str, Any] | None:
        """A task's request (``header``, ``metadata``, ``content``, ``buffers``) if memory
        keeps it (it does when there is no file, and the request was small enough)."""
        record = self.records.get(msg_id)
        if record is not None and record.request is not None:
            return _decode_request(record.request_frames())
        return None


def open_log(
    folder: Path, db: str, max_bytes: int | None = None, max_age: float | None = None
) -> Any:
    """The file the records go to: ``db`` is ``"memory"`` (none), ``"sqlite"`` (the
    cluster folder's ``tasks.db``) or a path. A cluster folder's file that cannot be read
    is moved aside (``.corrupt-<time>``), never lost, and a new one started; a file at a
    path the user named is left as it is, and the start fails (StoreUnusable): it may be
    theirs, not a task database at all (``db="results.csv"``)."""
    if db == "memory":
        return None
    from .sqlite_store import BLOB_SUFFIX, SqliteLog, StoreUnusable

    path = folder / DB_FILE if db == "sqlite" else Path(db)
    limits: dict[str, Any] = {}
    if max_bytes is not None:
        limits["max_bytes"] = max_bytes
    if max_age is not None:
        limits["max_age"] = max_age or None
    try:
        return SqliteLog(path, **limits)
    except StoreUnusable:
        raise  # (not damaged: a folder in the way, which the message names)
    except Exception as exc:
        if db != "sqlite":
            reason = str(exc).removeprefix(f"task database {path}: ")
            raise StoreUnusable(
                str(path),
                f"not usable as the task database ({reason}); left as it is: move it "
                "aside, or give another path",
            ) from exc
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.error("task database %s unreadable (%s); moved to %s", path, exc, aside)
        path.rename(aside)
        # (else SQLite could replay the old log into a new file, which would also remove
        # the old blob files as named by no record)
        for suffix in ("-wal", "-shm", BLOB_SUFFIX):
            extra = path.with_name(path.name + suffix)
            if extra.exists():
                extra.rename(aside.with_name(aside.name + suffix))
        return SqliteLog(path, **limits)


DB_FILE = "tasks.db"
"""The task database's file in a cluster's folder."""

_ROW_KEYS = [
    "msg_id",
    "msg_type",
    "client_uuid",
    "engine_id",
    "label",
    "status",
    "submitted",
    "started",
    "completed",
    "received",
]


def _to_store(reply: list[Any]) -> list[Any]:
    """What the task database keeps of a reply's frames: not the signature, and not the
    parent header (the request's header, which the record has; nothing reads it back)."""
    return [reply[1], b"{}", *reply[3:]] if len(reply) > 4 else reply[1:]


def _row_of(
    record: TaskRecord, engine_uuid: Callable[[int], str | None] = lambda eid: None
) -> dict[str, Any]:
    """A memory record as the file's rows look (what queries see); ``engine_uuid``: the
    uuid of a live engine, for a record whose reply does not say it (still running, or
    an ``execute_request``'s), as the file's has it from the engine set."""
    row: dict[str, Any] = {
        "msg_id": record.msg_id,
        "msg_type": record.msg_type,
        "client_uuid": protocol.client_uuid(record.client),
        "engine_id": record.engine_id,
        "engine_uuid": None,
        "label": record.label,
        "status": record.status,
        "submitted": record.submitted,
        "started": record.started,
        "completed": record.completed,
        "received": record.received,
        "resubmitted": None,
    }
    request = _decode_request(record.request_frames()) if record.request else {}
    row.update({k: request.get(k) for k in ("header", "metadata", "content", "buffers")})
    reply = _decode_request(record.reply_frames()[1:]) if record.reply else {}
    for key in ("header", "metadata", "content", "buffers"):
        row[f"result_{key}"] = reply.get(key)
    # (what the file's rows have as columns of their own, read from the request's flags and
    # the reply's metadata, which memory keeps)
    flags = row["metadata"] if isinstance(row["metadata"], dict) else {}
    for name in ("after", "follow"):
        try:
            spec = protocol.DependencySpec.from_content(name, flags.get(name))
        except (TypeError, ValueError):
            spec = None
        row[name] = [] if spec is None else list(spec.msg_ids)
    done = row["result_metadata"] if isinstance(row["result_metadata"], dict) else {}
    for key in ("engine_uuid", "stdout", "stderr"):
        value = done.get(key)
        row[key] = value if isinstance(value, str) else None
    if row["engine_uuid"] is None and record.engine_id is not None:
        row["engine_uuid"] = engine_uuid(record.engine_id)
    return row


def _decode_request(frames: list[Any]) -> dict[str, Any]:
    """header, parent, metadata, content, buffers... frames as dicts and bytes."""
    import json

    def obj(i: int) -> Any:
        try:
            return json.loads(bytes(frames[i]))
        except (IndexError, ValueError):
            return None

    return {
        "header": obj(0),
        "metadata": obj(2),
        "content": obj(3),
        "buffers": [bytes(f) for f in frames[4:]],
    }


def _from_row(
    row: dict[str, Any], parts: list[bytes] | None, sign: Callable[[list[Any]], bytes] | None
) -> TaskRecord:
    """A record read back from the file (for results of tasks memory forgot)."""
    client = str(row.get("client_uuid") or "").encode()
    record = TaskRecord(
        row["msg_id"],
        row.get("msg_type") or "",
        client,
        row.get("engine_id"),
        row.get("submitted") or 0.0,
        row.get("label"),
    )
    record.status = row.get("status") or PENDING
    record.started = row.get("started")
    record.completed = row.get("completed")
    record.received = row.get("received")
    if parts and sign is not None:
        record.reply, record.reply_sizes = _join([sign(list(parts[:4])), *parts])
    return record
