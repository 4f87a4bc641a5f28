"""Shared memory for arrays sent to many engines on the client's host.

Sent over zmq, an array pushed to N engines costs N copies: one per message, and one
more in each engine's memory. When a DirectView request goes to two or more engines on
this host, the client instead writes each large buffer (:data:`THRESHOLD` bytes or more)
of the request once into a POSIX shared-memory segment under ``/dev/shm`` and sends each
engine a small reference in the request's content (:data:`CONTENT_KEY`, read by
:func:`attach`). To one engine of this host it does so when a buffer is very large
(:data:`ONE_ENGINE_THRESHOLD`): one copy, not two. Each engine maps the segment read-only
and rebuilds the arguments on that mapping, so a received array is a read-only view on
pages that all engines share (received arrays are read-only anyway: on zmq frames, or here
on the mapping). One copy in total.

Lifetime. The mapping keeps the pages alive as long as anything on the engine uses them;
the segment's name goes as soon as it is no longer needed to reach them: the client unlinks
it once every request that names it has its outcome (a reply, which comes only after the
engine mapped it, or a failure: engine gone, client closed), and at exit. Segments are
named ``jxpx-<client pid>-<random>``; one left by a client that was killed is removed by
the next client on the host that shares a segment, by the next stop of a cluster here and
by ``jupyter px clean`` (:func:`sweep_stale`).

Results. A client that maps this host's segments says so in its requests' metadata
(:data:`REPLY_KEY`); an engine that gets such a request on its lane from the client itself
writes a result's buffers of :data:`ONE_ENGINE_THRESHOLD` bytes or more into a segment of
its own (named after the engine's pid) and replies with its reference. The client maps it
and removes its name as it reads the reply (:func:`take_result`); the engine removes one
that nobody read within :data:`REPLY_TTL` seconds (a client stopped or gone before it read
its reply: that client then gets an error saying so), and at exit. A request that came
through the controller never gets one: the controller passes on, or keeps for other
clients, the reply itself.

Trust. Whoever can sign a request can run code on the engine, but a reference is still
checked as any other input: only a name of this module's form, opened without following
links, a regular file of this user's that nobody else may read or write, whose size is
the one the reference says; the frames it stands for must be empty placeholders within the
message, their extents inside the segment. Anything else is a ``ValueError`` naming the
segment and what is wrong, sent back as the task's error.

The whole path is skipped (today's zmq path used) for engines on other hosts or of
another user, for buffers under the threshold, when ``/dev/shm`` is missing
or full, and when ``JUPYTER_PX_SHM=0``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("kernel_engine")

SHM_DIR = "/dev/shm"

PREFIX = "jxpx-"
"""Every segment's name starts with this, then the creating client's pid."""

THRESHOLD = 1024 * 1024
"""Buffers of at least this many bytes go through shared memory."""

ONE_ENGINE_THRESHOLD = 32 * 1024 * 1024
"""To one engine, shared memory is used only when a buffer has at least this many bytes.
Below it, a warm push over zmq was quicker (0.79 against 0.97 ms at 1 MiB, 4.1 against
5.1 ms at 16 MiB: the engine's allocator reuses the pages it freed, where a new segment's
are faulted in on both sides); from 32 MiB on, glibc maps every allocation afresh, and
one copy through a segment takes half the time of two through the socket (10.6 against
19.6 ms at 32 MiB, 42 against 83 ms at 128 MiB)."""

ALIGN = 64
"""Each buffer starts at a multiple of this many bytes in its segment (so arrays of any
dtype are aligned)."""

CONTENT_KEY = "px_shm"
"""The key of an ``apply_request``'s content that holds a segment's reference:
``{"name": str, "size": int, "frames": [[frame index, offset, nbytes], ...]}``."""

MAX_FRAMES = 4096
"""Most buffers one reference may stand for."""

REPLY_KEY = "px_shm_reply"
"""Set (True) in a request's metadata by a client that maps this host's segments. An
engine that gets such a request straight from that client (on its task lane, not through
the controller) may send its result's very large buffers (:data:`ONE_ENGINE_THRESHOLD`)
in a segment of its own (the reply's content holds its reference under
:data:`CONTENT_KEY`), which the client maps and unlinks as it reads the reply
(:func:`take_result`): one copy instead of two through the socket."""


def _reply_ttl() -> float:
    raw = os.environ.get("JUPYTER_PX_SHM_REPLY_TTL", "")
    try:
        value = float(raw) if raw else 300.0
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        log.warning("JUPYTER_PX_SHM_REPLY_TTL=%r is not a number of seconds: 300 s", raw[:40])
        return 300.0
    return value


REPLY_TTL = _reply_ttl()
"""Seconds after which an engine unlinks a result's segment that no client took (its
client gone, or closed, before it read the reply); ``JUPYTER_PX_SHM_REPLY_TTL``."""

_NAME = re.compile(r"jxpx-([0-9]{1,10})-[0-9a-f]{32}\Z")

_live: set[str] = set()
_live_lock = threading.Lock()
_swept = False


def enabled() -> bool:
    """Whether this process may share buffers: ``/dev/shm`` is there, and nobody said no."""
    if os.environ.get("JUPYTER_PX_SHM", "1").lower() in ("0", "no", "off", "false"):
        return False
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


def worth_sharing(frames: Sequence[Any], engines: int = 2, first: int = 2) -> bool:
    """Whether any out-of-band buffer of an ``apply_request`` to this many engines is
    large enough to share (``first``: the index of the first buffer among ``frames``: 1
    for a result's)."""
    least = ONE_ENGINE_THRESHOLD if engines == 1 else THRESHOLD
    return any(memoryview(f).nbytes >= least for f in frames[first:])


def is_local(info: dict[str, Any] | None) -> bool:
    """Whether an engine (its ``engine_info``) runs on this host as this user and sees
    this process's ``/dev/shm``, so it can map this process's segments."""
    if not info or info.get("hostname") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return False
        # the same /dev/shm as ours, as that process sees it (a container with the host's
        # network and pids, but a private /dev/shm, has another)
        theirs = os.stat(f"/proc/{pid}/root{SHM_DIR}")
        ours = os.stat(SHM_DIR)
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class Segment:
    """One segment this process wrote, and its reference; unlinked once, by :meth:`unlink`."""

    def __init__(self, name: str, size: int, frames: list[list[int]]):
        self.name = name
        self.size = size
        self.frames = frames
        self._lock = threading.Lock()
        self._pending = 0
        self._unlinked = False

    @property
    def reference(self) -> dict[str, Any]:
        """What a request's content holds under :data:`CONTENT_KEY`."""
        return {"name": self.name, "size": self.size, "frames": self.frames}

    def placeholders(self, frames: Sequence[Any]) -> list[Any]:
        """``frames`` with every buffer the segment holds replaced by an empty frame."""
        out = list(frames)
        for index, _, _ in self.frames:
            out[index] = b""
        return out

    def unlink(self) -> None:
        """Remove the segment's name (engines' mappings stay valid); only the first call acts."""
        with self._lock:
            if self._unlinked:
                return
            self._unlinked = True
        with _live_lock:
            _live.discard(self.name)
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove shared-memory segment %s: %s", self.name, exc)

    def release_after(self, futures: Sequence[concurrent.futures.Future[Any]]) -> None:
        """Unlink once every one of ``futures`` is done (at once when there are none)."""
        with self._lock:
            self._pending += len(futures)
        if not futures:
            self.unlink()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, _: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.unlink()


def share(frames: Sequence[Any], first: int = 2) -> Segment | None:
    """Write the large buffers of ``frames`` (an ``apply_request``'s; with ``first=1``, a
    result's) into a new segment.

    None when nothing is large enough or the segment cannot be made (``/dev/shm`` full,
    say): the caller then sends the frames as they are.
    """
    global _swept
    if not _swept:
        _swept = True
        tidy()
    layout: list[list[int]] = []
    size = 0
    for index in range(first, len(frames)):
        nbytes = memoryview(frames[index]).nbytes
        if nbytes >= THRESHOLD and len(layout) < MAX_FRAMES:
            size = -(-size // ALIGN) * ALIGN
            layout.append([index, size, nbytes])
            size += nbytes
    if not layout:
        return None
    name = _new_name()
    path = os.path.join(SHM_DIR, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    segment = Segment(name, size, layout)
    # (named live before the file exists, and unlinked on any exception, Ctrl-C's
    # KeyboardInterrupt included: no step leaves a file that nothing removes)
    with _live_lock:
        _live.add(name)
    try:
        fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
            for index, offset, _ in layout:
                _write_all(fd, memoryview(frames[index]).cast("B"), offset)
        finally:
            os.close(fd)
    except BaseException as exc:
        segment.unlink()
        if not isinstance(exc, OSError):
            raise
        # (no /dev/shm, or write(2) on a full tmpfs says ENOSPC; no SIGBUS as with mmap)
        log.debug("no shared-memory segment (%s): sending buffers as messages", exc)
        return None
    return segment


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


class ResultSegments:
    """An engine's segments of results sent to clients of its host (see
    :data:`REPLY_KEY`): each client unlinks its own as it maps it; one that no client
    took is unlinked :data:`REPLY_TTL` s after it was made (:meth:`expire`)."""

    def __init__(self) -> None:
        self._made: deque[tuple[float, Segment]] = deque()

    def share(self, buffers: Sequence[Any]) -> Segment | None:
        """A segment of a result's large buffers (None: none made; send them as they are)."""
        self.expire()
        segment = share(buffers, first=1)
        if segment is not None:
            self._made.append((time.monotonic(), segment))
        return segment

    def drop(self, name: Any) -> bool:
        """Unlink the segment named ``name`` now (its reply will not be read); whether it
        was one of these."""
        for i, (_, segment) in enumerate(self._made):
            if segment.name == name:
                del self._made[i]
                segment.unlink()
                return True
        return False

    def expire(self) -> None:
        """Unlink the segments made :data:`REPLY_TTL` s ago or more (those their client
        took are gone already: nothing happens to them)."""
        now = time.monotonic()
        while self._made and now - self._made[0][0] >= REPLY_TTL:
            self._made.popleft()[1].unlink()

    def __len__(self) -> int:
        return len(self._made)


def take_result(
    reference: Any, frames: Sequence[Any], unlink: bool = True, pid: int | None = None
) -> list[Any]:
    """A result's frames (a reply's buffers) with its large buffers read-only views on
    the engine's segment, whose name is then removed: the client that maps it is its
    only reader, and the mapping keeps the pages. ValueError as :func:`attach` raises it,
    and when ``pid`` (the replying engine's, if known) did not make the segment: a reply
    names only a segment of its own engine's, never another of this user's (a client's
    own push segment, say, which taking would unlink).

    ``unlink=False``: the name stays, for a reply that may still be read again (one read
    on a thread that Ctrl-C may interrupt before the reply is taken in: the reply then
    goes to the IO thread, which reads it again); :func:`drop_result` removes it once
    the reply is taken in."""
    name = reference.get("name") if isinstance(reference, dict) else None
    match = _NAME.match(name) if isinstance(name, str) else None
    if pid is not None and match is not None and int(match.group(1)) != pid:
        raise _refuse(
            name, f"it was made by process {match.group(1)}, not by the engine (pid {pid})"
        )
    try:
        out = attach(reference, frames, first=1)
    except ValueError:
        if match is not None and not os.path.lexists(os.path.join(SHM_DIR, match.group(0))):
            raise ValueError(
                f"the result's shared-memory segment {name} is gone: its engine removes one "
                f"that no client read within {REPLY_TTL:g} s (JUPYTER_PX_SHM_REPLY_TTL)"
            ) from None
        raise
    if unlink:
        drop_result(reference)
    return out


def drop_result(reference: dict[str, Any]) -> None:
    """Remove the name of a result's segment, a reference :func:`take_result` took."""
    try:
        os.unlink(os.path.join(SHM_DIR, reference["name"]))  # (a name attach checked)
    except OSError:
        pass  # (the engine's expiry came first: the mapping is valid all the same)


def _pid_namespace() -> str:
    """8 hex digits naming this process's PID namespace (from its inode; zeros when not
    known)."""
    try:
        return f"{os.stat('/proc/self/ns/pid').st_ino & 0xFFFFFFFF:08x}"
    except OSError:
        return "0" * 8


def _new_name() -> str:
    """A new segment's name: ``jxpx-<pid>-`` then 32 hex digits, the first 8 this PID
    namespace's (the pid means something only there: see :func:`sweep_stale`)."""
    return f"{PREFIX}{os.getpid()}-{_pid_namespace()}{secrets.token_hex(12)}"


def tidy() -> list[str]:
    """:func:`sweep_stale`, logging what fails instead of raising it (tidying up never
    fails a push, nor a cluster's stop)."""
    try:
        return sweep_stale()
    except Exception as exc:
        log.warning("sweeping stale shared-memory segments failed: %s", exc)
        return []


def sweep_stale() -> list[str]:
    """Remove segments of this user's clients whose process is gone; returns their names.
    Only those made in this PID namespace: another's pid (a client in a container that
    shares /dev/shm) names no process here, dead or alive."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    uid = os.geteuid()
    namespace = _pid_namespace()
    for name in names:
        match = _NAME.match(name)
        if match is None or name[match.end(1) + 1 :][:8] != namespace:
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.lstat(path)  # (anyone may make a file of this name: ours only)
            if st.st_uid != uid or not stat.S_ISREG(st.st_mode) or _pid_alive(int(match.group(1))):
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < 2**22:  # (Linux's pid_max at most: no process has it)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: alive, another user's)
        return True
    return True


@atexit.register
def _unlink_live() -> None:
    """At exit, remove the segments this process made that are still named (not those
    inherited over a fork: their creator still uses them)."""
    mine = f"{PREFIX}{os.getpid()}-"
    with _live_lock:
        names = [n for n in _live if n.startswith(mine)]
        _live.clear()
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


def live_segments() -> list[str]:
    """Names of the segments this process made and has not yet unlinked."""
    with _live_lock:
        return sorted(_live)


def _refuse(name: Any, why: str) -> ValueError:
    shown = repr(name)[:80]
    return ValueError(f"shared-memory reference {shown} refused: {why}")


def _int(name: Any, field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _refuse(name, f"{field} must be an integer from {low} to {high}, not {value!r:.40}")
    return value


def attach(reference: Any, frames: Sequence[Any], first: int = 2) -> list[Any]:
    """``frames`` (an ``apply_request``'s buffers; with ``first=1``, a result's) with the
    placeholders that ``reference`` names replaced by read-only views on the mapped
    segment.

    Raises
    ------
    ValueError
        When the reference is malformed, names something that is not one of this user's
        segments, or does not match the segment or the message; the message names it.
    """
    if not isinstance(reference, dict) or set(reference) != {"name", "size", "frames"}:
        raise _refuse(reference, "it must be a dict of exactly 'name', 'size' and 'frames'")
    name = reference["name"]
    if not isinstance(name, str) or _NAME.match(name) is None:
        raise _refuse(name, f"the name is not a jupyter-px segment's ({PREFIX}<pid>-<hex>)")
    size = _int(name, "size", reference["size"], 1, 2**48)
    layout = reference["frames"]
    if not isinstance(layout, list) or not 0 < len(layout) <= MAX_FRAMES:
        raise _refuse(name, f"'frames' must be a list of 1 to {MAX_FRAMES} entries")
    out = list(frames)
    extents: list[tuple[int, int, int]] = []
    for entry in layout:
        if not isinstance(entry, list) or len(entry) != 3:
            raise _refuse(name, f"a frame entry must be [index, offset, nbytes], not {entry!r:.60}")
        index = _int(name, "a frame index", entry[0], first, len(frames) - 1)
        offset = _int(name, "an offset", entry[1], 0, size - 1)
        nbytes = _int(name, "a frame's nbytes", entry[2], 1, size - offset)
        if memoryview(frames[index]).nbytes != 0 or any(i == index for i, _, _ in extents):
            raise _refuse(name, f"frame {index} is not an empty placeholder, or named twice")
        extents.append((index, offset, nbytes))
    mapping = _map(name, size)
    view = memoryview(mapping)
    for index, offset, nbytes in extents:
        out[index] = view[offset : offset + nbytes]
    return out


def _map(name: str, size: int) -> mmap.mmap:
    """Map segment ``name`` read-only, once it is checked to be this user's, private, and
    ``size`` bytes long."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(os.path.join(SHM_DIR, name), flags)
    except FileNotFoundError:
        raise _refuse(
            name, "no such segment (its client closed, or its request was answered already)"
        ) from None
    except OSError as exc:
        raise _refuse(name, f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(name, "it is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise _refuse(name, "it is not private to this engine's user")
        if st.st_size != size:
            raise _refuse(name, f"the segment holds {st.st_size} bytes, the reference says {size}")
        try:
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError) as exc:
            raise _refuse(name, f"cannot map it: {exc}") from None
    finally:
        os.close(fd)
