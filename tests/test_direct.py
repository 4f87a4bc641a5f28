"""The direct interface, with real engines: the seeds' DirectView and data movement examples."""

from __future__ import annotations

import os
import socket
import sys
import time

import cloudpickle
import numpy as np
import pytest

import jupyter_ext as jx
from jupyter_ext import Reference, interactive

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def clean(rc):
    rc[:].clear(block=True)


def test_ids_and_indexing_as_the_seeds_describe(rc):
    assert rc.ids == [0, 1]
    assert len(rc) == 2
    assert rc[0].targets == 0
    assert rc[-1].targets == rc.ids[-1]
    assert rc[::2].targets == rc.ids[::2]
    assert rc[0, 1].targets == [0, 1]
    assert rc[:].targets == rc.ids
    assert repr(rc[0]) == "<DirectView 0>"
    with pytest.raises(jx.InvalidTarget):
        rc[5]
    with pytest.raises(jx.InvalidTarget):
        rc[0, 7]
    with pytest.raises(TypeError, match="targets must be"):  # (not its keys)
        rc.queue_status(targets={0: 1})  # (the path shutdown takes too)


def test_apply_sync_getpid_and_hostname(rc):
    dview = rc[:]
    pids = dview.apply_sync(os.getpid)
    assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids
    assert dview.apply_sync(socket.gethostname) == [socket.gethostname()] * 2
    assert rc[0].apply_sync(os.getpid) == pids[0]


def test_apply_flags_block_targets_set_and_temp(rc):
    dview = rc[:]
    ar = dview.apply(lambda x: x + 1, 1)
    assert isinstance(ar, jx.AsyncResult) and ar.get(5) == [2, 2]
    dview.block = True
    assert dview.apply(lambda x: x * 3, 2) == [6, 6]
    with dview.temp_flags(block=False, targets=1):
        ar = dview.apply(lambda: 7)
        assert ar.get(5) == 7
    assert dview.block is True and dview.targets == [0, 1]
    dview.set_flags(block=False)
    assert isinstance(dview.apply(abs, -1), jx.AsyncResult)
    with pytest.raises(KeyError):
        dview.set_flags(nonsense=1)
    assert dview.apply_async(abs, -2).get(5) == [2, 2]


def test_dictionary_access_push_pull(dv):
    dv["a"] = ["foo", "bar"]
    assert dv["a"] == [["foo", "bar"], ["foo", "bar"]]
    dv.push({"b": 1, "c": "x"})
    assert dv.pull("b") == [1, 1]
    assert dv.pull(["b", "c"]) == [[1, "x"], [1, "x"]]
    assert dv.get("c") == ["x", "x"]
    dv.update({"d": 4})
    assert dv.pull("d", targets=0) == 4
    with pytest.raises(jx.CompositeError, match="NameError"):
        dv.pull("nope")


def test_lambda_is_a_pull(dv):
    dv["a"] = 5
    assert dv.apply(interactive(lambda: a)) == [5, 5]  # noqa: F821
    assert dv.pull("a") == [5, 5]


def test_interactive_function_assigns_engine_globals(dv):
    @interactive
    def setter(value):
        global z
        z = value

    dv.apply(setter, 42)
    assert dv["z"] == [42, 42]


def test_scatter_gather_as_the_seed(dv):
    assert dv.scatter("a", range(16)) == [None, None]
    assert dv["a"] == [range(0, 8), range(8, 16)]
    assert dv.gather("a") == list(range(16))
    dv.scatter("l", list(range(5)))
    assert dv["l"] == [[0, 1, 2], [3, 4]]
    assert dv.gather("l") == [0, 1, 2, 3, 4]
    dv.scatter("r", list(range(5)), dist="r")
    assert dv["r"] == [[0, 2, 4], [1, 3]]
    assert dv.gather("r", dist="r") == [0, 1, 2, 3, 4]


def test_scatter_flatten_and_reference_seed_example(rc):
    dv = rc[:]
    dv.block = True
    dv.scatter("id", rc.ids, flatten=True)
    assert dv["id"] == rc.ids
    ref = Reference("id")
    tic = time.time()
    ar = dv.apply(lambda t: (time.sleep(0.2 * t), t)[1], ref)
    assert ar == [0, 1]
    dv.block = False
    ar = dv.apply(time.sleep, Reference("id"))
    seen = [time.time() - tic for _ in ar]
    assert len(seen) == 2


