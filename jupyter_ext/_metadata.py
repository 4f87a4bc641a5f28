"""Per-task metadata and the result of ``execute`` (what IPython Parallel users know)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kernel_engine.wire import parse_date

if TYPE_CHECKING:
    from typing import Self  # (3.11; only type checkers read it)

METADATA_KEYS = (
    "msg_id",
    "submitted",
    "started",
    "completed",
    "received",
    "engine_id",
    "engine_uuid",
    "status",
    "stdout",
    "stderr",
    "outputs",
    "execute_input",
    "execute_result",
    "error",
    "after",
    "follow",
    "label",
    "data",
)


_DEFAULTS: dict[str, Any] = dict.fromkeys(METADATA_KEYS)
_DEFAULTS.update(stdout="", stderr="")


def reply_date(value: Any) -> datetime | None:
    """A date of an engine's reply (an ISO 8601 string) as an aware ``datetime``, or None
    for anything else (a naive one could not be compared with the other parts' dates)."""
    when = parse_date(value) if type(value) is str else None
    return when if when is not None and when.tzinfo is not None else None


class Metadata(dict[str, Any]):
    """A task's metadata: a dict with attribute access (``md.stdout``).

    Keys: msg_id, submitted, started, completed, received (datetimes), engine_id,
    engine_uuid, status ('ok' / 'error' / None while pending), stdout, stderr, outputs
    (display_data contents), execute_input, execute_result, error, after, follow, label.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(_DEFAULTS)
        # (containers of its own: a user may change them in place)
        self["outputs"] = []
        self["after"] = []
        self["follow"] = []
        self["data"] = {}
        if args or kwargs:
            self.update(*args, **kwargs)

    @classmethod
    def many(cls, msg_ids: Sequence[str], engine_ids: Sequence[int], **common: Any) -> list[Self]:
        """The metadata of each ``(msg_id, engine_id)``, alike otherwise (``common``): a
        broadcast's parts, made at the cost of copying one dict each."""
        mine = {"msg_id", "engine_id", "outputs", "after", "follow", "data"}.intersection(common)
        if mine:
            raise TypeError(f"each part has its own {sorted(mine)}")
        template = dict(_DEFAULTS)
        template.update(common)
        new, update = cls.__new__, dict.update
        out = []
        for msg_id, engine_id in zip(msg_ids, engine_ids):
            md = new(cls)
            update(md, template)
            md["msg_id"] = msg_id
            md["engine_id"] = engine_id
            md["outputs"] = []
            md["after"] = []
            md["follow"] = []
            md["data"] = {}
            out.append(md)
        return out

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def update_from_reply(self, md: dict[str, Any]) -> None:
        """Merge an engine reply's metadata (dates parsed, its stdout is the whole stdout).

        What the engine says is checked by type: a date that is not an aware ISO 8601
        string reads as None, a text that is not a string is not taken, and its
        ``engine_id`` is taken only by a task whose engine was not known (a load-balanced
        one's, which the controller's route names first): an engine that named another
        engine, or a list, made the parts of a broadcast answered with it wait for ever,
        and left their msg_ids in the client's books of the engines they were sent to."""
        # (written out, not looped over the keys: a broadcast's replies pass here once a
        # part, and the loops cost a third of it)
        get = md.get
        value = get("started")
        if value:
            self["started"] = reply_date(value)
        value = get("completed")
        if value:
            self["completed"] = reply_date(value)
        value = get("engine_uuid")
        if type(value) is str:
            self["engine_uuid"] = value
        value = get("status")
        if type(value) is str:
            self["status"] = value
        value = get("stdout")
        if type(value) is str:
            self["stdout"] = value
        value = get("stderr")
        if type(value) is str:
            self["stderr"] = value
        value = get("engine_id")
        if type(value) is int and self.get("engine_id") is None:
            self["engine_id"] = value

    def duration(self) -> float:
        """Seconds the task ran on its engine (0 while unknown)."""
        started: datetime | None = self.get("started")
        completed: datetime | None = self.get("completed")
        if started and completed:
            return (completed - started).total_seconds()
        return 0.0


class ExecuteReply:
    """The result of ``execute`` on one engine: its execution count, result and outputs."""

    def __init__(self, msg_id: str, content: dict[str, Any], metadata: Metadata):
        self.msg_id = msg_id
        self._content = content
        self.metadata = metadata

    @property
    def execution_count(self) -> int | None:
        count: int | None = self._content.get("execution_count")
        return count

    @property
    def success(self) -> bool:
        return self._content.get("status") == "ok"

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self.metadata[key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"<ExecuteReply[{self.execution_count}]: {self._plaintext()[:60]}>"

    def _plaintext(self) -> str:
        result = self.metadata.get("execute_result") or {}
        return str(result.get("data", {}).get("text/plain", ""))

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        text = self._plaintext()
        if not text:
            return
        eid = self.metadata.get("engine_id")
        p.text(f"Out[{eid}:{self.execution_count}]: {text}")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        result = self.metadata.get("execute_result") or {}
        data = dict(result.get("data", {}))
        return data
