"""The hub: a record of every task the controller routed, in bounded memory.

Records hold what the controller saw (who submitted, which engine, when, the outcome)
and, for small results, the reply frames themselves, so another client can fetch them
(``Client.get_result``). Memory stays bounded: at most :attr:`Hub.max_records` records
(the oldest finished ones go first) and :attr:`Hub.max_result_bytes` of stored results.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kernel_engine import protocol


@dataclass
class TaskRecord:
    """What the hub knows of one request."""

    msg_id: str
    msg_type: str
    client: str
    engine_id: int | None
    submitted: str
    started: str | None = None
    completed: str | None = None
    status: str = "pending"
    label: str | None = None
    reply: list[bytes] | None = None
    reply_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The record as JSON, without the result frames."""
        return {
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "client_uuid": self.client,
            "engine_id": self.engine_id,
            "submitted": self.submitted,
            "started": self.started,
            "completed": self.completed,
            "status": self.status,
            "label": self.label,
            "result_stored": self.reply is not None,
            **self.extra,
        }


class Hub:
    """Task records keyed by msg_id, oldest first."""

    def __init__(
        self,
        max_records: int = 200_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        max_one_result: int = protocol.MAX_STORED_RESULT,
    ):
        self.max_records = max_records
        self.max_result_bytes = max_result_bytes
        self.max_one_result = max_one_result
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()
        self.result_bytes = 0

    def submitted(
        self, header: dict[str, Any], client: bytes, engine_id: int | None, label: str | None = None
    ) -> TaskRecord:
        record = TaskRecord(
            msg_id=str(header.get("msg_id", "")),
            msg_type=str(header.get("msg_type", "")),
            client=client.hex(),
            engine_id=engine_id,
            submitted=str(header.get("date") or protocol.utcnow_iso()),
            label=label,
        )
        self.records[record.msg_id] = record
        if len(self.records) > self.max_records:
            self._evict()
        return record

    def assigned(self, msg_id: str, engine_id: int) -> None:
        record = self.records.get(msg_id)
        if record is not None:
            record.engine_id = engine_id

    def completed(
        self, msg_id: str, status: str, metadata: dict[str, Any], frames: list[Any] | None
    ) -> None:
        """Record a task's outcome; keep its reply frames when they are small enough."""
        record = self.records.get(msg_id)
        if record is None:
            return
        record.status = status
        record.started = metadata.get("started", record.started)
        record.completed = metadata.get("completed") or protocol.utcnow_iso()
        if frames is None:
            return
        size = sum(len(f) for f in frames)
        if size <= self.max_one_result:
            record.reply = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames]
            record.reply_bytes = size
            self.result_bytes += size
            while self.result_bytes > self.max_result_bytes:
                if not self._drop_oldest_result():
                    break

    def _drop_oldest_result(self) -> bool:
        for record in self.records.values():
            if record.reply is not None:
                self.result_bytes -= record.reply_bytes
                record.reply = None
                record.reply_bytes = 0
                return True
        return False

    def _evict(self) -> None:
        for msg_id, record in self.records.items():
            if record.status != "pending":
                self._forget(msg_id)
                return
        self.records.popitem(last=False)

    def _forget(self, msg_id: str) -> None:
        record = self.records.pop(msg_id, None)
        if record is not None and record.reply is not None:
            self.result_bytes -= record.reply_bytes

    def purge(self, msg_ids: list[str] | None, engine_ids: list[int] | None = None) -> int:
        """Forget finished records: the given ones, those of the engines, or all (None)."""
        if msg_ids is None and engine_ids is None:
            chosen = [m for m, r in self.records.items() if r.status != "pending"]
        else:
            chosen = [m for m in (msg_ids or []) if m in self.records]
            if engine_ids:
                wanted = set(engine_ids)
                chosen += [m for m, r in self.records.items() if r.engine_id in wanted]
            chosen = [m for m in chosen if self.records[m].status != "pending"]
        for msg_id in chosen:
            self._forget(msg_id)
        return len(chosen)

    def history(self) -> list[str]:
        return list(self.records)

    def query(self, keys: dict[str, Any]) -> list[dict[str, Any]]:
        """Records whose fields equal the given values (``{"engine_id": 0}``), as JSON."""
        out = []
        for record in self.records.values():
            summary = record.summary()
            if all(summary.get(k) == v for k, v in keys.items()):
                out.append(summary)
        return out
