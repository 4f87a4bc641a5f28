"""Task records in one SQLite file, written by one thread in batches off the hot path.

Threads. The callers (the controller's event loop) only touch memory: :meth:`SqliteLog.put`
checks the fields and appends them to a queue (a ``deque``: no lock). One writer thread,
``px-store-writer``, owns the writing connection: at most every ``batch_interval`` seconds
it takes what is queued, merges the puts of each msg_id and writes them in one
transaction, up to 64 records of one shape in one upsert (one statement for many records:
Python's sqlite3 lets go of the GIL once for them, not twice for each). The new record of
a task that waits in the controller's queue (:meth:`SqliteLog.put_queued`) is held back
until an engine takes it (:meth:`SqliteLog.taken`), or for :data:`HOLD` seconds at most:
a task that runs soon is then written once, whole, not inserted and updated. Reads run
on the calling thread over a second, read-only connection, once a barrier they queued has
been passed, so a read sees every put made before it, from any thread. Purges queue too
and run in the writer, in order.

Backpressure. When ``max_pending`` items or ``max_pending_bytes`` of frames and output
wait in the queue, the writer is behind: ``put`` then blocks until the writer takes them.
The callers slow down to the disk's pace, memory stays flat and no record is dropped;
``blocked_seconds`` tells how long callers waited.

Crash safety. WAL journal, ``synchronous=NORMAL``: a committed batch survives the process
being killed (not a power loss: that needs an ``fsync`` per batch). What a killed process
had not committed is lost: its last ``batch_interval`` of puts, and the records of tasks
that were still queued, no engine having taken them, for less than :data:`HOLD` seconds
(their clients are told the controller was lost; no engine ran them). A file that is not a
task database, or is damaged, raises :class:`StoreError` naming it.

Retention. Records finished more than ``max_age`` ago are deleted every few seconds.
Once the live pages and blob files plus room for the next batch pass 95% of ``max_bytes``
(database, WAL and blob files together), each batch first deletes the records finished
longest ago, a quarter more than it brings, until they fit in 85% of it; only a batch
that would not fit under ``max_bytes`` waits for more deletions. SQLite reuses the freed
pages, so the file stops growing without being rewritten. Pages go back to the file
system (``incremental_vacuum``, in steps that yield to writes) only when the file is over
``max_bytes`` (a lower limit than it was written with) or a quarter of it is free (after
a purge). A pending record is never deleted.

Schema. ``tasks``: one row per msg_id; ``seq`` (the rowid) numbers records in the order
of their first put, for the history; the queryable keys as columns (:mod:`.query`);
``done_at``, when the record was seen finished (NULL while pending; indexed, for retention
and :meth:`SqliteLog.pending`); the request's and the reply's frames, each packed into one
blob, inline up to ``blob_threshold`` bytes. Larger ones go to a file of their own,
``<seq>.0`` (request) or ``<seq>.1`` (reply) in the folder ``<database>-blobs``, written
with one ``writev`` of the frames before the batch naming it commits. SQLite would copy
a big blob into its pages, into the WAL, and at the checkpoint into the database file (and
``fsync`` it): about 480 ms of CPU per 64 MiB here, where the file costs 120 to 180 ms
(``benchmarks/store_bench.py``, its ``big`` rows). Scans of ``tasks`` stay small too.
Triggers name the files of deleted records (and of dropped replies) in the ``gone``
table; the writer removes them once that has committed. A file no record names (a batch
that never committed) is removed when the store opens. Frames larger than
``max_frames_bytes`` are not stored at all (the record is), nor held in the queue.
A request's buffer of 256 bytes to 256 KiB that the writer has seen lately (an apply's
pickled function: the same in every task of a map, a third of a tiny task's record) is
kept once per content in ``shared`` (found by its BLAKE2b digest, with a count
of the records naming it), not in each record (see :data:`_SHARED`).

Trust. The database file is the controller's (0600), and whoever can write it can forge
results anyway; still, nothing read from it names a file outside the blob folder (names
are checked: ``<integer>.<0|1>``), the folder must be a directory of this user's that
nobody else can write to and that holds the marker :data:`BLOB_MARKER` (a folder of that
name someone else made is refused, not cleaned), only regular files of our names are
ever removed, and a blob file that cannot be read (cut short, not a regular file) is
logged and read as no frames. Files are named by ``seq``, which a database restored
from an older copy may number again: each file starts with its record's msg_id, checked
when it is read, so a record is never given another's file. Known limit: a second put of
a record's big frames replaces its file before the batch commits (the controller puts a
record's request, and its reply, once).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import operator
import os
import re
import sqlite3
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kernel_engine import wire
from kernel_engine.controller import query as q
from kernel_engine.errors import StoreError

__all__ = ["MAX_OUTPUT", "STATUSES", "SqliteLog", "StoreError", "StoreUnusable", "pack", "unpack"]

log = logging.getLogger(__name__)


class StoreUnusable(StoreError):
    """The store cannot be used where it is (its blob folder): the database itself is not
    damaged, so it is not to be moved aside."""


PENDING = "pending"
STATUSES = frozenset({PENDING, "ok", "error", "aborted", "unknown"})
APPLICATION_ID = 0x70784442  # "pxDB", in the file's header
SCHEMA_VERSION = 3
MAX_OUTPUT = 1 << 20
TRUNCATED = "\n[output truncated]\n"
MAINTENANCE_INTERVAL = 5.0
READ_TIMEOUT = 60.0
BATCH_INTERVAL = 0.05
"""Seconds between the writer's commits while puts come. Longer batches cost the writer
less per task (about 20% less at 0.2 s with load-balanced tiny tasks), but what a killed
controller had not committed is lost, and a restarted one can end a task in flight only
if its record reached the file: at 0.2 s, the records of tasks an engine took just before
the controller was killed were missing after the restart (their kept replies then had no
record to go to)."""
IDLE_AFTER = 1.0  # seconds without puts after which the writer sleeps until woken
HOLD = 2.0
"""Seconds at most that the new record of a task waiting in the controller's queue is held
back before it is written (:meth:`SqliteLog.put_queued`). A load-balanced map's tasks wait
about that long at most for an engine at 1,000 tasks/s: each then costs one insert instead
of an insert and an update, about a third of the writer's time per task."""
MAX_HELD = 20_000
"""New records of queued tasks held back at most (a fourth of ``max_pending_bytes`` of their
frames, too): past it, the oldest are written at once. Their frames are the queued
requests' own (the scheduler's queue has them anyway); a held record costs about 600 bytes
beside them. A load-balanced map queues its tasks faster than engines take them: bound by
``max_pending`` (5,000), as it was, 56% of a 10,000-task map's records were written
pending, then updated."""
PAGE_SIZE = 16384
"""The page size of a new database file (one written before keeps its own). SQLite's
default, 4 KiB, costs the writer about half again as much per tiny task's record in
commits and checkpoints (each page is a WAL frame of its own: two writes, a checksum and
an index entry, then a copy at the checkpoint): records are appended, a batch's pages are
new and full, so larger pages mean fewer of them for the same bytes. A change to one old
record (a late reply, output) writes its whole page to the WAL again; a batch's changes
to records of one page are written once."""
WAL_BYTES = 16 << 20
"""Bytes of WAL at most between checkpoints (a 64th of ``max_bytes`` when that is less,
64 KiB at least)."""
VACUUM_STEP = 16 << 20
"""Bytes given back to the file system in one step (writes waiting stop the giving back
between steps)."""
SMALL_LIMIT = 64 << 20
"""Below this ``max_bytes``, a new file keeps SQLite's 4 KiB pages: a commit's pages (the
table's, each index's) and the WAL would take too large a share of the limit."""
HIGH, LOW = 0.95, 0.85
RECORD_BYTES = 256  # a record's size without its frames, to make room for a batch
BIG_STEP = 16
"""Records deleted at a time to make room while blob files hold most of the bytes."""

_GONE = """
CREATE TABLE gone (name TEXT NOT NULL);
CREATE TRIGGER tasks_gone AFTER DELETE ON tasks WHEN old.request_big OR old.result_big
BEGIN
    INSERT INTO gone SELECT old.seq || '.0' WHERE old.request_big;
    INSERT INTO gone SELECT old.seq || '.1' WHERE old.result_big;
END;
CREATE TRIGGER request_gone AFTER UPDATE OF request_big ON tasks
WHEN old.request_big AND NOT new.request_big
BEGIN INSERT INTO gone VALUES (old.seq || '.0'); END;
CREATE TRIGGER result_gone AFTER UPDATE OF result_big ON tasks
WHEN old.result_big AND NOT new.result_big
BEGIN INSERT INTO gone VALUES (old.seq || '.1'); END;
"""
"""The blob files of records deleted, or whose frames were dropped: named in ``gone`` in
the transaction that does it, removed once it has committed (:meth:`SqliteLog._unlink_gone`)."""

_SHARED = """
CREATE TABLE shared (
    id INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL UNIQUE,
    refs INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL
);
CREATE INDEX shared_unused ON shared(refs) WHERE refs <= 0;
CREATE TRIGGER shared_gone AFTER DELETE ON tasks WHEN old.request_shared > 0
BEGIN UPDATE shared SET refs = refs - 1 WHERE id = old.request_shared; END;
CREATE TRIGGER shared_replaced AFTER UPDATE OF request_shared ON tasks
WHEN old.request_shared > 0
BEGIN UPDATE shared SET refs = refs - 1 WHERE id = old.request_shared; END;
"""
"""A buffer of a request that the writer has seen before (an apply's pickled function, the
same in each task of a map) is kept once per content in ``shared``; a record names it by
``request_shared`` (0: none) and its place among the request's frames by
``request_shared_at``. The writer adds a reference for each record it writes naming one;
the triggers take away the references of records deleted or rewritten, and rows left with
none are deleted with them (:meth:`SqliteLog._drop_unshared`). Ids are never used again
(AUTOINCREMENT): a record whose row is gone reads as missing frames, never as another
function."""

