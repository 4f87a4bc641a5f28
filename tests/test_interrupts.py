"""Ctrl-C while the client sends: a request is taken and sent, or neither (no request is
left counted as sent that never was, no message is left half sent), so the client's later
work on those engines still runs (:mod:`jupyter_ext._interrupts`)."""

from __future__ import annotations

import gc
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from jupyter_ext._interrupts import STALE, deferred_interrupts

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0


def noop() -> int:
    return 0


def test_an_interrupt_in_a_section_comes_at_its_end():
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (the handler has run: it only took note)
        reached = True
    assert reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_sections_deliver_one_interrupt_at_the_outermost_end():
    inner_done = False
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        inner_done = True
    assert inner_done


def test_a_long_section_holds_ctrl_c_past_the_usual_bound_nested_ones_too():
    """An ordinary section older than STALE counts as cut short (Ctrl-C then goes
    through); a long one does not, nor do sections nested in it."""
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts(long=True):
        time.sleep(STALE + 0.1)
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        done.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append(2)
    assert done == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():  # (the usual bound)
        time.sleep(STALE + 0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append(3)
    assert done == [1, 2]


def test_the_handler_that_was_there_gets_the_interrupt():
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert got == []
        assert got == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_outside_the_main_thread_nothing_changes():
    seen: list[Any] = []

    def run() -> None:
        with deferred_interrupts():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert seen == [signal.default_int_handler]


class _Alarm(Exception):
    pass


def test_another_signals_error_cutting_sections_short_never_swallows_ctrl_c(monkeypatch):
    """A SIGALRM whose handler raises, firing every 0.3 ms while sections begin and end
    (so that it cuts some swaps of the SIGINT handler short): Ctrl-C still raises
    KeyboardInterrupt afterwards, and the next section puts Python's handler back."""
    from jupyter_ext import _interrupts

    monkeypatch.setattr(_interrupts, "STALE", 0.05)

    armed = [False]  # (raise only inside the loop's try: anywhere else the test would)

    def alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _Alarm

    old_alarm = signal.signal(signal.SIGALRM, alarm)
    cut = 0
    gc.disable()  # (an exception in a collector's callback is swallowed: hypothesis has one)
    try:
        deadline = time.monotonic() + 2
        signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
        while time.monotonic() < deadline:
            try:
                armed[0] = True
                for _ in range(100):
                    with deferred_interrupts():
                        sum(range(20))
            except _Alarm:
                cut += 1
            finally:
                armed[0] = False  # (no call here: Python checks for signals at calls)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        gc.enable()
    assert cut > 100
    time.sleep(0.1)  # (past STALE: a section cut short before its end is over)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    with deferred_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_section_cut_short_passes_ctrl_c_on(monkeypatch):
    """The note-taking handler left installed with no section running, or by a section
    that never ended, passes the next Ctrl-C on and gives SIGINT back."""
    from jupyter_ext import _interrupts

    monkeypatch.setattr(_interrupts, "STALE", 0.05)
    _interrupts._SECTION.__enter__()  # (entered, never left: its end was cut short)
    time.sleep(0.1)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _interrupts._state.saved = signal.default_int_handler
    signal.signal(signal.SIGINT, _interrupts._note)  # (installed, the section not begun)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():  # (and sections work on)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


def _still_works(rc: Any) -> None:
    """Nothing is left waiting, and every path to every engine still answers."""
    transport = rc.transport
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with transport.requests.lock:  # (the IO thread changes the table)
            left = [r for r in transport.requests.live.values() if r.kind != "hub"]
        if not left:
            break
        time.sleep(0.05)
    assert left == [], f"requests never finished: {left[:4]}"
    assert rc.wait(timeout=TIMEOUT)
    assert rc[:].apply_async(noop).get(TIMEOUT) == [0, 0]
    assert rc[:].execute("x = 1", block=False).wait(TIMEOUT)
    assert rc.broadcast_view().apply_async(noop).get(TIMEOUT) == [0, 0]
    assert rc.load_balanced_view().map_sync(noop, []) == []


@pytest.mark.parametrize("where", ["direct", "broadcast", "batch"])
def test_an_interrupt_after_the_table_took_a_request_unsends_it(rc, monkeypatch, where):
    """KeyboardInterrupt raised at the worst moment: the table has the request(s), the
    message has not left. They end, failed, and the engines' order books let the next
    requests go."""
    transport = rc.transport
    real_send = transport.io.send
    fired: list[int] = []

    def interrupted_send(frames: Any, track: bool = False, lane: Any = None) -> Any:
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return real_send(frames, track, lane)

    monkeypatch.setattr(transport.io, "send", interrupted_send)
    with pytest.raises(KeyboardInterrupt):
        if where == "direct":
            rc[0].apply_async(noop)
        elif where == "broadcast":
            rc.broadcast_view().apply_async(noop)
        else:
            rc.load_balanced_view().map_async(lambda x: x, range(10))
    assert fired
    monkeypatch.undo()
    assert not [r for r in transport.requests.live.values() if r.kind != "hub"]
    _still_works(rc)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["direct", "broadcast", "balanced", "blocking"])
def test_ctrl_c_at_any_moment_of_a_loop_of_calls_leaves_nothing_waiting(rc, how):
    """Real SIGINTs at random moments while a loop submits (a user's Ctrl-C): after each,
    every request that was sent ends, and none is left waiting for ever. ``blocking``:
    calls to one engine that wait, each on the thread's own socket to it."""
    view = {
        "direct": rc[:],
        "broadcast": rc.broadcast_view(),
        "balanced": rc.load_balanced_view(),
        "blocking": rc[0],
    }[how]
    chance = random.Random(7)
    gc.disable()  # (an interrupt in a collector's callback is swallowed: hypothesis has one)
    try:
        _interrupt_loops(view, how, chance)
    finally:
        gc.enable()
    _still_works(rc)


def _interrupt_loops(view: Any, how: str, chance: random.Random) -> None:
    for _ in range(25):
        interrupted = False
        deadline = time.monotonic() + 20
        while not interrupted and time.monotonic() < deadline:
            # (an interrupt whose handler runs inside a garbage collector's callback, as
            # hypothesis installs one, is swallowed by Python: then another comes)
            timer = threading.Timer(
                chance.uniform(0.001, 0.006), lambda: os.kill(os.getpid(), signal.SIGINT)
            )
            try:
                timer.start()  # (inside: on a busy machine it may fire before start returns)
                again = time.monotonic() + 1
                while time.monotonic() < again:
                    if how == "balanced":
                        view.map_async(noop_arg, range(20))
                    elif how == "blocking":
                        view.apply_sync(noop)
                    else:
                        view.apply_async(noop)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                timer.cancel()
        assert interrupted, "no interrupt came in 20 s"


def noop_arg(x: int) -> int:
    return x
