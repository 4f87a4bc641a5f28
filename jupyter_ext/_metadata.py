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
        """Merge an engine reply's metadata (dates parsed, its stdout is the whole stdout)."""
        # (written out, not looped over the keys: a broadcast's replies pass here once a
        # part, and the loops cost a third of it)
        get = md.get
        value = get("started")
        if value:
            self["started"] = parse_date(value)
        value = get("completed")
        if value:
            self["completed"] = parse_date(value)
        value = get("engine_uuid")
        if value is not None:
            self["engine_uuid"] = value
        value = get("status")
        if value is not None:
            self["status"] = value
        value = get("stdout")
        if value is not None:
            self["stdout"] = value
        value = get("stderr")
        if value is not None:
            self["stderr"] = value
        value = get("engine_id")
        if value is not None:
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