_SCHEMA = f"""
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL UNIQUE,
    msg_type TEXT, client_uuid TEXT, engine_id INTEGER, engine_uuid TEXT, label TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    submitted REAL, started REAL, completed REAL, received REAL, resubmitted TEXT,
    done_at REAL, request_big INTEGER NOT NULL DEFAULT 0, result_big INTEGER NOT NULL DEFAULT 0,
    after TEXT, follow TEXT, stdout TEXT, stderr TEXT, request BLOB, result BLOB,
    request_shared INTEGER NOT NULL DEFAULT 0, request_shared_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_done ON tasks(done_at);
{_GONE}
{_SHARED}
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

_TYPES: dict[str, type] = {
    **{k: str for k in ("msg_type", "client_uuid", "engine_uuid", "label", "resubmitted")},
    **{k: float for k in q.DATES},
    "status": str,
    "engine_id": int,
    **{k: list for k in ("after", "follow", "request", "result")},
}
"""The fields of a record and their type (dates may also be ints, lists tuples)."""
_NULLABLE = frozenset({"engine_id", "engine_uuid", "label", "resubmitted", *q.DATES})
_FRAMES = ("request", "result")
_TEXT = ("msg_type", "client_uuid", "engine_uuid", "label", "resubmitted")
_SPECIAL = frozenset({"after", "follow", *_FRAMES})
"""Fields whose value the writer turns into what it binds (JSON, or blobs and flags)."""
_MADE = {
    "request": ("request", "request_big", "request_shared", "request_shared_at"),
    "result": ("result", "result_big"),
}
"""The columns a record's frames are written to."""
_CHUNK = 64
"""Records upserted by one statement at most (fewer if they would bind more than
:data:`_MAX_PARAMS` values)."""
_MAX_PARAMS = 999  # (the least SQLITE_MAX_VARIABLE_NUMBER of any SQLite build)
_LEN_IS_BYTES = wire.LEN_IS_BYTES
"""Frame types whose ``len`` is their size in bytes (a memoryview's counts items)."""
_MAX_INT = 2**53
_APPEND = (
    "UPDATE tasks SET {n} = CASE "
    "WHEN length(coalesce({n}, '')) >= ?3 THEN {n} "
    "WHEN length(coalesce({n}, '')) + length(?2) <= ?3 THEN coalesce({n}, '') || ?2 "
    "ELSE substr(coalesce({n}, '') || ?2, 1, ?3) || ?4 END WHERE msg_id = ?1"
)
_FRAMES_SQL = "CASE WHEN t.{name}_big THEN t.seq || '.{kind}:' || t.msg_id ELSE t.{name} END"
"""A record's request or reply frames: the packed blob, or ``<blob file>:<msg_id>``."""
_SHARED_SQL = (
    "CASE WHEN t.request_shared != 0 THEN "
    "coalesce((SELECT s.data FROM shared s WHERE s.id = t.request_shared), x'') END",
    "t.request_shared_at",
)
"""A request's shared frame (NULL if it has none, ``b""`` if it is missing: a crafted
file) and its place."""
SHARED_MIN, SHARED_MAX = 256, 256 << 10
SHARED_SLOTS = range(4, 8)
"""A request's buffers that may be shared: its first four (frames 4 to 7: an apply's
function is its first, a map's the third), of :data:`SHARED_MIN` bytes at least (a
tiny task's arguments are smaller: not worth a copy and a lookup each) and at most
:data:`SHARED_MAX` and ``blob_threshold`` (a bigger one, a closure over big data, goes
with its record)."""
SHARED_CACHE = 256
SHARED_CACHE_BYTES = 4 << 20
"""The writer remembers the contents of this many buffers (of these bytes at most), with
the id of their ``shared`` row if they have one: a buffer seen again is shared, and a
map's function maps to its id without a lookup in the file."""
_HEADS: dict[int, struct.Struct] = {}
_EMPTY = bytearray()  # (never changed: only joins with it, and it is bound as an empty blob)
BLOB_SUFFIX = "-blobs"
"""The folder of a database's blob files is its path with this added."""
_BLOB_NAME = re.compile(r"[0-9]+\.[01](\.part)?")
_GONE_NAME = re.compile(r"[0-9]+\.[01]")
BLOB_MARKER = ".jupyter-px-blobs"
"""The file that makes a folder a task database's blob folder (see ``_check_blob_dir``)."""
EARLY_OUTPUT_SECONDS = 30.0
EARLY_OUTPUT_CHARS = 4 << 20
_OUTPUT = object()  # queue tags other than a msg_id (a put) or a 1-tuple of one (held)
_TAKEN = object()
_BARRIER = object()
_OP = object()


def _sizes(frames: Sequence[Any]) -> list[int]:
    """The frames' sizes in bytes (``len`` where it counts bytes: cheaper)."""
    if _LEN_IS_BYTES.issuperset(map(type, frames)):
        return list(map(len, frames))
    return [memoryview(f).nbytes for f in frames]  # (TypeError: not bytes-like)


def _flat(frame: Any) -> Any:
    """A frame whose ``len`` is its size in bytes: a flat view of a buffer of another kind
    (TypeError if not bytes-like; one that is not contiguous stays as it is, and the
    writer, which cannot join it, logs it as not stored)."""
    if type(frame) in _LEN_IS_BYTES:
        return frame
    view = memoryview(frame)
    return view.cast("B") if view.c_contiguous else view


class _Oversize(list):  # type: ignore[type-arg]
    """Frames that :meth:`SqliteLog.put` found larger than ``blob_threshold``, packed: for
    a blob file (unless the writer shares a buffer of them); any other frames go inline."""

    __slots__ = ()


def pack(frames: Sequence[Any], sizes: list[int] | None = None) -> bytes:
    """Frames as one blob: their count, their sizes, then their bytes."""
    if sizes is None:
        sizes = _sizes(frames)
    return b"".join((_head(sizes), *frames))


def _pack(frames: Sequence[Any], sizes: list[int]) -> bytearray:
    """:func:`pack` as a ``bytearray``, which Python's sqlite3 binds as a blob at once:
    a ``bytes`` goes through its adapter lookup first (about a microsecond each)."""
    return _EMPTY.join((_head(sizes), *frames))


def _head(sizes: list[int]) -> bytes:
    """The head of the blob of frames of these sizes: their count, then the sizes."""
    n = len(sizes)
    head = _HEADS.get(n)
    if head is None:
        head = struct.Struct(f"<I{n}Q")
        if n < 64:
            _HEADS[n] = head
    return head.pack(n, *sizes)


def unpack(blob: bytes, start: int = 0) -> list[bytes]:
    """The frames :func:`pack` packed, from ``blob[start:]`` (ValueError if that is not
    what it made: a file cut short, say)."""
    (n,) = struct.unpack_from("<I", blob, start)
    at = start + 4 + 8 * n
    sizes = struct.unpack_from(f"<{n}Q", blob, start + 4)
    if at + sum(sizes) != len(blob):
        expected = at - start + sum(sizes)
        raise ValueError(f"{len(blob) - start} bytes, not the {expected} its head says")
    out = []
    for size in sizes:
        out.append(blob[at : at + size])
        at += size
    return out


