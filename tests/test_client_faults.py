"""Faults of the client's own process and threads (a forked child of a process that holds
a Client, waits on a closed client) and of engines (an interrupt of a stopped one)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 20.0
"""Seconds a test waits for what should take well under a second."""


def _use_in_child(rc, pending, out) -> None:
    """In a forked child: what each use of the parent's client does (its error, or
    'ok'), and that closing the copy returns."""
    said = []
    for use in (
        lambda: rc[0].apply_sync(abs, -1),
        lambda: rc[:].map_sync(abs, [-1]),
        lambda: pending.get(),
        lambda: rc.wait_for_engines(len(rc.ids) + 1, timeout=None),
    ):
        try:
            use()
        except RuntimeError as exc:
            said.append(str(exc))
        else:
            said.append("ok")
    rc.close()
    out.put(said)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_using_the_parents_client_gets_an_error_not_a_hang(cluster_factory):
    """A child forked (multiprocessing's fork) from a process that holds a Client has a
    copy of it without its IO thread: before, a call there (apply_sync, a map, get of a
    result pending at the fork) waited for ever. Now each raises at once, naming the
    fork, and the parent's client carries on, its pending result included."""
    _, rc = cluster_factory.start(2)
    pending = rc[1].apply_async(time.sleep, 1)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_use_in_child, args=(rc, pending, out))
    child.start()
    try:
        said = out.get(timeout=WAIT)
        child.join(WAIT)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    assert len(said) == 4, said
    for what in said:
        assert f"connected in process {os.getpid()}" in what, said
        assert "forked" in what and "new Client" in what, said
    assert child.exitcode == 0
    assert pending.get(WAIT) is None
    assert rc[:].apply_sync(abs, -2) == [2, 2]


def test_waiting_for_engines_ends_when_the_client_closes_or_on_its_io_thread(cluster_factory):
    """``wait_for_engines`` for more engines than run, without a timeout (IPython
    Parallel's default), polled for ever after the client closed (its future's thread,
    with ``block=False``, too), and from a done-callback blocked the IO thread, which
    alone takes registrations in. Now a callback's wait raises at once, and a closed
    client's waits raise RuntimeError."""
    _, rc = cluster_factory.start(1)
    got: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()

    def in_callback(_: object) -> None:
        try:
            rc.wait_for_engines(2)
        except BaseException as exc:
            got.set_result(exc)
        else:
            got.set_result(None)

    rc[0].apply_async(abs, -1).add_done_callback(in_callback)
    in_io_thread = got.result(WAIT)
    assert isinstance(in_io_thread, RuntimeError) and "IO thread" in str(in_io_thread)
    assert rc[0].apply_sync(abs, -3) == 3  # (the IO thread still serves)

    blocked: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()

    def wait_forever() -> None:
        try:
            rc.wait_for_engines(2)
        except BaseException as exc:
            blocked.set_result(exc)
        else:
            blocked.set_result(None)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    waiter.start()
    future = rc.wait_for_engines(2, block=False)
    time.sleep(0.2)  # (both are polling: nothing to wait on for that)
    assert not blocked.done() and not future.done()
    rc.close()
    assert isinstance(blocked.result(WAIT), RuntimeError)
    assert "closed" in str(blocked.result())
    with pytest.raises(RuntimeError, match="closed"):
        future.result(WAIT)
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "jupyter-px-wait-engines"]


def _sleep_after_touching(path: str, seconds: float) -> None:
    with open(path, "w"):
        pass
    time.sleep(seconds)