def test_scatter_gather_numpy(dv):
    a = np.arange(10.0)
    dv.scatter("x", a)
    parts = dv["x"]
    assert [p.tolist() for p in parts] == [a[:5].tolist(), a[5:].tolist()]
    back = dv.gather("x")
    assert isinstance(back, np.ndarray) and back.tolist() == a.tolist()


def test_gather_of_numpy_scalars_and_round_robin_arrays(dv):
    """gather of a numpy scalar or 0-d array per engine raised ValueError (zero-dimensional
    arrays cannot be concatenated), and of round-robin arrays gave a list of scalars."""
    dv.scatter("x", np.arange(6.0))
    dv.execute("s = x.sum(); z = x.sum().reshape(())")
    assert dv.gather("s") == [3.0, 12.0]
    assert dv.gather("z") == [3.0, 12.0]
    a = np.arange(14).reshape(7, 2)
    dv.scatter("r", a, dist="r")
    back = dv.gather("r", dist="r")
    assert isinstance(back, np.ndarray) and back.dtype == a.dtype
    assert back.tolist() == a.tolist()


def test_gather_keeps_the_masks_of_masked_arrays(dv):
    """numpy.concatenate dropped the parts' masks: the gathered array had none."""
    m = np.ma.masked_array(np.arange(7), mask=[True, False] * 3 + [True])
    for dist in ("b", "r"):
        dv.scatter("m", m, dist=dist)
        back = dv.gather("m", dist=dist)
        assert isinstance(back, np.ma.MaskedArray)
        assert back.mask.tolist() == m.mask.tolist() and back.data.tolist() == m.data.tolist()


def test_map_and_scatter_take_what_does_not_slice(dv):
    """A dict (it has __getitem__ and __len__, but takes no slice) failed map and scatter
    with "unhashable type: 'slice'", and scatter of an int did not say what was wrong;
    as in IPython Parallel, a dict gives its keys."""
    assert dv.map(lambda k: k * 2, {"a": 1, "b": 2, "c": 3}) == ["aa", "bb", "cc"]
    dv.scatter("k", {"a": 1, "b": 2, "c": 3})
    assert dv["k"] == [["a", "b"], ["c"]]
    assert dv.map(lambda x: -x, {1, 2}) == [-1, -2]
    with pytest.raises(TypeError, match="scatter takes a sequence, not int"):
        dv.scatter("k", 5)
    with pytest.raises(TypeError, match="map takes a sequence, not int"):
        dv.map(abs, 5)


def test_a_push_that_does_not_pickle_names_the_name(dv):
    """push({"ok": 1, "l": Lock()}) said "cannot serialize argument 0 (dict)": not which
    name; scatter and apply did not say where in their argument either."""
    import threading

    with pytest.raises(jx.SerializationError, match=r"at \['l'\] \(lock\)"):
        dv.push({"ok": 1, "l": threading.Lock()})
    with pytest.raises(jx.SerializationError, match=r"at \['part'\]\[1\] \(lock\)"):
        dv.scatter("part", [1, threading.Lock(), 3, 4])
    with pytest.raises(jx.SerializationError, match=r"argument 0 \(dict\) at \['x'\]\[0\]"):
        dv.apply(len, {"x": [threading.Lock()]})


def test_static_map(dv):
    assert dv.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert dv.map(lambda x, y: x + y, [1, 2, 3], [10, 20, 30]) == [11, 22, 33]
    ar = dv.map_async(lambda x: x, range(5))
    assert isinstance(ar, jx.AsyncMapResult) and len(ar) == 5 and ar.get(5) == list(range(5))
    assert dv.map_sync(str, [1, 2]) == ["1", "2"]
    assert list(dv.imap(abs, [-1, -2, -3])) == [1, 2, 3]
    pids = dv.map(lambda _: os.getpid(), range(4))
    assert len(set(pids)) == 2  # one chunk per engine


def test_static_map_return_exceptions_keeps_each_elements_outcome(dv):
    """An element that raised gives its error in its place; the other elements of its
    engine's chunk keep their results (the whole chunk read as the error before), and
    the iteration yields the same."""

    def inv(x):
        return 1 / x

    out = dv.map(inv, [1, 0, 2, 4], return_exceptions=True)
    assert out[0] == 1.0 and out[2:] == [0.5, 0.25]
    assert isinstance(out[1], jx.RemoteError) and out[1].ename == "ZeroDivisionError"
    ar = dv.map_async(inv, [0, 1, 2, 0], return_exceptions=True)
    items = list(ar)
    assert items[1:3] == [1.0, 0.5]
    assert [type(items[i]).__name__ for i in (0, 3)] == ["RemoteError", "RemoteError"]
    with pytest.raises(jx.RemoteError):  # (without it, the map fails)
        dv.map(inv, [1, 0])


