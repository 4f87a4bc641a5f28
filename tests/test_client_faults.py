"""Faults of the client's own process and threads: a forked child of a process that holds
a Client, waits on a closed client, interrupts of a paused engine."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import threading
import time

import cloudpickle
import pytest

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