def _proc_status(pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return line.split()[1]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {WAIT} s"
        time.sleep(0.01)


def test_an_interrupt_sent_to_a_stopped_engine_cuts_its_sleep_when_it_continues(
    cluster_factory, tmp_path
):
    """rc.interrupt() of an engine that was stopped (SIGSTOP) and then continued: the
    SIGINT, pending while it was stopped, went to whichever of its threads woke first
    (the kernel picks no thread of a stopped process), so the main thread's
    ``time.sleep`` was not cut short and the interrupt came only when the task would have
    ended anyway. Now only the main thread takes SIGINT, and the task ends at once."""
    _, rc = cluster_factory.start(1)
    pid = rc[0].apply_sync(os.getpid)
    started = tmp_path / "started"
    ar = rc[0].apply_async(_sleep_after_touching, str(started), 60)
    _until(started.exists, "started")
    os.kill(pid, signal.SIGSTOP)
    try:
        _until(lambda: _proc_status(pid, "State") == "T", "stopped")
        rc.interrupt(targets=[0])
        # (the SIGINT is pending on the process, for a thread to take on SIGCONT)
        _until(lambda: int(_proc_status(pid, "ShdPnd"), 16) & 1 << (signal.SIGINT - 1), "sent")
    finally:
        os.kill(pid, signal.SIGCONT)
    t0 = time.monotonic()
    with pytest.raises(jx.RemoteError, match="KeyboardInterrupt"):
        ar.get(WAIT)
    assert time.monotonic() - t0 < 10
    assert rc[0].apply_sync(os.getpid) == pid  # (the engine carries on)


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_done_callback_that_exits_leaves_the_io_thread_and_other_results(cluster_factory, raised):
    """A done-callback that raised SystemExit (``sys.exit()`` in it) or KeyboardInterrupt
    ended the client's IO thread, which calls callbacks: every result still to come
    waited for ever, and every later blocking call failed saying it was made on the IO
    thread. Now the callback's exception is logged and the client carries on."""
    _, rc = cluster_factory.start(2)
    called = threading.Event()

    def leave(_: object) -> None:
        called.set()
        raise raised

    first = rc[0].apply_async(time.sleep, 0.5)
    first.add_done_callback(leave)
    first._children[0].add_done_callback(leave)  # (a request's own callback too)
    other = rc[1].apply_async(time.sleep, 1)
    many = rc.load_balanced_view().map_async(time.sleep, [0.2] * 6)
    many.add_done_callback(leave)
    assert first.get(WAIT) is None
    assert called.wait(WAIT)
    assert other.get(WAIT) is None
    assert many.get(WAIT) == [None] * 6
    assert rc.transport.io.thread.is_alive()
    assert rc[:].apply_sync(abs, -4) == [4, 4]


_STOPPED_CLIENT = """
import sys, time
import jupyter_ext as jx

rc = jx.Client(sys.argv[1])
rc.wait_for_engines(2, timeout=30)

def big(i):
    time.sleep(0.01)
    return bytes(1 << 20)

ar = rc.load_balanced_view().map(big, range(400), chunksize=1, block=False)
print("submitted", flush=True)
try:
    print("DONE", len(ar.get(timeout=90)), flush=True)
except Exception as exc:
    print("ERR", type(exc).__name__, str(exc)[:300], flush=True)
rc.close()
"""


def test_a_client_stopped_long_enough_to_have_replies_dropped_still_gets_them(
    cluster_factory, tmp_path
):
    """A client that reads nothing (SIGSTOPped) while its map's 400 MiB of results come
    gets the controller's messages past its bound (128 MiB) dropped; it used to wait for
    them for ever. Told of the drop when it reads again, it asks for its tasks' outcomes,
    which the task database kept."""
    import subprocess

    cluster, rc = cluster_factory.start(2)
    script = tmp_path / "client.py"
    script.write_text(_STOPPED_CLIENT)
    child = subprocess.Popen(
        [sys.executable, str(script), str(rc.connection_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "submitted"
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGSTOP)
        log = cluster.folder / "controller.log"
        deadline = time.monotonic() + 60
        while "which does not read them" not in log.read_text():
            assert time.monotonic() < deadline, "the controller dropped nothing"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=100)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait(10)
    assert out.strip().splitlines()[-1] == "DONE 400", out
