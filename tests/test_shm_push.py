"""Pushing one array to many engines on this host: one shared-memory segment, one copy
(and very large arrays to one engine, or from it as a result).

The segment's checks and lifetime without processes first (:mod:`kernel_engine.shm`),
then real clusters: every engine gets the same read-only array on the one segment, the
engines' memory grows by about one copy in all, and no segment is left behind after
success, an engine killed mid-push, or the client closing; a forged reference is an
error reply naming the segment, never an engine crash. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq

import jupyter_ext as jx
from kernel_engine import protocol, shm, wire
from kernel_engine.engine import ops
from kernel_engine.errors import RemoteError
from kernel_engine.launchers.base import stop_tree
from kernel_engine.serialize import pack_apply

MIB = 2**20


def _mine() -> list[str]:
    """Segments in /dev/shm named after this process (the client's)."""
    prefix = f"{shm.PREFIX}{os.getpid()}-"
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _frames(nbytes: int) -> list[Any]:
    return pack_apply(ops.push, ({"a": np.arange(nbytes, dtype=np.uint8)},), {})


def _name(tag: str = "0") -> str:
    """A well-formed name no client made (this process's pid, so no sweep removes it)."""
    return f"{shm.PREFIX}{os.getpid()}-{tag * 32}"


# ----- without processes


def test_share_and_attach_round_trip() -> None:
    arr = np.arange(3 * MIB // 8 + 1, dtype=np.float64)
    frames = pack_apply(ops.call_part, (arr, b"x" * (2 * MIB)), {})
    segment = shm.share(frames)
    assert segment is not None
    try:
        assert [e[0] for e in segment.frames] == [2, 3]
        assert all(offset % shm.ALIGN == 0 for _, offset, _ in segment.frames)
        sent = segment.placeholders(frames)
        assert [len(sent[i]) for i in (2, 3)] == [0, 0] and sent[:2] == frames[:2]
        got = shm.attach(segment.reference, sent)
        assert all(bytes(got[i]) == bytes(frames[i]) for i in range(len(frames)))
        assert all(memoryview(got[i]).readonly for i in (2, 3))
    finally:
        segment.unlink()
    segment.unlink()  # (twice: nothing happens)
    assert segment.name not in os.listdir(shm.SHM_DIR)
    assert segment.name not in shm.live_segments()


def test_a_result_names_only_a_segment_its_engine_made() -> None:
    result = [b"", b"x" * (2 * MIB)]
    segment = shm.share(result, first=1)  # (made by this process, as a push segment is)
    assert segment is not None
    try:
        sent = segment.placeholders(result)
        with pytest.raises(ValueError, match=f"made by process {os.getpid()}, not by the engine"):
            shm.take_result(segment.reference, sent, pid=os.getpid() + 1)
        assert segment.name in os.listdir(shm.SHM_DIR)  # (not unlinked)
        got = shm.take_result(segment.reference, sent, pid=os.getpid())
        assert bytes(got[1]) == result[1]
        assert segment.name not in os.listdir(shm.SHM_DIR)
    finally:
        segment.unlink()


def test_small_buffers_are_not_shared() -> None:
    frames = _frames(shm.THRESHOLD - 1)
    assert not shm.worth_sharing(frames)
    assert shm.share(frames) is None


def test_segment_goes_when_the_last_request_is_done() -> None:
    segment = shm.share(_frames(shm.THRESHOLD))
    assert segment is not None
    futures: list[concurrent.futures.Future[Any]] = [concurrent.futures.Future() for _ in range(3)]
    futures[0].set_result(None)  # (done before: counted at once)
    segment.release_after(futures)
    futures[1].set_exception(RuntimeError("engine gone"))
    assert segment.name in os.listdir(shm.SHM_DIR)
    futures[2].set_result(None)
    assert segment.name not in os.listdir(shm.SHM_DIR)


def test_an_interrupt_while_a_segment_is_made_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = _frames(shm.THRESHOLD)
    for step in ("_write_all", "os.ftruncate"):

        def interrupted(*args: Any) -> None:
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(shm, "_write_all", interrupted) if step == "_write_all" else (
                patch.setattr(shm.os, "ftruncate", interrupted)
            )
            with pytest.raises(KeyboardInterrupt):
                shm.share(frames)
        assert _mine() == [] and shm.live_segments() == [], step
    with monkeypatch.context() as patch:  # (a full /dev/shm: no segment, buffers by message)
        patch.setattr(shm.os, "ftruncate", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
        assert shm.share(frames) is None
    assert _mine() == [] and shm.live_segments() == []


def test_stale_segments_of_dead_clients_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    here = shm._pid_namespace()  # (a segment's name says its PID namespace)
    stale = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{dead.pid}-{here}{'a' * 24}")
    alive = os.path.join(shm.SHM_DIR, _name("b"))
    huge = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}9999999999-{here}{'c' * 24}")  # (no pid)
    for path in (stale, alive, huge):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        removed = shm.sweep_stale()
        assert os.path.basename(stale) in removed and not os.path.exists(stale)
        assert os.path.basename(huge) in removed
        assert os.path.exists(alive)
    finally:
        for path in (stale, alive, huge):
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_a_sweep_spares_the_segments_of_clients_in_another_pid_namespace() -> None:
    """A client in a container that shares /dev/shm names its segments with a pid of its
    own namespace; here that pid named no process, and a sweep (a cluster's stop,
    ``jupyter px clean``) removed the segment of a live client."""
    code = (
        "import sys; from kernel_engine import shm\n"
        "segment = shm.share([b'', b'', bytes(shm.THRESHOLD)])\n"
        "print(segment.name, flush=True); sys.stdin.read(); segment.unlink()\n"
    )
    # (a few hundred processes first: its pid, not a small one, is no process here)
    script = (
        f'i=0; while [ $i -lt 400 ]; do /bin/true; i=$((i+1)); done; "{sys.executable}" -c "$0"'
    )
    try:
        client = subprocess.Popen(
            ["unshare", "-Urpf", "--mount-proc", "sh", "-c", script, code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        pytest.skip(f"unshare: {exc}")
    try:
        name = client.stdout.readline().strip() if client.stdout else ""
        if not name:
            pytest.skip("no PID namespace here (unshare refused)")
        if os.path.exists(f"/proc/{name.split('-')[1]}"):
            pytest.skip("its pid names a process here too")
        assert name not in shm.sweep_stale()
        assert os.path.exists(os.path.join(shm.SHM_DIR, name))
    finally:
        client.communicate("", timeout=20)


def test_locality_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    here = {"hostname": socket.gethostname(), "pid": os.getpid()}
    assert shm.is_local(here)
    assert not shm.is_local({**here, "hostname": "elsewhere"})
    assert not shm.is_local({**here, "pid": None}) and not shm.is_local(None)
    monkeypatch.setenv("JUPYTER_PX_SHM", "0")
    assert not shm.enabled()


@pytest.fixture
def planted() -> Any:
    """Files under /dev/shm with well-formed names that are not fit to map."""
    made: list[str] = []

    def plant(tag: str, mode: int = 0o600, size: int = 4096, link: str | None = None) -> str:
        name = _name(tag)
        path = os.path.join(shm.SHM_DIR, name)
        if link is not None:
            os.symlink(link, path)
        else:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode)
            os.ftruncate(fd, size)
            os.fchmod(fd, mode)
            os.close(fd)
        made.append(path)
        return name

    yield plant
    for path in made:
        if os.path.lexists(path):
            os.unlink(path)


def test_forged_references_are_refused(planted: Any) -> None:
    frames = [b"f", b"p", b""]
    ok = planted("c")
    cases: list[tuple[Any, str]] = [
        ("not a dict", "exactly 'name'"),
        ({"name": ok, "size": 4096}, "exactly 'name'"),
        ({"name": "../../etc/passwd", "size": 1, "frames": [[2, 0, 1]]}, "not a jupyter-px"),
        ({"name": "psm_0123abcd", "size": 1, "frames": [[2, 0, 1]]}, "not a jupyter-px"),
        ({"name": ok + "/x", "size": 1, "frames": [[2, 0, 1]]}, "not a jupyter-px"),
        ({"name": _name("d"), "size": 10, "frames": [[2, 0, 10]]}, "no such segment"),
        ({"name": ok, "size": 4097, "frames": [[2, 0, 10]]}, "holds 4096 bytes"),
        ({"name": ok, "size": True, "frames": [[2, 0, 10]]}, "size must be an integer"),
        ({"name": ok, "size": 4096, "frames": [[1, 0, 10]]}, "frame index"),
        ({"name": ok, "size": 4096, "frames": [[3, 0, 10]]}, "frame index"),
        ({"name": ok, "size": 4096, "frames": [[2, 4000, 100]]}, "nbytes"),
        ({"name": ok, "size": 4096, "frames": [[2, -1, 10]]}, "offset"),
        ({"name": ok, "size": 4096, "frames": [[2, 0, 10], [2, 10, 10]]}, "named twice"),
        ({"name": ok, "size": 4096, "frames": []}, "'frames' must be"),
        ({"name": ok, "size": 4096, "frames": [[2, 0]]}, "[index, offset, nbytes]"),
        ({"name": planted("e", mode=0o644), "size": 4096, "frames": [[2, 0, 1]]}, "private"),
        ({"name": planted("f", link="/etc/passwd"), "size": 1, "frames": [[2, 0, 1]]}, "open"),
    ]
    for reference, why in cases:
        with pytest.raises(ValueError, match="shared-memory reference") as info:
            shm.attach(reference, frames)
        assert why in str(info.value), (reference, str(info.value))
    with pytest.raises(ValueError, match="not an empty placeholder"):
        shm.attach({"name": ok, "size": 4096, "frames": [[2, 0, 1]]}, [b"f", b"p", b"x"])
    assert len(shm.attach({"name": ok, "size": 4096, "frames": [[2, 8, 16]]}, frames)[2]) == 16


# ----- real clusters


def _uss(pid: int) -> int:
    """Bytes only process ``pid`` holds (private clean + dirty)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _host_shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


@jx.interactive
def _backing(name: str) -> str:
    """On an engine: what the array ``name`` lives on (``mmap``: the shared segment)."""
    import numpy

    x = globals()[name]
    while isinstance(x, numpy.ndarray) and x.base is not None:
        x = x.base
    return type(x.obj).__name__ if isinstance(x, memoryview) else type(x).__name__


@jx.interactive
def _checksum(a: Any) -> tuple[int, bool]:
    import zlib

    return zlib.crc32(a), bool(a.flags.writeable)


@pytest.fixture(scope="module")
def rc4() -> Any:
    from conftest import ClusterFactory

    factory = ClusterFactory()
    _, client = factory.start(4)
    client[:].apply_sync(lambda: __import__("numpy") and None)  # (imports out of the figures)
    yield client
    factory.stop_all()


def test_push_to_four_engines_costs_one_copy(rc4: Any) -> None:
    dv = rc4[:]
    pids = [rc4.engine_info(i)["pid"] for i in rc4.ids]
    arr = np.arange(64 * MIB // 8, dtype=np.float64)
    expected = zlib.crc32(arr)
    uss, shared = sum(_uss(p) for p in pids), _host_shmem()
    dv.push({"a": arr}, block=True)
    assert _mine() == [] and shm.live_segments() == []
    # every engine reads every page: equal, read-only, on the one segment
    assert dv.apply_sync(_checksum, jx.Reference("a")) == [(expected, False)] * 4
    assert dv.apply_sync(_backing, "a") == ["mmap"] * 4
    grown = sum(_uss(p) for p in pids) - uss + _host_shmem() - shared
    assert grown < 2 * arr.nbytes, f"{grown / arr.nbytes:.2f} copies"
    assert np.array_equal(rc4[3].pull("a", block=True), arr)  # (and back)
    # apply arguments take the same path; writing to a received array is refused
    assert dv.apply_sync(_checksum, arr) == [(expected, False)] * 4
    with pytest.raises(RemoteError, match="read-only"):
        rc4[0].execute("a[0] = 1.0", block=True)
    assert _mine() == []
    dv.execute("a = None", block=True)


def test_an_interrupt_just_after_the_segment_is_made_releases_it(
    rc4: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C's KeyboardInterrupt comes at the first call after share() returned (where
    # Python runs signal handlers); it used to come before the try that releases the
    # segment, which then stayed until the client's process exited
    from jupyter_ext._views import DirectView

    real, code, armed = shm.share, DirectView._send_apply.__code__, []

    def share_and_arm(frames: Any) -> Any:
        segment = real(frames)
        armed.append(segment)
        return segment

    def interrupt_next_call(frame: Any, event: str, arg: Any) -> None:
        caller = frame if event == "c_call" else frame.f_back
        if armed and event in ("call", "c_call") and caller and caller.f_code is code:
            sys.setprofile(None)
            raise KeyboardInterrupt

    monkeypatch.setattr(shm, "share", share_and_arm)
    sys.setprofile(interrupt_next_call)
    try:
        with pytest.raises(KeyboardInterrupt):
            rc4[:].push({"a": np.ones(2 * shm.THRESHOLD, dtype=np.uint8)}, block=True)
    finally:
        sys.setprofile(None)
    assert armed and armed[0] is not None
    assert _mine() == [] and shm.live_segments() == []
    monkeypatch.setattr(shm, "share", real)
    rc4[:].push({"a": 1}, block=True)  # (the views work on)
    assert rc4[:].pull("a", block=True) == [1] * 4


def test_small_buffers_to_one_engine_are_not_shared() -> None:
    frames = _frames(shm.ONE_ENGINE_THRESHOLD - 1)
    assert shm.worth_sharing(frames) and not shm.worth_sharing(frames, 1)
    assert shm.worth_sharing(_frames(shm.ONE_ENGINE_THRESHOLD), 1)


def test_a_very_large_array_to_one_engine_goes_through_a_segment(rc4: Any) -> None:
    """One copy, not two: the engine maps the client's segment; the segment's name goes
    once the engine answered, blocking or not, and the array reads back the same."""
    arr = np.arange(shm.ONE_ENGINE_THRESHOLD // 8, dtype=np.float64)
    expected = zlib.crc32(arr)
    rc4[0].push({"a": arr}, block=True)
    assert _mine() == [] and shm.live_segments() == []
    assert rc4[0].apply_sync(_backing, "a") == "mmap"
    assert rc4[0].apply_sync(_checksum, jx.Reference("a")) == (expected, False)
    ar = rc4[1].apply_async(_checksum, arr)  # (apply arguments too; the IO thread's path)
    assert ar.get(timeout=30) == (expected, False)
    assert _wait_for(lambda: _mine() == [] and shm.live_segments() == [])
    assert np.array_equal(rc4[0].pull("a", block=True), arr)
    with pytest.raises(RemoteError, match="read-only"):
        rc4[0].execute("a[0] = 1.0", block=True)
    rc4[0].execute("a = None", block=True)


def _held_by(x: Any) -> str:
    """What a received array lives on (``mmap``: a segment; ``Frame``: a zmq message)."""
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    return type(x.obj).__name__ if isinstance(x, memoryview) else type(x).__name__


def _engine_segments(pid: int) -> list[str]:
    prefix = f"{shm.PREFIX}{pid}-"
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))


def test_a_very_large_result_comes_back_through_a_segment(rc4: Any) -> None:
    """One copy, not two: the engine writes a result of 32 MiB or more into a segment,
    the client maps it read-only and removes its name as it reads the reply; the
    controller's record keeps no result for it (as for any result too large to keep)."""
    pid = rc4.engine_info(2)["pid"]
    rc4[2].execute("import numpy; a = numpy.arange(4 * 2**20, dtype=numpy.float64)", block=True)
    view = rc4[2]
    view.apply_sync(abs, -1)  # (the lane is in use: requests go to it directly)
    expected = np.arange(4 * 2**20, dtype=np.float64)
    blocking = view.pull("a", block=True)
    ar = view.pull("a", block=False)
    waited = ar.get(timeout=30)
    for got in (blocking, waited):
        assert np.array_equal(got, expected) and not got.flags.writeable
        assert _held_by(got) == "mmap"
    assert _engine_segments(pid) == []
    [record] = rc4.db_query({"msg_id": ar.msg_ids[0]}, keys=["status", "result_buffers"])
    assert record["status"] == "ok" and not record["result_buffers"]
    rc4[2].execute("a = None", block=True)


def test_results_through_the_controller_keep_their_buffers(
    rc4: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that does not reach the lanes (its requests go through the controller)
    gets its result in the reply itself: a segment is only for a client that sent the
    request to the engine itself and said it maps them."""
    monkeypatch.setenv("JUPYTER_PX_DIRECT", "0")
    routed = jx.Client(rc4.connection_file)
    try:
        routed[3].execute("import numpy; a = numpy.ones(4 * 2**20)", block=True)
        got = routed[3].pull("a", block=True)
        assert _held_by(got) == "Frame"
        assert float(got.sum()) == 4 * 2**20
        routed[3].execute("a = None", block=True)
    finally:
        routed.close()


def test_a_result_read_again_after_ctrl_c_is_still_there(rc4: Any) -> None:
    """Ctrl-C while a blocking call unpickles its result (read on the calling thread, its
    segment mapped) hands the reply to the IO thread, which reads it again: the segment's
    name stays until the reply is taken in, so that reading gets the result too (it got
    an error saying the engine removed the segment, no client having read it in 300 s)."""

    def _interrupting_result(client_pid: int) -> Any:
        """A very large result whose unpickling interrupts the client (Ctrl-C), then lasts."""
        import os
        import signal
        import time

        import numpy

        class Interrupts:
            def __reduce__(self) -> Any:
                return (os.kill, (client_pid, signal.SIGINT))

        class Slow:
            def __reduce__(self) -> Any:
                return (time.sleep, (0.5,))

        return [numpy.ones(5 * 2**20), Interrupts(), Slow()]

    pid = rc4.engine_info(1)["pid"]
    view = rc4[1]
    view.apply_sync(abs, -1)  # (the lane is in use: requests go to it directly)
    fired: list[int] = []

    def once(signum: int, frame: Any) -> None:  # (the second reading signals too)
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt

    saved = signal.signal(signal.SIGINT, once)
    try:
        with pytest.raises(KeyboardInterrupt):
            view.apply_sync(_interrupting_result, os.getpid())
        got = rc4.get_result(rc4.history[-1]).get(timeout=30)
    finally:
        signal.signal(signal.SIGINT, saved)
    assert float(got[0].sum()) == 5 * 2**20 and _held_by(got[0]) == "mmap"
    assert _wait_for(lambda: _engine_segments(pid) == [])


_LANE_CLIENT = """
import os, signal, sys, time, jupyter_ext as jx
rc = jx.Client(sys.argv[1])
lanes = rc.transport.io.lanes
deadline = time.monotonic() + 30
while not (0 in lanes.lanes and lanes.lanes[0].ready):  # (else it goes through the controller)
    assert time.monotonic() < deadline, "the lane did not answer its ping"
    time.sleep(0.01)


def late_big_result():
    import time, numpy

    time.sleep(3)
    return numpy.ones(4 * 2**20)
"""
"""A client process whose requests to engine 0 go to its lane (argv[1]: the connection
file), and a task whose very large result comes 3 s after it starts."""

_STOPPED_CLIENT = (
    _LANE_CLIENT
    + """
ar = rc[0].apply_async(late_big_result)
time.sleep(0.5)  # (sent: stopped at once, zmq's thread might not have sent it)
os.kill(os.getpid(), signal.SIGSTOP)  # (the reply waits in its socket, unread)
try:
    ar.get(timeout=30)
    print("no error")
except Exception as exc:
    print(type(exc).__name__, exc)
rc.close()
"""
)


@contextlib.contextmanager
def _client_process(script: str, connection_file: str) -> Iterator[subprocess.Popen[str]]:
    """A client process running ``script``, stopped by its PID (and its pipe closed)
    whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, connection_file], stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # (a stopped process takes no SIGKILL late)
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_result_segment_no_client_reads_goes_after_its_time(
    cluster_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client stopped before it read its reply never removes the result's segment:
    the engine does, JUPYTER_PX_SHM_REPLY_TTL s after it made it, and the client, once it
    runs again, gets an error that says so (not a result, not a hang)."""
    monkeypatch.setenv("JUPYTER_PX_SHM_REPLY_TTL", "2")
    _, rc = cluster_factory.start(1)
    pid = rc.engine_info(0)["pid"]
    with _client_process(_STOPPED_CLIENT, rc.connection_file) as proc:
        assert _wait_for(lambda: _engine_segments(pid) != [], timeout=30)
        assert _wait_for(lambda: _engine_segments(pid) == [], timeout=15)
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    assert "SerializationError" in out and "is gone" in out and "JUPYTER_PX_SHM_REPLY_TTL" in out
    assert rc[0].apply_sync(abs, -3) == 3


_KILLED_CLIENT = (
    _LANE_CLIENT
    + """
rc[0].apply_async(late_big_result)
time.sleep(0.5)  # (sent: the engine runs it)
print("sent", flush=True)
time.sleep(60)
"""
)


def test_a_result_segment_for_a_client_that_left_goes_at_once(cluster_factory: Any) -> None:
    """A client killed while its task ran never reads the reply: the engine, whose send
    to it fails, removes the result's segment then, not JUPYTER_PX_SHM_REPLY_TTL (300 s)
    later."""
    _, rc = cluster_factory.start(1)
    pid = rc.engine_info(0)["pid"]
    with _client_process(_KILLED_CLIENT, rc.connection_file) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        proc.kill()
        proc.wait(timeout=10)
        time.sleep(3)  # (the task ends: its reply has nobody to go to)
        assert _wait_for(lambda: _engine_segments(pid) == [], timeout=5)
    assert rc[0].apply_sync(abs, -4) == 4


def test_single_engine_and_small_arrays_keep_the_zmq_path(rc4: Any) -> None:
    rc4[0].push({"a": np.ones(2 * MIB, dtype=np.uint8)}, block=True)
    rc4[:2].push({"b": np.ones(shm.THRESHOLD // 2, dtype=np.uint8)}, block=True)
    assert rc4[0].apply_sync(_backing, "a") == "Frame"
    assert rc4[:2].apply_sync(_backing, "b") == ["Frame", "Frame"]
    assert _mine() == []
    rc4[:].execute("a = b = None", block=True)


def test_segment_removed_when_its_client_closes(rc4: Any) -> None:
    other = jx.Client(rc4.connection_file)
    try:
        busy = rc4[1].apply_async(time.sleep, 1.5)
        other[[0, 1]].push({"a": np.ones(4 * MIB, dtype=np.uint8)}, block=False)
        assert len(_mine()) == 1  # kept while engine 1 has yet to map it
    finally:
        other.close()
    assert _wait_for(lambda: _mine() == [], 10), _mine()
    busy.get(timeout=20)
    # the push that engine 1 ran after the close found no segment: an error, not a crash
    assert rc4[1].apply_sync(os.getpid) == rc4.engine_info(1)["pid"]
    rc4[:].execute("a = None", block=True)


class _Peer:
    """A key holder speaking the wire by hand on the controller's client port."""

    def __init__(self, connection_file: str):
        with open(connection_file) as f:
            info = json.load(f)
        self.wire = wire.Wire(info["key"].encode())
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(f"tcp://127.0.0.1:{info['client_port']}")

    def apply(self, engine: int, reference: Any, frames: list[Any], timeout: float) -> Any:
        route = protocol.route_frame("lane", engine)
        content = {shm.CONTENT_KEY: reference}
        header, out = self.wire.pack(protocol.APPLY_REQUEST, content, None, None, frames, [route])
        self.socket.send_multipart(out, copy=False)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.socket.poll(left * 1000), "no reply"
            msg = self.wire.recv(self.socket.recv_multipart(copy=False))
            if msg.parent_id == header["msg_id"]:
                return msg.content

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def test_forged_reference_over_the_wire_is_an_error_reply(rc4: Any) -> None:
    frames = _frames(shm.THRESHOLD)
    segment = shm.share(frames)
    assert segment is not None
    peer = _Peer(rc4.connection_file)
    try:
        sent = segment.placeholders(frames)
        traversal = {**segment.reference, "name": "../../etc/passwd"}
        wrong_size = {**segment.reference, "size": segment.size + 1}
        for reference, why in ((traversal, "not a jupyter-px"), (wrong_size, "bytes")):
            content = peer.apply(0, reference, sent, timeout=15)
            assert content["status"] == "error" and content["ename"] == "ValueError"
            assert "shared-memory reference" in content["evalue"] and why in content["evalue"]
        assert peer.apply(0, segment.reference, sent, timeout=15)["status"] == "ok"
    finally:
        peer.close()
        segment.unlink()
    assert rc4[0].apply_sync(lambda: 1) == 1
    rc4[0].execute("a = None", block=True)


def test_segment_removed_when_an_engine_dies_mid_push(cluster_factory: Any) -> None:
    _, rc = cluster_factory.start(2)
    busy = rc[1].apply_async(time.sleep, 30)
    ar = rc[:].push({"a": np.ones(4 * MIB, dtype=np.uint8)}, block=False)
    assert len(_mine()) == 1
    os.kill(rc.engine_info(1)["pid"], signal.SIGKILL)
    with pytest.raises(RemoteError, match=r"engine 1|Engine"):
        ar.get(timeout=20)
    assert _wait_for(lambda: _mine() == [], 10), _mine()
    with pytest.raises(RemoteError):
        busy.get(timeout=20)


_PUSHER = """
import sys, time
import numpy as np
import jupyter_ext as jx
rc = jx.Client(sys.argv[1])
rc[1].apply_async(time.sleep, 30)  # engine 1 is yet to map the segment
rc[:].push({"a": np.ones(4 * 1024 * 1024, dtype=np.uint8)}, block=False)
print("pushed", flush=True)
time.sleep(60)
"""


def test_a_killed_clients_segment_goes_when_the_cluster_stops(cluster_factory: Any) -> None:
    """A client SIGKILLed mid-push cannot remove its segment, and no client of this host
    may share one again: stopping the cluster removes it (it outlived the cluster, in
    memory, until a client somewhere shared a segment)."""
    cluster, rc = cluster_factory.start(2)
    pusher = subprocess.Popen(
        [sys.executable, "-c", _PUSHER, rc.connection_file], stdout=subprocess.PIPE, text=True
    )
    try:
        assert pusher.stdout is not None and pusher.stdout.readline() == "pushed\n"
        prefix = f"{shm.PREFIX}{pusher.pid}-"
        left = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)]
        assert len(left) == 1
    finally:
        pusher.kill()
        pusher.wait(10)
        if pusher.stdout is not None:
            pusher.stdout.close()
    assert os.path.exists(os.path.join(shm.SHM_DIR, left[0]))
    rc.send_signal(signal.SIGINT, [1])  # (the pusher's sleep)
    cluster.stop_cluster_sync(timeout=10)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, left[0]))


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare, as root"
)
def test_an_engine_with_its_own_dev_shm_gets_the_buffers_by_message(rc4: Any) -> None:
    # the same host, user and pids, but a private /dev/shm (a container sharing the
    # host's network): that engine cannot map our segments, so it is not sent one
    cmd = [
        "unshare",
        "-m",
        "sh",
        "-c",
        f"mount -t tmpfs none {shm.SHM_DIR} && exec {sys.executable} -m "
        f"kernel_engine.engine.register --file {rc4.connection_file} --id 20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rc4.wait_for_engines(5, timeout=60)
        assert not shm.is_local(rc4.engine_info(20)) and shm.is_local(rc4.engine_info(0))
        arr = np.arange(2 * MIB // 8, dtype=np.float64)
        view = rc4[[0, 1, 20]]
        view.push({"b": arr}, block=True)
        assert all(np.array_equal(got, arr) for got in view.pull("b", block=True))
    finally:
        stop_tree(proc, 10)


def test_push_to_eight_engines_is_one_broadcast_and_its_segment_goes_after_the_last(
    cluster_factory: Any,
) -> None:
    from jupyter_ext._views import SEGMENT_FAN_OUT

    _, rc = cluster_factory.start(SEGMENT_FAN_OUT)
    dv = rc[:]
    arr = np.arange(2 * MIB // 8, dtype=np.float64)
    expected = zlib.crc32(arr)
    other = jx.Client(rc.connection_file)  # (keeps the last engine busy: another
    try:  # client's request, which this client's push need not wait for)
        busy = other[SEGMENT_FAN_OUT - 1].apply_async(time.sleep, 3.0)
        time.sleep(0.5)
        sent = len(rc.transport._broadcasts)
        ar = dv.push({"a": arr}, block=False)
        assert len(rc.transport._broadcasts) == sent + 1  # (one message for all eight)
        assert _wait_for(lambda: sum(f.done() for f in ar._children) == SEGMENT_FAN_OUT - 1)
        assert len(_mine()) == 1  # (kept while the busy engine has not answered)
        ar.get(timeout=20)
        busy.get(timeout=20)
    finally:
        other.close()
    assert _wait_for(lambda: _mine() == [], 10), _mine()
    assert dv.apply_sync(_checksum, jx.Reference("a")) == [(expected, False)] * SEGMENT_FAN_OUT
