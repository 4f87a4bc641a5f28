"""The hub: the one owner of task records, in bounded memory.

Records hold what the controller saw (who submitted, which engine, when, the outcome)
and, for small results, the reply frames themselves, so another client can fetch them
(``Client.get_result``). Memory stays bounded however many tasks run:

- at most :attr:`Hub.max_records` records: past that, the records finished longest ago
  go first; records of live (pending) tasks are never evicted;
- at most :attr:`Hub.max_result_bytes` of stored results: past that, the oldest stored
  results are dropped (their records stay).

Both evictions take the oldest entry of a queue in completion order, so each costs O(1)
amortised, never a scan of the records. Entries of records forgotten meanwhile (purged)
are skipped when they reach the front, and the queues are compacted when such entries
outnumber live ones.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from kernel_engine import protocol
from kernel_engine.wire import parse_date

PENDING = "pending"
STATUSES = frozenset({"ok", "error", "aborted", "unknown"})
"""How a task ended; ``unknown``: its client sent it to a lane itself and was lost before
saying how it ended."""


def _stamp(date: Any) -> float | None:
    """An ISO date from a message as a timestamp (a float costs a third of the string)."""
    parsed = parse_date(date) if isinstance(date, str) else None
    return parsed.timestamp() if parsed is not None else None


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat()


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
        "reply",
        "reply_sizes",
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
        self.status = PENDING
        self.reply: bytes | None = None
        self.reply_sizes: tuple[int, ...] = ()

    def reply_frames(self) -> list[memoryview]:
        """The stored reply's frames (after the delimiter); empty if none is stored."""
        if self.reply is None:
            return []
        view, frames, at = memoryview(self.reply), [], 0
        for size in self.reply_sizes:
            frames.append(view[at : at + size])
            at += size
        return frames

    @property
    def finished(self) -> bool:
        return self.status != PENDING

    def summary(self) -> dict[str, Any]:
        """The record as JSON, without the result frames."""
        return {
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "client_uuid": self.client[:16].decode("ascii", "replace"),
            "engine_id": self.engine_id,
            "submitted": _iso(self.submitted),
            "started": _iso(self.started),
            "completed": _iso(self.completed),
            "status": self.status,
            "label": self.label,
            "result_stored": self.reply is not None,
        }


class Hub:
    """Task records keyed by msg_id, with O(1) amortised eviction."""

    def __init__(
        self,
        max_records: int = 50_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        max_one_result: int = protocol.MAX_STORED_RESULT,
    ):
        self.max_records = max_records
        self.max_result_bytes = max_result_bytes
        self.max_one_result = max_one_result
        self.records: dict[str, TaskRecord] = {}
        self.result_bytes = 0
        self._finished: deque[str] = deque()  # completion order; may hold forgotten ids
        self._stored: deque[str] = deque()  # records with result frames, oldest first
        self._clients: dict[bytes, bytes] = {}  # one bytes object per client identity

    def known(self, msg_id: str) -> bool:
        """Whether a record of ``msg_id`` exists (live or finished)."""
        return msg_id in self.records

    def get(self, msg_id: str) -> TaskRecord | None:
        return self.records.get(msg_id)

    def submitted(
        self,
        msg_id: str,
        msg_type: str,
        client: bytes,
        engine_id: int | None,
        date: str | None = None,
        label: str | None = None,
    ) -> TaskRecord:
        """Record a new request (its msg_id must not be :meth:`known`)."""
        if len(self._clients) > 10_000:
            self._clients.clear()
        client = self._clients.setdefault(client, client)
        submitted = _stamp(date) or time.time()
        record = TaskRecord(msg_id, sys.intern(msg_type), client, engine_id, submitted, label)
        self.records[msg_id] = record
        while len(self.records) > self.max_records and self._evict_finished():
            pass
        return record

    def assigned(self, msg_id: str, engine_id: int) -> None:
        record = self.records.get(msg_id)
        if record is not None:
            record.engine_id = engine_id

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
        record.status = status if status in STATUSES else "error"
        record.started = _stamp(started) or record.started
        record.completed = _stamp(completed) or time.time()
        self._finished.append(record.msg_id)
        if frames is not None:
            sizes = tuple(len(f) for f in frames)
            size = sum(sizes)
            if size <= self.max_one_result:
                record.reply = b"".join(getattr(f, "buffer", f) for f in frames)
                record.reply_sizes = sizes
                self.result_bytes += size
                self._stored.append(record.msg_id)
                while self.result_bytes > self.max_result_bytes and self._drop_oldest_result():
                    pass
        self._compact()

    def outcome(self, msg_id: str) -> tuple[int | None, bool] | str | None:
        """(engine id, succeeded) of a finished task, ``"pending"``, or None if unknown."""
        record = self.records.get(msg_id)
        if record is None:
            return None
        if not record.finished:
            return PENDING
        return record.engine_id, record.status == "ok"

    def _evict_finished(self) -> bool:
        """Forget the record finished longest ago; False if no finished record is left."""
        while self._finished:
            msg_id = self._finished.popleft()
            record = self.records.get(msg_id)
            if record is not None and record.finished:
                self._forget(msg_id)
                return True
        return False

    def _drop_oldest_result(self) -> bool:
        while self._stored:
            record = self.records.get(self._stored.popleft())
            if record is not None and record.reply is not None:
                self.result_bytes -= len(record.reply)
                record.reply = None
                record.reply_sizes = ()
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
                m for m in self._stored if (r := self.records.get(m)) is not None and r.reply
            )

    def _forget(self, msg_id: str) -> None:
        record = self.records.pop(msg_id, None)
        if record is not None and record.reply is not None:
            self.result_bytes -= len(record.reply)

    def purge(self, msg_ids: tuple[str, ...] | None, engine_ids: tuple[int, ...] | None) -> int:
        """Forget finished records: the given ones, those of the engines, or all (None)."""
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
        """Every msg_id with a record, in submission order."""
        return list(self.records)

    def query(
        self, query: dict[str, Any], keys: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        """Records whose fields equal the given values (``{"engine_id": 0}``), as JSON."""
        out = []
        for record in self.records.values():
            summary = record.summary()
            if all(summary.get(k) == v for k, v in query.items()):
                out.append(summary if keys is None else {k: summary.get(k) for k in keys})
        return out