def test_execute_and_run(dv, tmp_path):
    ar = dv.execute("b = 5\nprint('hi')\nb * 2", silent=False)  # as a notebook cell
    replies = ar.get()
    assert [r.success for r in replies] == [True, True]
    assert ar.stdout == ["hi\n", "hi\n"]
    assert [md["execute_result"]["data"]["text/plain"] for md in ar.metadata] == ["10", "10"]
    quiet = dv.execute("print('quiet')\nb * 3")  # silent by default, as in IPython Parallel
    assert quiet.get() and quiet.stdout == ["quiet\n", "quiet\n"]
    assert quiet.execute_result == [None, None]
    assert dv["b"] == [5, 5]
    script = tmp_path / "script.py"
    script.write_text("from_file = 'yes'\n")
    dv.run(str(script))
    assert dv["from_file"] == ["yes", "yes"]
    with pytest.raises(jx.CompositeError, match="ZeroDivisionError"):
        dv.execute("1/0")
    single = dv.execute("print('one')", targets=0)
    assert single.get().success and single.stdout == "one\n"


def test_sync_imports(dv):
    with dv.sync_imports(quiet=True):
        import json
        import os.path as osp
        from math import sqrt as root
    assert (
        dv.apply(interactive(lambda: (json.__name__, osp.__name__, root(16))))
        == [("json", osp.__name__, 4.0)] * 2
    )


def test_sync_imports_of_modules_already_imported_here(dv):
    import math  # already bound in this frame before the block

    with dv.sync_imports(quiet=True):
        import math
        import os.path
    assert dv.apply(interactive(lambda: (math.sqrt(9), os.path.sep))) == [(3.0, "/")] * 2


def test_sync_imports_binds_only_what_the_imports_bind(dv):
    """Every local name holding the imported object was bound on the engines too:
    ``from errno import ENOENT`` beside a local ``n = 2`` overwrote the engines' ``n``."""
    dv["n"] = "the engines' own"
    n = 2
    with dv.sync_imports(quiet=True):
        import math as m
        from errno import ENOENT
    assert n == ENOENT and m.pi
    assert dv["n"] == ["the engines' own"] * 2
    assert dv.apply(interactive(lambda: (ENOENT, m.floor(2.5)))) == [(2, 2)] * 2


def test_sync_imports_of_submodules_the_engines_have_not_imported(dv):
    """``from xml.etree import ElementTree`` failed on the engines (AttributeError: module
    'xml.etree' has no attribute 'ElementTree') and ``import xml.dom.minidom`` imported
    only ``xml`` there, when the engines had not imported the submodule yet."""
    fresh = ("xml.etree.ElementTree", "xml.dom.minidom")
    assert dv.apply(lambda: [m for m in fresh if m in sys.modules]) == [[], []]
    with dv.sync_imports(quiet=True):
        import xml.dom.minidom
        from xml.etree import ElementTree
    assert ElementTree and xml.dom.minidom
    got = dv.apply(interactive(lambda: (ElementTree.__name__, xml.dom.minidom.__name__)))
    assert got == [fresh] * 2


def test_remote_traceback_lines_are_not_doubled(rc):
    with pytest.raises(jx.RemoteError) as info:
        rc[0].apply_sync(lambda: 1 / 0)
    assert "\n\n" not in info.value.traceback
    assert "ZeroDivisionError: division by zero" in info.value.traceback


def test_clear(dv):
    dv["gone"] = 1
    dv.clear()
    with pytest.raises(jx.CompositeError):
        dv.pull("gone")


def test_remote_errors_name_engine_and_traceback(rc):
    def boom():
        raise ValueError("bad value")

    with pytest.raises(jx.RemoteError) as info:
        rc[1].apply_sync(boom)
    err = info.value
    assert err.ename == "ValueError" and err.evalue == "bad value" and err.engine_id == 1
    assert "boom" in err.traceback and "bad value" in err.traceback
    assert "[Engine 1] ValueError: bad value" in "\n".join(err.render_traceback())
    with pytest.raises(jx.CompositeError) as cinfo:
        rc[:].apply_sync(boom)
    assert len(cinfo.value.elist) == 2
    assert {e.engine_id for e in cinfo.value.elist} == {0, 1}
    with pytest.raises(jx.RemoteError, match="bad value"):
        cinfo.value.raise_exception(0)