def _clean_text(value: str) -> str:
    """``value`` as valid Unicode (a lone surrogate from JSON would fail in SQLite)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def _json(frame: bytes | None) -> Any:
    if frame is None:
        return None
    try:
        return json.loads(frame)
    except ValueError:
        return None


def _convert(key: str, value: Any) -> Any:
    """``value`` of a field whose type is not exactly the usual one: checked, converted."""
    kind = _TYPES.get(key)
    if kind is None:
        raise TypeError(f"unknown record field {key!r}")
    if value is None:
        if key in _NULLABLE:
            return None
        raise ValueError(f"{key!r} cannot be None")
    if (kind is float and type(value) is int) or (kind is int and isinstance(value, int)):
        if not isinstance(value, bool):
            return kind(value)
    elif kind is list and isinstance(value, tuple):
        return list(value)
    elif kind is str and isinstance(value, str):
        return str(value)
    raise TypeError(f"{key!r} must be {kind.__name__}, not {type(value).__name__}")


class _Batch:
    """What the writer takes from the queue in one go, merged."""

    __slots__ = ("barriers", "nbytes", "op", "outputs", "records", "seqs")

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.seqs: dict[str, int] = {}  # each record's seq, given when first taken
        self.outputs: dict[tuple[str, str], list[Any]] = {}  # [length, *texts]
        self.barriers: list[concurrent.futures.Future[int]] = []
        self.op: tuple[Callable[[sqlite3.Connection], int], concurrent.futures.Future[int]]
        self.op = None  # type: ignore[assignment]
        self.nbytes = 0


class _Plan:
    """How the writer writes the records of one shape (their fields, in order, and which
    are None): the values a record binds, and the upsert of 1 to :data:`_CHUNK` records
    at a time (see :meth:`SqliteLog._plan`)."""

    __slots__ = (
        "columns",
        "get",
        "lists",
        "new",
        "request",
        "result",
        "shared_at",
        "statements",
        "status",
        "update",
        "width",
    )

    def __init__(self, keys: Sequence[str], nulls: Sequence[bool]) -> None:
        plain = [k for k, null in zip(keys, nulls) if not null and k not in _SPECIAL]
        self.get: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            operator.itemgetter(*plain) if len(plain) > 1 else _getter(plain)
        )
        self.status = "status" in plain
        self.lists = tuple(k for k in keys if k in ("after", "follow"))
        self.request = "request" in keys
        self.result = "result" in keys
        # a record's values, in order: seq, msg_id, the plain fields', then what the
        # writer makes (done_at, the lists' JSON, each frames' blob and flags)
        made = ["done_at"] * self.status + list(self.lists)
        for key in _FRAMES:
            if key in keys:
                made += _MADE[key]
        at = {k: 3 + i for i, k in enumerate([*plain, *made])}
        self.width = 2 + len(plain) + len(made)
        self.shared_at = at["request_shared"] - 1 if self.request else -1
        # (column, SQL of its value, with {} for the number of each parameter it uses)
        self.columns: list[tuple[str, str, tuple[int, ...]]] = []
        for key, null in zip(keys, nulls):
            if null:
                self.columns.append((key, "NULL", ()))
                continue
            for name in _MADE.get(key, (key,)):
                self.columns.append((name, "?{}", (at[name],)))
            if key == "status":
                term = "iif(?{} = 'pending', NULL, ?{})"
                self.columns.append(("done_at", term, (at["status"], at["done_at"])))
        # a new record (its first put names its msg_type) never replaces one in the file
        self.new = "msg_type" in keys or not self.columns
        self.update = ", ".join(f"{c} = excluded.{c}" for c, _, _ in self.columns)
        self.statements: dict[int, str] = {}

    def statement(self, rows: int) -> str:
        """The upsert of ``rows`` records (their values one after the other)."""
        sql = self.statements.get(rows)
        if sql is None:
            names = "".join(f", {c}" for c, _, _ in self.columns)
            values = []
            for row in range(rows):
                first = row * self.width
                terms = [f"?{first + 1}", f"?{first + 2}"]
                terms += [term.format(*(first + i for i in at)) for _, term, at in self.columns]
                values.append(f"({', '.join(terms)})")
            sql = self.statements[rows] = (
                f"INSERT INTO tasks (seq, msg_id{names}) VALUES {', '.join(values)} "
                "ON CONFLICT (msg_id) DO "
                + ("NOTHING" if self.new else f"UPDATE SET {self.update}")
            )
        return sql


class _Rows:
    """The values of the records of one :class:`_Plan` in a batch, one after the other,
    and which of them name a shared buffer (its place among the values is set once the
    buffer's id is known: see :meth:`SqliteLog._write`)."""

    __slots__ = ("params", "shared_keys", "shared_rows")

    def __init__(self) -> None:
        self.params: list[Any] = []
        self.shared_rows: list[int] = []
        self.shared_keys: list[bytes] = []


def _getter(keys: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The values of these keys of a record, as a tuple (``itemgetter`` of one key gives
    the value alone)."""
    if not keys:
        return lambda fields: ()
    (key,) = keys
    return lambda fields: (fields[key],)


def _check_id(msg_id: Any) -> None:
    """A msg_id the writer can bind (a lone surrogate, which JSON lets through, failed the
    writer, and with it every later put and read)."""
    if type(msg_id) is not str:
        raise TypeError(f"msg_id must be a string, not {type(msg_id).__name__}")
    if not wire.is_unicode(msg_id):
        raise ValueError(f"msg_id {msg_id!a} is not valid Unicode")


class SqliteLog:
    """Task records persisted in the SQLite file ``path`` (see the module docstring).

    Parameters
    ----------
    path
        The database file; created (mode 0600) if missing.
    max_bytes
        Bound on the database, WAL and blob files together (None: unbounded).
    max_age
        Seconds a finished record is kept (None: forever).
    blob_threshold
        Request or reply frames larger than this (packed) go to a file of their own.
    batch_interval
        The writer commits at most this often (seconds).
    max_pending, max_pending_bytes
        When this many puts, or bytes of frames, wait for the writer, ``put`` blocks.
    max_held
        New records of queued tasks held back at most (see :data:`MAX_HELD`).
    max_frames_bytes
        Frames larger than this are not stored (the record is, without them); at most an
        eighth of ``max_bytes``.
    maintenance_interval
        How often (seconds) old records are deleted and free pages given back.
    """

    MAX_OUTPUT = MAX_OUTPUT
    """Characters of stdout (and of stderr) one record keeps."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int | None = 1 << 30,
        max_age: float | None = 7 * 86400.0,
        blob_threshold: int = 64 * 1024,
        batch_interval: float = BATCH_INTERVAL,
        max_pending: int = 5_000,
        max_pending_bytes: int = 32 << 20,
        max_frames_bytes: int = 256 << 20,
        maintenance_interval: float = MAINTENANCE_INTERVAL,
        max_held: int = MAX_HELD,
    ):
        self.path = os.fspath(path)
        self.blob_dir = self.path + BLOB_SUFFIX
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.blob_threshold = blob_threshold
        self.batch_interval = batch_interval
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_held = max_held
        # (one record may take at most an eighth of the bound: else storing it would
        # delete every other finished record, or not fit at all)
        self.max_frames_bytes = (
            max_frames_bytes if max_bytes is None else min(max_frames_bytes, max_bytes // 8)
        )
        self.maintenance_interval = maintenance_interval
        self.blocked_seconds = 0.0
        self._queue: deque[tuple[Any, Any, int]] = deque()
        self._bytes_in = self._bytes_out = 0  # frames queued, frames taken
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits on it
        self._done = threading.Condition(self._lock)  # blocked callers wait on it
        self._idle = self._urgent = self._stopped = self._closed = False
        self._starting = True
        self._trimming = False  # deleting old records to keep under max_bytes
        self._row_bytes = 1.0  # bytes per record, measured when trimming starts
        self._shrink_until: int | None = None  # free pages to leave, while giving back
        self._error: BaseException | None = None
        self._read_lock = threading.Lock()
        self._lookup_lock = threading.Lock()
        self._plans: dict[Any, _Plan] = {}
        self._reused: set[str] = set()  # msg_ids a new record could not have (see _write)
        # the writer's: new records held back (put_queued): msg_id -> (since, seq, size, fields)
        self._held: OrderedDict[str, tuple[float, int, int, dict[str, Any]]] = OrderedDict()
        self._held_bytes = 0
        # the writer's: output whose record was not written yet, (msg_id, name) -> (since, text)
        self._early: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._early_chars = 0
        self._blob_bytes = 0  # the blob files' sizes, kept by the writer
        # the writer's: buffers seen lately -> their shared id (0: none yet), latest last
        self._shared_ids: OrderedDict[bytes, int] = OrderedDict()
        self._shared_last = b""  # (the buffer last found there)
        self._shared_bytes = 0
        self._shared_max = min(SHARED_MAX, blob_threshold)
        self._con = self._open()
        try:
            self._reader = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            self._lookup = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            for reader in (self._reader, self._lookup):
                reader.execute("PRAGMA query_only = 1")
                reader.execute("PRAGMA cache_size = -4000")
        except sqlite3.Error as exc:
            self._con.close()
            raise StoreError(self.path, str(exc)) from exc
        self._seq = self._con.execute("SELECT coalesce(max(seq), 0) + 1 FROM tasks").fetchone()[0]
        page = self._page_size = self._con.execute("PRAGMA page_size").fetchone()[0]
        # a larger WAL means fewer checkpoints, each with two fsyncs; keep it a 64th of the limit
        wal_bytes = (
            WAL_BYTES if max_bytes is None else max(64 << 10, min(WAL_BYTES, max_bytes // 64))
        )
        wal_pages = max(1, wal_bytes // page)
        self._wal_limit = wal_pages * page
        # a batch also stays near a 64th of the limit (at 512 bytes a record), or a loaded
        # machine's long batches would overshoot a small limit before it is trimmed
        self._batch_records = (
            max_pending if max_bytes is None else min(max_pending, max(64, max_bytes // 32768))
        )
        for pragma in (
            "synchronous = NORMAL",
            "temp_store = MEMORY",
            "cache_size = -16000",
            f"wal_autocheckpoint = {wal_pages}",
            f"journal_size_limit = {self._wal_limit}",
        ):
            self._con.execute(f"PRAGMA {pragma}")
        self._thread = threading.Thread(target=self._run, name="px-store-writer", daemon=True)
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        con = None
        try:
            con = sqlite3.connect(
                self.path,
                timeout=10,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if app_id == 0 and not tables:
                small = self.max_bytes is not None and self.max_bytes < SMALL_LIMIT
                page = 4096 if small else PAGE_SIZE
                con.execute(f"PRAGMA page_size = {page}")  # (both before the first table)
                con.execute("PRAGMA auto_vacuum = INCREMENTAL")
                con.execute("PRAGMA journal_mode = WAL")
                con.executescript(_SCHEMA)
            elif app_id != APPLICATION_ID:
                raise StoreError(self.path, "not a jupyter-px task database")
            else:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version == 1 and {"tasks", "blobs"} <= tables:
                    self._upgrade(con)
                    version, tables = 2, {"tasks", "gone"}
                if version == 2 and {"tasks", "gone"} <= tables and "shared" not in tables:
                    con.executescript(
                        "BEGIN; ALTER TABLE tasks ADD COLUMN request_shared INTEGER NOT NULL"
                        " DEFAULT 0; ALTER TABLE tasks ADD COLUMN request_shared_at INTEGER"
                        f" NOT NULL DEFAULT 0; {_SHARED} PRAGMA user_version = 3; COMMIT;"
                    )
                    log.info("task database %s: upgraded to version 3", self.path)
                elif version != SCHEMA_VERSION or not {"tasks", "gone", "shared"} <= tables:
                    raise StoreError(self.path, f"unknown task database version {version}")
            if con.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreError(self.path, "cannot use the WAL journal here")
            # a damaged file fails here rather than halfway through a batch
            bad = con.execute("PRAGMA quick_check(1)").fetchone()[0]
            if bad != "ok":
                raise StoreError(self.path, f"the database is damaged: {bad}")
            self._con = con
            self._open_blobs()
            return con
        except BaseException as exc:
            if con is not None:
                con.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(self.path, f"{exc} (move it aside to start afresh)") from exc
            raise

    def _upgrade(self, con: sqlite3.Connection) -> None:
        """A file of version 1, which kept big frames in a ``blobs`` table: move them to
        files and make it version 2 (then 3), in one transaction (the files first: should this be
        killed, the next open starts again and removes what it wrote)."""
        self._check_blob_dir()
        rows = con.execute(
            "SELECT t.seq, b.kind, b.data, t.msg_id FROM blobs b JOIN tasks t "
            "ON t.msg_id = b.msg_id WHERE typeof(t.seq) = 'integer' AND b.kind IN (0, 1) "
            "AND typeof(b.data) = 'blob' AND typeof(t.msg_id) = 'text'"
        )
        for seq, kind, data, msg_id in rows:
            self._write_blob(f"{int(seq)}.{int(kind)}", msg_id, [data], packed=True)
        con.executescript(
            "BEGIN; DROP TRIGGER IF EXISTS tasks_blobs; DROP TRIGGER IF EXISTS request_blob;"
            " DROP TRIGGER IF EXISTS result_blob; DROP TABLE blobs;"
            f" {_GONE}; PRAGMA user_version = 2; COMMIT;"
        )
        log.info("task database %s: upgraded to version 2", self.path)

    def _open_blobs(self) -> None:
        """Check the blob folder; remove the blob files no record names (and those
        ``gone`` names); count the others' bytes."""
        self._check_blob_dir()
        self._unlink_gone()
        self._count_blobs(remove=True)

    def _count_blobs(self, remove: bool = False) -> None:
        """Count the blob files' bytes again (files removed by hand drift the count);
        ``remove``: also remove those no record names (only regular files of our names)."""
        live = None
        if remove:
            live = {
                f"{seq}.{kind}"
                for kind, name in enumerate(_FRAMES)
                for (seq,) in self._con.execute(f"SELECT seq FROM tasks WHERE {name}_big")
            }
        total = 0
        try:
            entries = os.scandir(self.blob_dir)
        except OSError as exc:  # (removed by hand: its files are gone with it)
            log.warning("task database %s: %s", self.path, exc)
            self._blob_bytes = 0
            return
        with entries:
            for entry in entries:
                if not _BLOB_NAME.fullmatch(entry.name):  # (nothing else is ours)
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if live is None or entry.name in live:
                        total += entry.stat(follow_symlinks=False).st_size
                    else:
                        os.unlink(entry.path)
                except OSError as exc:
                    log.warning("task database %s: blob file %s: %s", self.path, entry.name, exc)
        self._blob_bytes = total

    def _check_blob_dir(self) -> None:
        """Make the blob folder (private, with its marker file), or check the one there:
        a directory of this user's that no one else may write to, not a link, holding the
        marker (a folder of that name made by someone else is not ours to clean)."""
        marker = os.path.join(self.blob_dir, BLOB_MARKER)
        try:
            os.mkdir(self.blob_dir, 0o700)
            made = True
        except FileExistsError:
            made = False
        except OSError as exc:
            raise StoreUnusable(self.path, f"cannot make {self.blob_dir}: {exc}") from exc
        found = os.lstat(self.blob_dir)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o022:
            raise StoreUnusable(
                self.path,
                f"{self.blob_dir} is not a directory of this user's that only it can write to",
            )
        if not made and not os.path.lexists(marker):
            with os.scandir(self.blob_dir) as entries:
                if any(True for _ in entries):
                    raise StoreUnusable(
                        self.path,
                        f"{self.blob_dir} is not this database's blob folder (it has no "
                        f"{BLOB_MARKER}): move it away",
                    )
        if not os.path.lexists(marker):
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _write_blob(
        self, name: str, msg_id: str, frames: Sequence[Any], packed: bool = False
    ) -> None:
        """Write ``msg_id``'s frames as blob file ``name``: its msg_id (checked when read:
        a file is never served for another record), then the frames packed as
        :func:`pack` packs them, without joining them first (``packed``: ``frames`` is one
        blob :func:`pack` made); replaces any file of that name at once."""
        owner = msg_id.encode("utf-8", "replace")[:0xFFFF]
        views = [memoryview(f).cast("B") for f in frames]  # (TypeError: not contiguous)
        if not packed:
            head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
            views.insert(0, memoryview(head))
        views.insert(0, memoryview(struct.pack("<H", len(owner)) + owner))
        path = os.path.join(self.blob_dir, name)
        partial = path + ".part"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, [v for v in views if v.nbytes])
        except BaseException:
            os.unlink(partial)
            raise
        finally:
            os.close(fd)
        try:
            old = os.lstat(path).st_size
        except FileNotFoundError:
            old = 0
        os.replace(partial, path)
        self._blob_bytes += sum(v.nbytes for v in views) - old

    def _unlink_gone(self) -> None:
        """Remove the blob files that committed changes named in ``gone`` (the writer's;
        outside a transaction)."""
        con = self._con
        names = con.execute("SELECT name FROM gone").fetchall()
        if not names:
            return
        for (name,) in names:
            if not isinstance(name, str) or not _GONE_NAME.fullmatch(name):
                log.warning("task database %s: %r in gone is no blob file", self.path, name)
                continue
            path = os.path.join(self.blob_dir, name)
            try:
                size = os.lstat(path).st_size
                os.unlink(path)
                self._blob_bytes -= size
            except FileNotFoundError:
                pass
            except OSError as exc:  # (the record is gone: its file is left, and said)
                log.warning("task database %s: blob file %s not removed: %s", self.path, name, exc)
        con.execute("DELETE FROM gone")

    def _load(
        self, value: bytes | str | None, shared: Any = None, at: Any = None
    ) -> list[bytes] | None:
        """Frames from what :data:`_FRAMES_SQL` selected: a packed blob, or a blob file's
        name and its record's msg_id (None when the file is gone, deleted since the row was
        read, or is not that record's); a request's shared frame (:data:`_SHARED_SQL`) goes
        back in its place."""
        if not value:
            return None
        if shared is not None:
            frames = self._load(value)
            if frames is None:
                return None
            if not shared or type(shared) is not bytes or type(at) is not int:
                at = -1
            if not 4 <= at <= len(frames):
                log.warning("task database %s: a request's shared frame is missing", self.path)
                return None
            frames.insert(at, shared)
            return frames
        try:
            if not isinstance(value, str):
                return unpack(value)
            path, msg_id = self._blob_path(value)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
                data = f.read()
            (size,) = struct.unpack_from("<H", data)
            if data[2 : 2 + size] != msg_id.encode("utf-8", "replace")[:0xFFFF]:
                raise ValueError("another record's file (its database was an older copy?)")
            return unpack(data, 2 + size)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error) as exc:
            name = value[:64] if isinstance(value, str) else "inline"
            log.warning("task database %s: frames %s unreadable: %s", self.path, name, exc)
            return None

    def _blob_path(self, value: str) -> tuple[str, str]:
        """(path, msg_id) of the blob file :data:`_FRAMES_SQL` named (ValueError for a
        name that is not a blob file's: a crafted file's seq)."""
        name, _, msg_id = value.partition(":")
        if not _GONE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is no blob file")
        return os.path.join(self.blob_dir, name), msg_id

    def _blob_size(self, value: str) -> int:
        """The size of the blob file :data:`_FRAMES_SQL` named (0 if none)."""
        try:
            return os.stat(self._blob_path(value)[0]).st_size
        except (ValueError, FileNotFoundError):
            return 0

    # -- callers' side -------------------------------------------------------------------

    def put(self, msg_id: str, **fields: Any) -> None:
        """Upsert these fields of ``msg_id``'s record; returns without touching the disk.

        The store keeps references to the frames and lists given: don't change them after.

        Raises
        ------
        TypeError, ValueError
            For an unknown field or a value of the wrong type.
        StoreError
            When the store is closed or its writer failed.
        """
        self._put(msg_id, fields, msg_id)

    def put_queued(self, msg_id: str, **fields: Any) -> None:
        """:meth:`put` the new record of a task that waits in the controller's queue: the
        writer holds it back until :meth:`taken` or another put names ``msg_id``, or for
        :data:`HOLD` seconds at most, or until a read or a close needs it."""
        self._put(msg_id, fields, (msg_id,))

    def taken(self, msg_id: str, fields: dict[str, Any] | None = None) -> None:
        """An engine took ``msg_id``'s task: its held record (:meth:`put_queued`) is due,
        with ``fields`` (the engine's, made as for :meth:`put_made`) put into it; a record
        written already (held past :data:`HOLD`, or for a read) gets them as a put."""
        if type(msg_id) is not str or not msg_id.isascii():  # (_check_id, most often)
            _check_id(msg_id)
        self._queue.append((_TAKEN, (msg_id, fields), 0))

    def _put(self, msg_id: str, fields: dict[str, Any], tag: str | tuple[str]) -> None:
        if self._stopped:
            self._raise_state()
        if type(msg_id) is not str or not msg_id.isascii():  # (_check_id, most often)
            _check_id(msg_id)
        nbytes = 0
        for key, value in fields.items():
            kind = type(value)
            if kind is not _TYPES.get(key):
                if value is None and key in _NULLABLE:
                    continue
                fields[key] = value = _convert(key, value)
                kind = type(value)
            if kind is str:
                if key == "status":
                    if value not in STATUSES:
                        raise ValueError(f"status must be in {sorted(STATUSES)}, not {value!r}")
                elif not value.isascii():
                    fields[key] = _clean_text(value)
            elif kind is float:
                if not -1e15 < value < 1e15:
                    raise ValueError(f"{key!r}: {value} is not a timestamp")
            elif kind is int:
                if not -_MAX_INT <= value <= _MAX_INT:
                    raise ValueError(f"engine_id {value} is out of range")
            elif key in _FRAMES:
                nbytes += self._sized(msg_id, fields, key, value)
            else:
                for item in value:
                    if type(item) is not str:
                        raise TypeError(f"{key!r} must be a list of msg_ids")
        self._queued(tag, fields, nbytes)

    def put_made(self, msg_id: str, fields: dict[str, Any], queued: bool = False) -> None:
        """:meth:`put` (with ``queued``: :meth:`put_queued`) of fields the controller made
        with values of the right types: dates floats in range, ``engine_id`` an int in
        range, ``status`` one of :data:`STATUSES`, ``after``/``follow`` lists of str, frames
        in lists, None only where NULL may be. Only what values from peers may hold is
        checked: text that is not ASCII, and the frames' sizes. (The hub's path: checking
        each field as :meth:`put` does cost 3 to 4% of the load-balanced rate of tiny
        tasks.)"""
        if self._stopped:
            self._raise_state()
        if type(msg_id) is not str or not msg_id.isascii():  # (_check_id, most often)
            _check_id(msg_id)
        for key in _TEXT:
            value = fields.get(key)
            if value is not None and not value.isascii():
                fields[key] = _clean_text(value)
        nbytes = 0
        for key in _FRAMES:
            value = fields.get(key)
            if value is not None:
                nbytes += self._sized(msg_id, fields, key, value)
        self._queued((msg_id,) if queued else msg_id, fields, nbytes)

    def _sized(self, msg_id: str, fields: dict[str, Any], key: str, frames: Any) -> int:
        """The bytes of a record's frames to queue (0: too big to store, dropped), the
        frames made fit for the writer."""
        if _LEN_IS_BYTES.issuperset(map(type, frames)):
            size = sum(map(len, frames))
        else:  # (so that the writer can take len for the size of each)
            fields[key] = frames = list(map(_flat, frames))
            size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_frames_bytes:  # (not kept waiting for the writer either)
            log.warning("%s of %s not stored: %d bytes", key, msg_id, size)
            fields[key] = []
            return 0
        if size + 4 + 8 * len(frames) > self.blob_threshold:
            fields[key] = _Oversize(frames)
        return size

    def _queued(self, tag: str | tuple[str], fields: dict[str, Any], nbytes: int) -> None:
        self._queue.append((tag, fields, nbytes))
        if nbytes:
            self._bytes_in += nbytes
        if self._idle:
            self._wake()
        if len(self._queue) >= self.max_pending or (
            nbytes and self._bytes_in - self._bytes_out >= self.max_pending_bytes
        ):
            self._wait_for_writer()

    def append_output(self, msg_id: str, name: str, text: str) -> None:
        """Append ``text`` to the record's ``stdout`` or ``stderr`` (kept up to
        :data:`MAX_OUTPUT` characters, then marked truncated); no-op for unknown records."""
        if self._stopped:
            self._raise_state()
        if name not in ("stdout", "stderr"):
            raise ValueError(f"name must be 'stdout' or 'stderr', not {name!r}")
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        _check_id(msg_id)
        text = text[: MAX_OUTPUT + 1]
        if not text.isascii():
            text = _clean_text(text)
        self._queue.append((_OUTPUT, (msg_id, name, text), len(text)))
        self._bytes_in += len(text)
        if self._idle:
            self._wake()
        if self._bytes_in - self._bytes_out >= self.max_pending_bytes:
            self._wait_for_writer()

    def _wake(self, urgent: bool = False) -> None:
        with self._lock:
            self._urgent = self._urgent or urgent
            self._work.notify()

    def _wait_for_writer(self) -> None:
        """Block until the writer has taken enough of the queue."""
        start = time.monotonic()
        with self._lock:
            self._urgent = True
            self._work.notify()
            while (
                len(self._queue) >= self.max_pending
                or self._bytes_in - self._bytes_out >= self.max_pending_bytes
            ) and not self._stopped:
                self._done.wait(1.0)
        self.blocked_seconds += time.monotonic() - start
        if self._error is not None:
            self._raise_state()

    def _raise_state(self) -> None:
        if self._error is not None:
            raise StoreError(self.path, f"the writer failed: {self._error!r}") from self._error
        if self._stopped:
            raise StoreError(self.path, "the store is closed")

    def _enqueue(self, tag: object, item: Any) -> concurrent.futures.Future[int]:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self._stopped:
            self._raise_state()
        self._queue.append((tag, (item, future), 0))
        self._wake(urgent=True)
        if self._stopped and not future.done():  # the writer may have stopped meanwhile
            self._raise_state()
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every put made before this call is committed; return whether that
        happened within ``timeout`` seconds (None: as long as it takes)."""
        try:
            self._enqueue(_BARRIER, None).result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def _submit(self, op: Callable[[sqlite3.Connection], int], timeout: float | None) -> int:
        """Run ``op`` on the writer's connection after the puts queued before; its result."""
        return self._enqueue(_OP, op).result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the writer and close the file (idempotent).

        Raises
        ------
        StoreError
            (on the first close only) when the writer had failed.
        TimeoutError
            When writing took over ``timeout``: the statement is then interrupted and the
            thread joined before this is raised.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopped = self._urgent = True
            self._work.notify()
            self._done.notify_all()
        self._thread.join(timeout)
        late = self._thread.is_alive()
        if late:
            self._con.interrupt()
            self._thread.join()
        with self._read_lock:
            self._reader.close()
        with self._lookup_lock:
            self._lookup.close()
        self._con.close()
        if self._error is not None:
            raise StoreError(self.path, f"the writer failed: {self._error!r}") from self._error
        if late:
            raise TimeoutError(f"task database {self.path}: writing took over {timeout} s")

    def __enter__(self) -> SqliteLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if not self.flush(READ_TIMEOUT):
            raise TimeoutError(f"task database {self.path}: the writer is {READ_TIMEOUT} s late")
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(self.path, str(exc)) from exc

    def get(self, msg_id: str, keys: Any = None) -> dict[str, Any] | None:
        """``msg_id``'s record with ``keys`` (default: :data:`.query.DEFAULT_KEYS`)."""
        if type(msg_id) is not str:
            raise TypeError(f"msg_id must be a string, not {type(msg_id).__name__}")
        found = self.query({"msg_id": msg_id}, keys)
        return found[0] if found else None

    def query(self, query: Any, keys: Any = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The records matching ``query`` (see :mod:`.query`), in submission order, each
        with ``keys`` (and ``msg_id``); at most ``limit`` of them."""
        return self.query_capped(query, keys, limit)[0]

    def query_capped(
        self, query: Any, keys: Any = None, limit: int | None = None, max_bytes: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """As :meth:`query`, reading rows only while they weigh less than ``max_bytes`` in
        all (texts and blobs); returns the records and whether some were left out."""
        where, params = q.to_sql(query, prefix="t.")
        keys = q.check_keys(keys)
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ValueError(f"limit must be a non-negative int, not {limit!r}")
        columns, decode = _select(keys, self._load)
        frames = {_frames_sql(which)[0] for which in _FRAMES}
        files = [i for i, column in enumerate(columns) if column in frames]  # (may name one)
        sql = f"SELECT {', '.join(columns)} FROM tasks t WHERE {where} ORDER BY t.seq"
        if limit is not None:
            sql += f" LIMIT {limit}"
        if not self.flush(READ_TIMEOUT):
            raise TimeoutError(f"task database {self.path}: the writer is {READ_TIMEOUT} s late")
        out: list[dict[str, Any]] = []
        weight = 0
        with self._read_lock:
            try:
                cursor = self._reader.execute(sql, params)
                while rows := cursor.fetchmany(256):
                    for row in rows:
                        weight += sum(len(v) for v in row if isinstance(v, (bytes, str)))
                        weight += sum(self._blob_size(row[i]) for i in files if type(row[i]) is str)
                        if max_bytes is not None and weight > max_bytes and out:
                            cursor.close()
                            return out, True
                        out.append(decode(row))
            except sqlite3.DatabaseError as exc:
                raise StoreError(self.path, str(exc)) from exc
        return out, False

    def get_many(self, msg_ids: Sequence[str], keys: Any = None) -> dict[str, dict[str, Any]]:
        """The records of those of ``msg_ids`` the file has, by msg_id (one wait for the
        writer, then a query per 500 ids)."""
        keys = q.check_keys(keys)
        wanted = keys if "msg_id" in keys else ("msg_id", *keys)
        columns, decode = _select(tuple(wanted), self._load)
        out: dict[str, dict[str, Any]] = {}
        for row in self._read_ids(f"SELECT {', '.join(columns)} FROM tasks t", msg_ids):
            record = decode(row)
            out[record["msg_id"]] = {k: record[k] for k in keys}
        return out

    def frames_many(self, msg_ids: Sequence[str], which: str = "result") -> dict[str, list[bytes]]:
        """:meth:`frames` of many records at once (those that have some), by msg_id."""
        select = f"SELECT t.msg_id, {', '.join(_frames_sql(which))} FROM tasks t"
        rows = self._read_ids(select, msg_ids)
        loaded = ((m, self._load(*v)) for m, *v in rows)
        return {m: frames for m, frames in loaded if frames is not None}

    def _read_ids(self, select: str, msg_ids: Sequence[str]) -> Iterator[Sequence[Any]]:
        """The rows of ``select`` (its ``FROM tasks t``) for these msg_ids: one wait for
        the writer, then a query per 500 ids."""
        ids = _checked("msg_ids", msg_ids, str) or ()
        if not self.flush(READ_TIMEOUT):
            raise TimeoutError(f"task database {self.path}: the writer is {READ_TIMEOUT} s late")
        for at in range(0, len(ids), 500):
            chunk = ids[at : at + 500]
            sql = f"{select} WHERE t.msg_id IN ({', '.join('?' * len(chunk))})"
            with self._read_lock:
                try:
                    rows = self._reader.execute(sql, chunk).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise StoreError(self.path, str(exc)) from exc
            yield from rows

    def frames(self, msg_id: str, which: str = "result") -> list[bytes] | None:
        """The stored frames of the request or of the reply, as given to :meth:`put`."""
        sql = f"SELECT {', '.join(_frames_sql(which))} FROM tasks t WHERE t.msg_id = ?"
        rows = self._read(sql, (msg_id,))
        return self._load(*rows[0]) if rows else None

    def history(self) -> list[str]:
        """Every msg_id with a record, in submission order."""
        return [r[0] for r in self._read("SELECT msg_id FROM tasks ORDER BY seq")]

    def pending(self, keys: Any = None) -> list[dict[str, Any]]:
        """The records still pending: what a restarted controller must account for."""
        columns, decode = _select(q.check_keys(keys), self._load)
        sql = f"SELECT {', '.join(columns)} FROM tasks t WHERE t.done_at IS NULL ORDER BY t.seq"
        return [decode(row) for row in self._read(sql)]

    def outcome(
        self, msg_id: str, wait: float | None = READ_TIMEOUT
    ) -> tuple[int | None, bool] | str | None:
        """(engine id, succeeded) of a finished task, ``"pending"``, or None if unknown;
        what was written within ``wait`` seconds (see :meth:`outcomes`)."""
        return self.outcomes([msg_id], wait).get(msg_id)

    def outcomes(
        self, msg_ids: Sequence[str], wait: float | None = READ_TIMEOUT
    ) -> dict[str, tuple[int | None, bool] | str]:
        """:meth:`outcome` of many msg_ids (those the file has): one wait for the writer,
        then a lookup per 500 ids."""
        ids = _checked("msg_ids", msg_ids, str) or ()
        if ids and (wait is None or wait > 0):
            self.flush(wait)
        out: dict[str, tuple[int | None, bool] | str] = {}
        for at in range(0, len(ids), 500):
            chunk = ids[at : at + 500]
            sql = (
                "SELECT msg_id, status, engine_id FROM tasks "
                f"WHERE msg_id IN ({', '.join('?' * len(chunk))})"
            )
            with self._lookup_lock:
                try:
                    rows = self._lookup.execute(sql, chunk).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise StoreError(self.path, str(exc)) from exc
            for msg_id, status, engine_id in rows:
                out[msg_id] = PENDING if status == PENDING else (engine_id, status == "ok")
        return out

    def count(self) -> int:
        """How many records there are."""
        return int(self._read("SELECT count(*) FROM tasks")[0][0])

    def size_bytes(self) -> int:
        """The database's size on disk: its file, its WAL and its blob files."""
        return self._db_bytes() + self._blob_bytes

    def _db_bytes(self) -> int:
        total = 0
        for name in (self.path, self.path + "-wal"):
            try:
                total += os.stat(name).st_size
            except FileNotFoundError:
                pass
        return total

    # -- changes made by the writer on request -------------------------------------------

    def purge(
        self,
        msg_ids: Sequence[str] | None = None,
        engine_ids: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Forget finished records: these msg_ids and those of these engines, or all when
        both are None; pending records stay. Returns how many were forgotten."""
        ids = _checked("msg_ids", msg_ids, str)
        engines = _checked("engine_ids", engine_ids, int)

        def op(con: sqlite3.Connection) -> int:
            done = "done_at IS NOT NULL"
            n = 0
            if ids is None and engines is None:
                n = con.execute(f"DELETE FROM tasks WHERE {done}").rowcount
            if ids:
                sql = f"DELETE FROM tasks WHERE msg_id = ? AND {done}"
                n += con.executemany(sql, ((m,) for m in ids)).rowcount
            if engines:
                sql = f"DELETE FROM tasks WHERE engine_id = ? AND {done}"
                n += con.executemany(sql, ((e,) for e in engines)).rowcount
            if n:
                self._drop_unshared()
            return n

        return self._submit(op, timeout)

    def drop_results(
        self, msg_ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> int:
        """Keep the records but forget their reply frames (of all records when None);
        returns how many records had some."""
        ids = _checked("msg_ids", msg_ids, str)
        sql = "UPDATE tasks SET result = NULL, result_big = 0 WHERE (result_big OR result NOT NULL)"

        def op(con: sqlite3.Connection) -> int:
            if ids is None:
                return con.execute(sql).rowcount
            return con.executemany(sql + " AND msg_id = ?", ((m,) for m in ids)).rowcount

        return self._submit(op, timeout)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        try:
            self._maintain()  # a reopened file may hold old records, or pass a lower limit
            self._make_room(0, 0)
            self._starting = False
            batch_start = busy = time.monotonic()
            next_maintenance = batch_start + self.maintenance_interval
            while True:
                with self._lock:
                    while True:
                        now = time.monotonic()
                        # (the writer's own: held records due, the oldest first)
                        held_due = (
                            next(iter(self._held.values()))[0] + HOLD if self._held else math.inf
                        )
                        if self._queue:
                            due = batch_start + self.batch_interval
                            if self._urgent or self._closed or now >= due:
                                break
                            self._work.wait(due - now)
                        elif self._closed:
                            if not self._held:
                                return
                            break
                        elif (
                            now >= min(next_maintenance, held_due) or self._shrink_until is not None
                        ):
                            break
                        elif now < busy + IDLE_AFTER:
                            # poll while busy lately: a put then needs no system call
                            self._work.wait(self.batch_interval)
                        else:
                            self._idle = True  # before looking at the queue: see put
                            if not self._queue:
                                self._work.wait(min(next_maintenance, held_due) - now)
                            self._idle = False
                            batch_start = time.monotonic()
                    self._urgent = False
                batch = self._take()
                with self._lock:
                    self._done.notify_all()
                batch_start = time.monotonic()
                result = 0
                if batch.records or batch.outputs or batch.op:
                    busy = batch_start
                    result = self._write(batch)
                for future in batch.barriers:
                    future.set_result(0)
                if batch.op is not None:
                    batch.op[1].set_result(result)
                batch = None
                if self._shrink_until is not None:
                    self._vacuum(self._shrink_until)
                if time.monotonic() >= next_maintenance:
                    self._maintain()
                    next_maintenance = time.monotonic() + self.maintenance_interval
        except BaseException as exc:
            self._fail(exc, batch)

    def _fail(self, exc: BaseException, batch: _Batch | None) -> None:
        """Stop on a writer failure: log it, and make every waiting and later call raise."""
        log.error("task database %s: the writer failed", self.path, exc_info=exc)
        if self._con.in_transaction:
            try:
                self._con.rollback()
            except sqlite3.Error:
                pass
        with self._lock:
            self._error = exc
            self._stopped = True
            self._done.notify_all()
        error = StoreError(self.path, f"the writer failed: {exc!r}")
        futures = [*batch.barriers, *([batch.op[1]] if batch.op else [])] if batch else []
        while True:
            try:
                tag, item, _ = self._queue.popleft()
            except IndexError:
                break
            if tag is _BARRIER or tag is _OP:
                futures.append(item[1])
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _take(self) -> _Batch:
        """Take the queue, up to an operation (which runs after the puts before it), with
        the held records that are due (all of them before a barrier, an operation or the
        close)."""
        batch = _Batch()
        records, outputs, seqs = batch.records, batch.outputs, batch.seqs
        held = self._held
        popleft = self._queue.popleft
        nbytes = 0
        seq = self._seq
        held_bytes = released = 0  # (bytes of records put in held, and taken out of it)
        now = time.monotonic()
        for _ in range(self._batch_records):
            try:
                tag, item, size = popleft()
            except IndexError:
                break
            nbytes += size
            if type(tag) is str:
                record = records.get(tag)
                if record is not None:
                    record.update(item)
                elif held and tag in held:
                    _, seqs[tag], size, record = held.pop(tag)
                    released += size
                    records[tag] = record
                    record.update(item)
                else:
                    records[tag] = item
                    seqs[tag] = seq
                    seq += 1
            elif type(tag) is tuple:  # (put_queued)
                msg_id = tag[0]
                record = records.get(msg_id)
                if record is None and msg_id in held:  # (not new after all)
                    _, seqs[msg_id], found, record = held.pop(msg_id)
                    released += found
                    records[msg_id] = record
                if record is not None:
                    record.update(item)
                else:
                    held[msg_id] = (now, seq, size, item)
                    seq += 1
                    held_bytes += size
            elif tag is _TAKEN:
                msg_id, fields = item
                taken = held.pop(msg_id, None)
                if taken is not None:
                    _, seqs[msg_id], size, record = taken
                    released += size
                    records[msg_id] = record
                    if fields:
                        record.update(fields)
                elif fields:  # (written already, or in this batch: its engine is news)
                    record = records.get(msg_id)
                    if record is not None:
                        record.update(fields)
                    else:
                        records[msg_id] = fields
                        seqs[msg_id] = seq
                        seq += 1
            elif tag is _OUTPUT:
                msg_id, name, text = item
                if msg_id in held:
                    _, seqs[msg_id], found, records[msg_id] = held.pop(msg_id)
                    released += found
                parts = outputs.get((msg_id, name))
                if parts is None:
                    outputs[msg_id, name] = parts = [0]
                if parts[0] <= MAX_OUTPUT:  # the rest would be cut off
                    parts[0] += len(text)
                    parts.append(text)
            elif tag is _BARRIER:
                batch.barriers.append(item[1])
            else:
                batch.op = item
                break
        else:
            self._urgent = True  # more is queued: take it without waiting
        self._seq = seq
        self._held_bytes += held_bytes - released
        # (a held record's bytes are written, so counted, when it is released)
        batch.nbytes += released - held_bytes
        if held:  # due: the oldest, or all; and what is over a tenth of the bounds
            everything = batch.barriers or batch.op is not None or self._closed
            while held:
                msg_id, (since, _, _, _) = next(iter(held.items()))
                if (
                    not everything
                    and since > now - HOLD
                    and len(held) <= self.max_held
                    and self._held_bytes <= self.max_pending_bytes // 4
                ):
                    break
                self._release(batch, msg_id)
        self._bytes_out += nbytes  # (held records' count as taken: they wait in the writer)
        batch.nbytes += nbytes + RECORD_BYTES * len(records)
        return batch

    def _release(self, batch: _Batch, msg_id: str) -> None:
        """Move ``msg_id``'s held record into ``batch``."""
        _, seq, size, fields = self._held.pop(msg_id)
        self._held_bytes -= size
        batch.records[msg_id] = fields
        batch.seqs[msg_id] = seq
        batch.nbytes += size

    def _write(self, batch: _Batch) -> int:
        """Write a batch in one transaction; the result of its operation, if any.

        A new record (its first put names its ``msg_type``) whose msg_id the file has
        already (an earlier controller's, or one memory forgot) is not written, nor is
        anything put for that msg_id later on: a duplicate never replaces the original."""
        if self._reused:
            for msg_id in self._reused.intersection(batch.records):
                del batch.records[msg_id]
        con = self._con
        groups: dict[_Plan, _Rows] = {}
        files: list[tuple[str, int, list[Any]]] = []  # (msg_id, kind, frames) for blob files
        plans = self._plans
        known = self._shared_ids
        shared = 0  # bytes of the buffers shared, not written with their records
        fresh: dict[bytes, None] = {}  # those buffers that have no shared row yet
        now = time.time()
        seqs = batch.seqs
        for msg_id, fields in batch.records.items():
            shape: Any = tuple(fields)
            plan = plans.get(shape) or self._plan(shape)
            values = plan.get(fields)
            if None in values:  # (rare: callers leave None out)
                shape = (shape, tuple(v is None for v in fields.values()))
                plan = plans.get(shape) or self._plan(shape)
                values = plan.get(fields)
            rows = groups.get(plan)
            if rows is None:
                rows = groups[plan] = _Rows()
            params = rows.params
            row = len(params)
            params.append(seqs[msg_id])
            params.append(msg_id)
            params += values
            if plan.status:
                params.append(fields.get("completed") or now)
            for name in plan.lists:
                value = fields[name]
                params.append(json.dumps(value) if value else "[]")
            if plan.request:
                buffer = self._frames(params, msg_id, 0, fields["request"], files)
                if buffer is not None:
                    rows.shared_rows.append(row)
                    rows.shared_keys.append(buffer)
                    shared += len(buffer)
                    if not known.get(buffer):
                        fresh[buffer] = None
            if plan.result:
                self._frames(params, msg_id, 1, fields["result"], files)
        to_files = 0
        for _, _, frames in files:
            to_files += sum(memoryview(f).nbytes for f in frames)
        # (a shared buffer is written once at most, not with each record that has it)
        incoming = max(0, batch.nbytes - to_files - shared + sum(map(len, fresh)))
        self._make_room(incoming, len(batch.records), to_files)
        con.execute("BEGIN")
        for plan, rows in groups.items():  # (after _make_room: it may delete shared rows)
            params, at = rows.params, plan.shared_at
            for row, buffer in zip(rows.shared_rows, rows.shared_keys):
                params[row + at] = self._shared_id(buffer)
        for plan, rows in groups.items():
            self._insert(plan, rows.params)
        refs: dict[int, int] = {}  # a reference for each record written (not a duplicate's)
        reused = self._reused
        for plan, rows in groups.items():
            params, at = rows.params, plan.shared_at
            for row in rows.shared_rows:
                if not reused or params[row + 1] not in reused:
                    refs[params[row + at]] = refs.get(params[row + at], 0) + 1
        if refs:
            sql = "UPDATE shared SET refs = refs + ?2 WHERE id = ?1"
            con.executemany(sql, refs.items())
        for msg_id, which, frames in files:
            self._frames_file(msg_id, which, frames)
        early = self._early
        if early:  # output that came before its record (see _keep_early)
            names = ("stdout", "stderr")
            for key in [(m, n) for m in batch.records for n in names if (m, n) in early]:
                _, text = early.pop(key)
                self._early_chars -= len(text)
                parts = batch.outputs.get(key)
                batch.outputs[key] = [0, text] if parts is None else [0, text, *parts[1:]]
        for (msg_id, name), parts in batch.outputs.items():
            text = "".join(parts[1:])
            done = con.execute(_APPEND.format(n=name), (msg_id, text, MAX_OUTPUT, TRUNCATED))
            if done.rowcount == 0:
                self._keep_early(msg_id, name, text)
        result = batch.op[0](con) if batch.op is not None else 0
        con.execute("COMMIT")
        self._unlink_gone()
        return result

    def _keep_early(self, msg_id: str, name: str, text: str) -> None:
        """Keep output whose record is not in the file yet, for when it comes: a client
        tells the controller of the requests it sent to engines itself a little after
        their engines may have printed. Kept for :data:`EARLY_OUTPUT_SECONDS`, at most
        :data:`EARLY_OUTPUT_CHARS` in all (the oldest go first)."""
        early = self._early
        now = time.monotonic()
        since, kept = early.pop((msg_id, name), (now, ""))
        text = (kept + text)[: MAX_OUTPUT + 1]
        early[msg_id, name] = (since, text)
        self._early_chars += len(text) - len(kept)
        while early:
            key, (since, old) = next(iter(early.items()))
            if self._early_chars <= EARLY_OUTPUT_CHARS and since > now - EARLY_OUTPUT_SECONDS:
                break
            del early[key]
            self._early_chars -= len(old)

    def _insert(self, plan: _Plan, params: list[Any]) -> None:
        """Upsert the records whose values are ``params`` (one after the other), up to
        :data:`_CHUNK` in one statement: SQLite then runs one statement for many records,
        and Python's sqlite3 lets go of the GIL once for them, not twice for each."""
        con = self._con
        width = plan.width
        rows = len(params) // width
        written = done = 0
        for size in (_CHUNK, 8, 1):
            size = min(size, max(1, _MAX_PARAMS // width))
            if rows - done < size:
                continue
            sql = plan.statement(size)
            while rows - done >= size:
                start = done * width
                written += con.execute(sql, params[start : start + size * width]).rowcount
                done += size
        if plan.new and written < rows:
            self._duplicates(params, width)

    def _duplicates(self, params: list[Any], width: int) -> None:
        """Some new records of ``params`` (each ``width`` values: seq, msg_id, ...) were
        not written: the file has their msg_id already. Note them, so that what is put for
        them later (their blob files included) is not written either."""
        con = self._con
        found = []
        for seq, msg_id in zip(params[::width], params[1::width]):
            row = con.execute("SELECT seq FROM tasks WHERE msg_id = ?", (msg_id,)).fetchone()
            if row is not None and row[0] != seq:
                log.warning(
                    "task database %s: a new task reused msg_id %s; kept the original",
                    self.path,
                    msg_id,
                )
                found.append(msg_id)
        if len(self._reused) + len(found) > 100_000:
            self._reused.clear()
        self._reused.update(found)

    def _frames(
        self,
        params: list[Any],
        msg_id: str,
        kind: int,
        frames: list[Any],
        files: list[tuple[str, int, list[Any]]],
    ) -> bytes | None:
        """Add to ``params`` what a record's request (``kind`` 0) or reply (1) frames
        bind: the inline blob (empty: none, or too big to store: see :meth:`put`), whether
        they are in a blob file (added to ``files``), and for a request its shared buffer's
        id (0: set later) and place. A request's buffer that the writer has seen before is
        left out of both, to be shared (see :data:`_SHARED`): it is returned."""
        blob, big, share = _EMPTY, 0, None
        if frames:
            try:
                oversize = type(frames) is _Oversize
                sizes = list(map(len, frames))  # (put made each len its size in bytes)
                if not kind and len(sizes) > SHARED_SLOTS.start:
                    share = self._seen(frames, sizes)
                    if share is not None:
                        frames = frames[:]
                        del frames[share[0]], sizes[share[0]]
                if oversize and sum(sizes) + 4 + 8 * len(sizes) > self.blob_threshold:
                    files.append((msg_id, kind, frames))
                    big = 1
                else:
                    blob = _pack(frames, sizes)
            except (TypeError, ValueError, BufferError) as exc:
                log.error("%s of %s not stored: %s", _FRAMES[kind], msg_id, exc)
                blob, big, share = _EMPTY, 0, None
        params.append(blob)
        params.append(big)
        if kind:
            return None
        params.append(0)
        params.append(0 if share is None else share[0])
        return None if share is None else share[1]

    def _seen(self, frames: list[Any], sizes: list[int]) -> tuple[int, bytes] | None:
        """(place, bytes) of the largest of a request's buffers in :data:`SHARED_SLOTS` that
        the writer has seen lately (to be shared: one a request, its function, which a
        resubmitted map task has beside its arguments, also seen); the others are
        remembered as seen."""
        ids = self._shared_ids
        last = self._shared_last
        best = None
        for at in SHARED_SLOTS:
            if at >= len(sizes):
                break
            if not SHARED_MIN <= sizes[at] <= self._shared_max:
                continue
            frame = frames[at]
            key = frame if isinstance(frame, bytes) else bytes(frame)  # (a Part is bytes)
            if key == last:  # (the same as the last one: its hash is known, not this one's)
                key = last
            if key in ids:
                self._shared_last = key
                ids.move_to_end(key)
                if best is None or len(key) > len(best[1]):
                    best = (at, key)
            else:
                self._remember(key, 0)
        return best

    def _remember(self, key: bytes, shared_id: int) -> None:
        ids = self._shared_ids
        if key not in ids:
            self._shared_bytes += len(key)
        ids[key] = shared_id
        while len(ids) > SHARED_CACHE or self._shared_bytes > SHARED_CACHE_BYTES:
            old, _ = ids.popitem(last=False)
            self._shared_bytes -= len(old)

    def _shared_id(self, key: bytes) -> int:
        """The id of the ``shared`` row of these bytes: remembered, found by their digest,
        or inserted (in the writer's open transaction)."""
        found = self._shared_ids.get(key)
        if found:
            return found
        digest = hashlib.blake2b(key, digest_size=32).digest()
        con = self._con
        row = con.execute("SELECT id, data FROM shared WHERE digest = ?", (digest,)).fetchone()
        if row is not None and row[1] != key:  # (a row planted in the file: not ours)
            log.warning(
                "task database %s: shared row %s is not what its digest says", self.path, row[0]
            )
            con.execute("UPDATE shared SET digest = ? WHERE id = ?", (b"bad" + digest, row[0]))
            row = None
        if row is not None:
            found = int(row[0])
        else:
            sql = "INSERT INTO shared (digest, data) VALUES (?, ?)"
            found = int(con.execute(sql, (digest, key)).lastrowid or 0)
        self._remember(key, found)
        return found

    def _drop_unshared(self) -> None:
        """Delete the shared frames that no record names any more (records were deleted)."""
        con = self._con
        dead = {i for (i,) in con.execute("SELECT id FROM shared WHERE refs <= 0")}
        if not dead:
            return
        con.execute("DELETE FROM shared WHERE refs <= 0")
        for key in [k for k, i in self._shared_ids.items() if i in dead]:
            del self._shared_ids[key]
            self._shared_bytes -= len(key)

    def _frames_file(self, msg_id: str, kind: int, frames: list[Any]) -> None:
        """Write the blob file of ``msg_id``'s frames (its row is written, in the open
        transaction: the file is named by its seq)."""
        if msg_id in self._reused:
            return
        name = _FRAMES[kind]
        row = self._con.execute(
            f"SELECT seq, {name}_big FROM tasks WHERE msg_id = ?", (msg_id,)
        ).fetchone()
        if row is None or not row[1]:
            return
        try:
            self._write_blob(f"{row[0]}.{kind}", msg_id, frames)
        except (TypeError, ValueError, BufferError, OSError) as exc:
            log.error("%s of %s not stored: %s", name, msg_id, exc)
            # (the row says big: the file is missing, so reads find no frames; and a
            # later change of the row names it in gone, which is harmless)

    def _plan(self, shape: Any) -> _Plan:
        """How to write a record of this shape (its fields, in order, and which are None):
        see :class:`_Plan`. None is written as a literal NULL: binding it costs Python's
        sqlite3 ten times as much as binding a value."""
        nullable = bool(shape) and isinstance(shape[-1], tuple)
        keys, nulls = shape if nullable else (shape, (False,) * len(shape))
        if len(self._plans) > 1000:  # the shapes used are few; but bound them
            self._plans.clear()
        self._plans[shape] = plan = _Plan(keys, nulls)
        return plan

    def _pages(self) -> tuple[int, int, int]:
        """(page size, pages, free pages) of the database as the writer sees it."""
        con = self._con
        return (
            self._page_size,  # (fixed once the file has a table)
            con.execute("PRAGMA page_count").fetchone()[0],
            con.execute("PRAGMA freelist_count").fetchone()[0],
        )

    def _make_room(self, incoming: int, records: int, to_files: int = 0) -> None:
        """Before writing ``records`` records of ``incoming`` bytes (and ``to_files`` bytes
        of blob files), keep the files under ``max_bytes``. The records need three times
        their size (their pages, their copy in the WAL, slack), blob files their size.
        Once the live pages and blob files and that room pass ``HIGH * max_bytes``, every
        batch first deletes the records finished longest ago, a quarter more than it
        brings, until they fit in ``LOW * max_bytes``: deleting is spread over batches, and
        only a batch that would not fit under ``max_bytes`` waits for more deletions (in
        steps of at most :data:`BIG_STEP` records while blob files hold most of the bytes,
        so that a big record does not take every other with it). Freed pages are reused;
        they go back to the file system only when the database's own files are over the
        limit."""
        limit = self.max_bytes
        if limit is None:
            return
        if self._trimming:  # what a record takes on disk, measured, beats the estimate
            incoming = max(incoming, math.ceil(records * self._row_bytes))
        reserve = self._wal_limit + 3 * incoming + to_files
        if not self._trimming and self.size_bytes() + reserve <= HIGH * limit:
            # (the files' sizes bound the live pages': far from the limit, no need to
            # count the pages, three statements a batch)
            return
        page, pages, free = self._pages()
        used = (pages - free) * page + self._blob_bytes
        if not self._trimming and used + reserve <= HIGH * limit and self.size_bytes() <= limit:
            return
        if not self._trimming:
            self._trimming = True
            rows = self._con.execute("SELECT count(*) FROM tasks").fetchone()[0]
            self._row_bytes = max((pages - free) * page / max(rows, 1), 1)  # (inline only)
        while used + reserve > LOW * limit:
            fits = used + reserve <= limit
            needed = math.ceil((used + reserve - LOW * limit) / self._row_bytes) + 1
            # one step a batch while it fits; at once when it does not
            step = min(needed, max(500, records + records // 4)) if fits else needed
            if self._blob_bytes * 2 > used:
                step = min(step, BIG_STEP)
            if not self._delete_finished(min(step, 20_000)):
                log.warning(
                    "task database %s: no finished record is left to delete, and its %d "
                    "bytes (records of tasks not finished yet) and the %d bytes written now "
                    "pass %d%% of its %d-byte limit",
                    self.path,
                    used,
                    reserve,
                    round(LOW * 100),
                    limit,
                )
                break
            page, pages, free = self._pages()
            used = (pages - free) * page + self._blob_bytes
            if fits:
                break
        else:
            self._trimming = False
        if self._db_bytes() > limit:
            self._vacuum(until=reserve // page)

    def _delete_finished(self, n: int, before: float | None = None) -> int:
        """Delete the ``n`` records finished longest ago (and before ``before``)."""
        sql = (
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE done_at "
            f"{'IS NOT NULL' if before is None else '< ?'} ORDER BY done_at LIMIT ?)"
        )
        params = (n,) if before is None else (before, n)
        con = self._con
        con.execute("BEGIN")
        deleted = int(con.execute(sql, params).rowcount)
        if deleted:
            self._drop_unshared()
        con.execute("COMMIT")
        self._unlink_gone()
        return deleted

    def _maintain(self) -> None:
        """Delete the records past ``max_age``; count the blob files again (those removed by
        hand); give pages back when a quarter is free."""
        if self._blob_bytes:  # (none counted: none to miss)
            self._count_blobs()
        self._drop_unshared()  # (none, unless the file was written by another hand)
        if self.max_age is not None:
            cutoff = time.time() - self.max_age
            while self._delete_finished(20_000, before=cutoff) == 20_000:
                pass
        page, pages, free = self._pages()
        if free * page > max(1 << 20, pages * page // 4):
            self._vacuum(until=pages // 20)

    def _vacuum(self, until: int) -> None:
        """Give free pages back to the file system until ``until`` are left, in steps;
        when callers wait for the writer, stop and go on after the next batch."""
        self._shrink_until = None
        page = self._page_size
        while True:
            free = self._con.execute("PRAGMA freelist_count").fetchone()[0]
            if free <= until:
                break
            step = min(free - until, max(1, VACUUM_STEP // page))
            self._con.execute(f"PRAGMA incremental_vacuum({step})").fetchall()
            if not self._starting and (self._urgent or len(self._queue) > 1000):
                self._shrink_until = until
                return
        self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` to ``fd`` whole: ``writev`` of up to 512 at a time, resumed after a
    short write."""
    while views:
        n = os.writev(fd, views[:512])
        done = 0
        while done < len(views) and n >= views[done].nbytes:
            n -= views[done].nbytes
            done += 1
        views = views[done:]
        if n:
            views[0] = views[0][n:]


def _checked(name: str, values: Any, kind: type) -> tuple[Any, ...] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a list or None")
    for v in values:
        if type(v) is not kind:
            raise TypeError(f"{name} must hold {kind.__name__}s, not {type(v).__name__}")
        if kind is str:
            _check_id(v)
    return tuple(values)


def _frames_sql(which: str) -> list[str]:
    """The columns to select for a record's ``"request"`` or ``"result"`` frames (what
    :meth:`SqliteLog._load` takes)."""
    if which == "result":
        return [_FRAMES_SQL.format(name="result", kind=1)]
    if which == "request":
        return [_FRAMES_SQL.format(name="request", kind=0), *_SHARED_SQL]
    raise ValueError(f"which must be 'request' or 'result', not {which!r}")


def _select(
    keys: tuple[str, ...], load: Callable[..., list[bytes] | None]
) -> tuple[list[str], Callable[[Sequence[Any]], dict[str, Any]]]:
    """The columns to select for ``keys`` and the function making a record of a row
    (``load``: the frames of a frames column, see :meth:`SqliteLog._load`); the frames
    columns come last."""
    plain = [k for k in keys if k in q.SQL_TYPES or k in ("stdout", "stderr", "after", "follow")]
    columns = [f"t.{k}" for k in plain]
    want_request = any(k in keys for k in ("header", "metadata", "content", "buffers"))
    want_result = any(k.startswith("result_") for k in keys)
    if want_request:
        columns.extend(_frames_sql("request"))
    if want_result:
        columns.extend(_frames_sql("result"))
    n = len(plain)

    def decode(row: Sequence[Any]) -> dict[str, Any]:
        record = dict(zip(plain, row[:n]))
        for key in ("after", "follow"):
            if key in record:
                record[key] = json.loads(record[key]) if record[key] is not None else []
        for key in ("stdout", "stderr"):
            if key in record and record[key] is None:
                record[key] = ""
        at = n
        for wanted, prefix in ((want_request, ""), (want_result, "result_")):
            if not wanted:
                continue
            if prefix:
                frames = load(row[at])
                at += 1
            else:  # (the request's frames, its shared frame and its place)
                frames = load(*row[at : at + 3])
                at += 3
            for i, part in ((0, "header"), (2, "metadata"), (3, "content")):
                if prefix + part in keys:
                    record[prefix + part] = (
                        _json(frames[i]) if frames is not None and len(frames) > i else None
                    )
            if prefix + "buffers" in keys:
                record[prefix + "buffers"] = None if frames is None else frames[4:]
        return {k: record[k] for k in keys}

    return columns, decode
