"""What a client keeps of finished work stays bounded in bytes, exact in its count, and
holds nothing the user dropped (cases found by an attacker's review of the byte bound)."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest

from jupyter_ext._bounded import BoundedDict


def test_one_big_result_does_not_evict_the_small_ones():
    d = BoundedDict[str, int](10_000, max_bytes=100)
    d.put_all([f"s{i}" for i in range(1000)], list(range(1000)), [0] * 1000)
    d.put_all(["big"], [-1], [1000])  # alone over the budget: kept, as the newest
    # evicting the 1000 small ones freed no byte of the budget
    assert len(d) == 1001


def test_a_copy_leaves_the_original_byte_count_alone():
    d = BoundedDict[str, int](100, max_bytes=100)
    d.put_all(["a", "b"], [1, 2], [60, 30])
    copy.copy(d)
    d.pop("a")
    d.pop("b")
    assert d.nbytes == 0


def test_results_can_be_deep_copied():
    d = BoundedDict[str, int](100, max_bytes=100)
    d.put_all(["a"], [1], [60])
    assert dict(copy.deepcopy(d)) == {"a": 1}


def test_a_pop_while_put_all_weighs_leaves_no_phantom_bytes():
    d = BoundedDict[str, str](100, max_bytes=1000)
    popper: list[threading.Thread] = []

    class Key(str):
        def __hash__(self) -> int:
            # in the middle of put_all (between "is it there" and "weigh it", once), another
            # thread pops the key, as a switch of the GIL there would
            if not popper:
                popper.append(threading.Thread(target=d.pop, args=(self, None)))
                popper[0].start()
                popper[0].join(0.2)
            return str.__hash__(self)

    d.put_all([Key("m1")], ["x"], [900])
    popper[0].join(5)
    assert not popper[0].is_alive()
    assert len(d) == 0
    assert d.nbytes == 0


def test_a_failing_task_does_not_keep_its_argument_in_the_client(rc):
    numpy = pytest.importorskip("numpy")

    def boom(a):
        return 1 / 0

    arg = numpy.ones(1 << 20)
    ref = weakref.ref(arg)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        rc[rc.ids[0]].apply_sync(boom, arg)
    del arg
    gc.collect()
    # rc.results and rc.metadata[msg_id]["error"] keep the error, whose __traceback__ has
    # the frames of apply_sync (args) and AsyncResult.get
    assert ref() is None
