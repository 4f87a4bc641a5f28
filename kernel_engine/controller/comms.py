"""Frontend comm messages on their way to engines: bounded per engine.

A widget's ``comm_msg``/``comm_close`` from a frontend goes to its engine's shell and no
reply comes. The engine's kernel reads its shell only between tasks, so while it runs a
task everything posted to it waits in its queue and in the controller's. Each message is
counted from its post until the kernel has handled it (its ``status: idle`` on iopub names
it as parent); at most :data:`MAX_MESSAGES` messages or :data:`MAX_BYTES` bytes wait for
one engine, and what is past that is dropped (a frontend re-sends a widget's state with
its next change). Pure bookkeeping: the controller feeds it.
"""

from __future__ import annotations

from typing import Any

from kernel_engine import wire

MAX_MESSAGES = 256
MAX_BYTES = 16 * 2**20


class CommPosts:
    """Comm messages posted to each engine and not handled yet."""

    def __init__(self, max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BYTES):
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._waiting: dict[int, dict[str, int]] = {}  # engine -> msg_id -> size
        self._bytes: dict[int, int] = {}

    def admit(self, eid: int, msg_id: str, size: int) -> str | None:
        """Count a message for engine ``eid``; None, or why it must be dropped."""
        waiting = self._waiting.setdefault(eid, {})
        held = self._bytes.get(eid, 0)
        if len(waiting) >= self.max_messages or held + size > self.max_bytes:
            return (
                f"a comm message for engine {eid} dropped: {len(waiting)} messages "
                f"({held >> 10} KiB) wait for it already (it is busy)"
            )
        waiting[msg_id] = size
        self._bytes[eid] = held + size
        return None

    def waiting(self, eid: int) -> bool:
        """Whether messages wait for engine ``eid`` (its iopub is then looked at)."""
        return bool(self._waiting.get(eid))

    def seen(self, eid: int, frames: list[Any]) -> None:
        """An iopub message of engine ``eid``: a ``status: idle`` whose parent is a
        message waiting for it ends that message's wait."""
        parent = idle_parent(frames)
        waiting = self._waiting.get(eid)
        if parent is None or not waiting or parent not in waiting:
            return
        self._bytes[eid] -= waiting.pop(parent)
        if not waiting:
            del self._waiting[eid], self._bytes[eid]

    def forget(self, eid: int) -> None:
        """Engine ``eid`` is gone, and what waited for it with it."""
        self._waiting.pop(eid, None)
        self._bytes.pop(eid, None)


def idle_parent(frames: list[Any]) -> str | None:
    """The parent msg_id of an iopub ``status: idle`` message (``frames``: topic,
    delimiter, signature, header, parent, ...), or None for any other message."""
    at = wire.delimiter_at(frames)
    if at < 0 or len(frames) < at + 6:
        return None
    if b'"status"' not in wire.as_bytes(frames[at + 2]) or b'"idle"' not in wire.as_bytes(
        frames[at + 5]
    ):
        return None
    try:
        header = wire.loads_json(wire.as_bytes(frames[at + 2]), "header")
        parent = wire.loads_json(wire.as_bytes(frames[at + 3]), "parent")
    except wire.MessageError:
        return None
    if not isinstance(header, dict) or header.get("msg_type") != "status":
        return None
    msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
    return msg_id if isinstance(msg_id, str) else None