def test_unpicklable_argument_fails_at_submit(rc):
    import threading

    with pytest.raises(jx.SerializationError, match="argument 0"):
        rc[0].apply_sync(print, threading.Lock())


def test_unpicklable_result_is_a_remote_error(rc):
    with pytest.raises(jx.RemoteError, match="could not be sent back"):
        rc[0].apply_sync(lambda: __import__("threading").Lock())


def test_closures_and_the_seed_examples(rc):
    def f(a):
        def inner():
            return a

        return inner

    assert rc[0].apply_sync(f(1)) == 1
    assert rc[0].apply_sync(f(2)) == 2


def test_arrays_are_read_only_on_arrival_as_the_seed_says(rc):
    A = np.zeros(2)

    def setter(a):
        a[0] = 1
        return a

    with pytest.raises(jx.RemoteError, match="read-only"):
        rc[0].apply_sync(setter, A)

    def copying_setter(a):
        if not a.flags.writeable:
            a = a.copy()
        a[0] = 1
        return a

    out = rc[0].apply_sync(copying_setter, np.zeros(100_000))
    assert out[0] == 1.0
    assert not out.flags.writeable


def test_track_sent_and_wait_on_send(rc):
    view = rc[0]
    view.track = True
    A = np.random.random((1024, 1024))
    ar = view.apply_async(lambda x: 2 * x, A)
    ar.wait_on_send(10)
    assert ar.sent
    assert np.allclose(ar.get(10), 2 * A)


def test_get_dict_pid_map_seed(rc):
    ar = rc[:].apply_async(os.getpid)
    pids = ar.get_dict()
    assert sorted(pids) == rc.ids
    rc[:]["pid_map"] = pids
    assert rc[:]["pid_map"] == [pids, pids]


def test_get_dict_of_a_map_gives_each_engine_its_items(rc):
    """A map's get_dict paired the engines with its first items and dropped the others
    ({0: 0, 1: 10} for six items): each engine now has the items its chunk gave."""
    got = rc[:].map(lambda x: 10 * x, range(6)).get_dict(10)
    assert got == {0: [0, 10, 20], 1: [30, 40, 50]}
    lb = rc.load_balanced_view(targets=[1]).map(lambda x: x, range(4))
    with pytest.raises(ValueError, match="4 chunks ran on 1 engines; split"):
        lb.get_dict(10)
    assert [part.get_dict(10) for part in lb.split()] == [{1: [i]} for i in range(4)]


def test_output_is_captured_per_task(rc):
    def talk(x):
        print("out", x)
        print("err", x, file=sys.stderr)
        return x

    ar = rc[:].apply_async(talk, 3)
    assert ar.get(5) == [3, 3]
    assert ar.stdout == ["out 3\n", "out 3\n"]
    assert ar.stderr == ["err 3\n", "err 3\n"]


def test_a_task_printing_a_lone_surrogate_is_answered_and_its_engine_serves_on(rc):
    """``print(os.fsdecode(b"\\xff"))`` in a task (a file name that is no UTF-8): its
    reply could not be encoded, was never sent, and the engine took no more work; an
    error message holding one did the same. Both are answered now."""

    def prints() -> str:
        print("a\udcffb")
        return "done"

    def fails() -> None:
        raise ValueError("no file \udcff")

    ar = rc[0].apply_async(prints)
    assert ar.get(timeout=10) == "done"
    assert ar.stdout == "a\udcffb\n"
    with pytest.raises(jx.RemoteError, match="no file"):
        rc[0].apply_sync(fails)
    assert rc.load_balanced_view().apply_sync(prints) == "done"
    assert rc[0].apply_sync(abs, -7) == 7


def test_what_a_task_displayed_just_before_it_returned_is_in_its_outputs(rc):
    """A DirectView's reply comes straight from the engine's lane, its iopub through the
    controller: a display() just before the task returned came after the reply, and was
    dropped (found missing 30 times in 30); it now joins the task's outputs."""

    def shows() -> int:
        from IPython.display import display

        display({"text/plain": "shown"}, raw=True)
        return 1

    ars = [rc[0].apply_async(shows) for _ in range(5)]
    assert [ar.get(timeout=10) for ar in ars] == [1] * 5
    deadline = time.monotonic() + 10
    while not all(ar.outputs for ar in ars):
        assert time.monotonic() < deadline, [ar.outputs for ar in ars]
        time.sleep(0.05)
    assert all(ar.outputs[0]["data"] == {"text/plain": "shown"} for ar in ars)
