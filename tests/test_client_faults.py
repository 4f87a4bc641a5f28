"""Faults of the client's own process and threads: a forked child of a process that holds
a Client, waits on a closed client, interrupts of a paused engine."""

from __future__ import annotations

import multiprocessing
import os
import sys
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
    assert len(said) == 3, said
    for what in said:
        assert f"connected in process {os.getpid()}" in what, said
        assert "forked" in what and "new Client" in what, said
    assert child.exitcode == 0
    assert pending.get(WAIT) is None
    assert rc[:].apply_sync(abs, -2) == [2, 2]
