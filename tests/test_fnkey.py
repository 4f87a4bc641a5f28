"""A function sent again is pickled again exactly when what its pickle holds changed
(``kernel_engine.fnkey``, ``serialize.dumps_function``): never a stale function. A
notebook's function carries its code, closure, defaults and the functions, modules and
classes it names, not the data it names: engines run it in their own namespace (as
IPython Parallel's do)."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import cloudpickle
import numpy as np
import pytest

import jupyter_ext as jx
from kernel_engine import fnkey, serialize


def notebook(source: str) -> dict[str, Any]:
    """The namespace of ``source`` run as a notebook's cells are (``__main__``: its
    functions travel by value)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace


def sent(f: Any, *args: Any) -> Any:
    """What ``f(*args)`` gives on an engine that unpickles what is sent for ``f``."""
    return cloudpickle.loads(serialize.dumps_function(f))(*args)


def test_the_same_function_is_pickled_once():
    ns = notebook(
        "import math\ndef helper(x):\n    return 2 * x\n"
        "def f(x):\n    return helper(math.floor(x))\n"
    )
    first = serialize.dumps_function(ns["f"])
    assert serialize.dumps_function(ns["f"]) is first  # (the bytes kept, not pickled)
    assert fnkey.fingerprint(ns["f"]) == fnkey.fingerprint(ns["f"])
    assert sent(ns["f"], 3.5) == 6


@pytest.mark.parametrize(
    "change",
    [
        "def helper(x):\n    return x + 1",  # a helper function redefined
        "helper.__defaults__ = (10,)",  # the helper's defaults
        "f.__defaults__ = (3,)",  # defaults
        "f.__kwdefaults__ = {'scale': 7}",  # keyword defaults
        "f.__code__ = (lambda x=2, *, scale=1: -x * scale * K).__code__",  # its code
        "f.flag = 1",  # an attribute
        "f.__doc__ = 'documented'",
        "f.__qualname__ = 'g'",
        "import math as helper",  # a name bound to something else
    ],
)
def test_what_the_pickle_holds_changed_so_it_is_pickled_again(change: str):
    ns = notebook(
        "K = 5 - 1\n"
        "def helper(x, step=0):\n    return x + step\n"
        "def f(x=2, *, scale=1):\n    return helper(x) * scale * K\n"
    )
    f = ns["f"]
    before = serialize.dumps_function(f)
    exec(change, ns)
    after = serialize.dumps_function(f)
    serialize._DUMPED.clear()
    assert after == serialize.dumps_function(f)  # what pickling it now gives
    assert after != before


def test_a_function_defined_after_the_first_send_is_seen():
    ns = notebook("def f():\n    return later()\n")
    serialize.dumps_function(ns["f"])
    exec("def later():\n    return 42", ns)
    assert sent(ns["f"]) == 42


@pytest.mark.parametrize(
    "source",
    [
        "K = 4\ndef f():\n    return K",
        "DATA = [1, 2]\ndef f():\n    return sum(DATA)",
        "import numpy as np\nDATA = np.ones(1 << 20)\ndef f():\n    return DATA.sum()",
        "class Box:\n    n = 3\nDATA = Box()\ndef f():\n    return DATA.n",
    ],
)
def test_the_data_a_notebooks_function_names_is_not_sent(source: str):
    ns = notebook(source)
    f = ns["f"]
    data = serialize.dumps_function(f)
    assert len(data) < 2000  # (not the megabytes of an array)
    assert fnkey.fingerprint(f) is not None  # (nothing sent may change unseen)
    with pytest.raises(NameError):  # (what an engine that was not given it says)
        cloudpickle.loads(data)()
    ns["DATA"] = ns["K"] = None
    assert serialize.dumps_function(f) is data
    assert f.__globals__ is ns


@pytest.mark.parametrize(
    "source",
    [
        "def make():\n    DATA = [1, 2]\n    def f():\n        return sum(DATA)\n"
        "    return f, DATA\nf, DATA = make()",  # a mutable value in the closure
        "DATA = [1, 2]\ndef f(data=DATA):\n    return sum(data)",  # a mutable default
        "DATA = [1, 2]\ndef f(*, data=DATA):\n    return sum(data)",  # a keyword's
    ],
)
def test_a_function_holding_a_mutable_value_is_pickled_every_time(source: str):
    ns = notebook(source)
    f = ns["f"]
    assert fnkey.fingerprint(f) is None
    assert sent(f) == 3
    ns["DATA"].append(10)
    assert sent(f) == 13  # the value as it is now, not as it was first sent


def test_a_module_function_by_value_carries_its_globals_and_is_keyed_by_them():
    # (a function of an importable module's, made inside a function: cloudpickle sends
    # it by value with its globals, and engines do not bind it to their namespace)
    ns = notebook("K = 1\nDATA = [1]\ndef make():\n    def f():\n        return K\n    return f")
    f = ns["make"]()
    ns["__name__"] = "px_factory"
    exec("def make2():\n    def g():\n        return K + sum(DATA)\n    return g", ns)
    g = ns["make2"]()
    assert f.__module__ == "__main__" and g.__module__ == "px_factory"
    assert fnkey.fingerprint(g) is None  # (a mutable global, sent: not keyed)
    assert sent(g) == 2
    ns["DATA"].append(1)
    assert sent(g) == 3


def test_a_class_of_the_notebook_is_pickled_every_time():
    ns = notebook("class Config:\n    n = 1\ndef f():\n    return Config.n")
    assert fnkey.fingerprint(ns["f"]) is None
    ns["Config"].n = 2
    assert sent(ns["f"]) == 2


def test_a_closure_over_a_scalar_that_changes():
    ns = notebook(
        "def make():\n    n = 1\n    def f():\n        return n\n"
        "    def bump():\n        nonlocal n\n        n += 1\n    return f, bump\n"
        "f, bump = make()"
    )
    assert sent(ns["f"]) == 1
    ns["bump"]()
    assert sent(ns["f"]) == 2


def test_recursive_and_mutually_recursive_functions():
    ns = notebook(
        "def even(n):\n    return n == 0 or odd(n - 1)\n"
        "def odd(n):\n    return n != 0 and even(n - 1)\n"
        "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\n"
    )
    assert fnkey.fingerprint(ns["even"]) is not None
    assert sent(ns["even"], 10) is True and sent(ns["fact"], 5) == 120
    exec("def odd(n):\n    return 'changed'", ns)
    assert sent(ns["even"], 3) == "changed"


def test_importable_things_are_keyed_by_name():
    ns = notebook("import math\nfrom json import dumps\ndef f(x):\n    return dumps(x) + math.pi")
    key = fnkey.fingerprint(ns["f"])
    assert key is not None and ("dumps", ("ref", "json", "dumps")) in key[0][-1]
    assert ("math", ("module", "math")) in key[0][-1]
    assert fnkey.fingerprint(math.floor) is None  # (not a Python function: pickled as before)


def test_a_module_registered_to_go_by_value_is_not_keyed_by_name(tmp_path, monkeypatch):
    (tmp_path / "px_byvalue_mod.py").write_text("def helper():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import px_byvalue_mod  # type: ignore[import-not-found]

    ns = notebook("import px_byvalue_mod\ndef f():\n    return px_byvalue_mod.helper()")
    ns2 = notebook("from px_byvalue_mod import helper\ndef f():\n    return helper()")
    assert fnkey.fingerprint(ns["f"]) is not None and fnkey.fingerprint(ns2["f"]) is not None
    cloudpickle.register_pickle_by_value(px_byvalue_mod)
    try:
        assert fnkey.fingerprint(ns["f"]) is None
        assert fnkey.fingerprint(ns2["f"]) is not None  # (its helper: by value, keyed so)
        px_byvalue_mod.helper.__code__ = (lambda: 2).__code__
        assert sent(ns2["f"]) == 2
    finally:
        cloudpickle.unregister_pickle_by_value(px_byvalue_mod)
        sys.modules.pop("px_byvalue_mod", None)


def test_a_dynamic_module_is_not_keyed():
    mod = types.ModuleType("px_nowhere")
    mod.n = 1
    ns = notebook("def f():\n    return mod.n")
    ns["mod"] = mod
    assert fnkey.fingerprint(ns["f"]) is None


def test_large_tuples_and_other_picklers_are_not_keyed():
    ns = notebook(
        "def f(t=tuple(range(1000))):\n    return len(t)\n"
        "def g(s=(1, 'a', (2.0, None))):\n    return s"
    )
    assert fnkey.fingerprint(ns["f"]) is None
    assert fnkey.fingerprint(ns["g"]) is not None
    serialize.use("pickle")
    try:
        ns["g"].__module__ = "math"  # (plain pickle: by reference; fails, not cached)
        with pytest.raises(serialize.SerializationError):
            serialize.dumps_function(ns["g"])
    finally:
        serialize.use("cloudpickle")


def test_a_dead_functions_id_reused_gives_no_stale_pickle():
    for i in range(200):  # new functions, often at the id of one just freed
        ns = notebook(f"def f():\n    return {i}\n")
        assert sent(ns["f"]) == i
        del ns


def test_odd_values_fall_back_to_pickling():
    deep: Any = ()
    for _ in range(100_000):
        deep = (deep,)
    ns = notebook("def f(d=None):\n    return d is not None")
    ns["f"].__defaults__ = (deep,)
    assert fnkey.fingerprint(ns["f"]) is None  # (too deep to key: no RecursionError)


def test_engines_run_a_notebooks_function_as_it_is_at_each_call(rc):
    ns = notebook(
        "import numpy as np\nK = 1\nDATA = np.ones(1 << 20)\n"
        "def helper():\n    return 1\n"
        "def f():\n    return helper() + K + float(DATA.sum())"
    )
    assert len(serialize.dumps_function(ns["f"])) < 2000  # (not DATA's 8 MiB)
    lview = rc.load_balanced_view()
    with pytest.raises(jx.RemoteError, match="NameError"):  # (engines were not given K)
        rc[0].apply_sync(ns["f"])
    rc[:].push({"K": 10, "DATA": np.ones(3)}, block=True)
    assert rc[0].apply_sync(ns["f"]) == 14 and lview.apply_sync(ns["f"]) == 14
    exec("def helper():\n    return 2", ns)  # (redefined: sent anew)
    assert rc[0].apply_sync(ns["f"]) == 15 and lview.apply_sync(ns["f"]) == 15
    assert rc[:].apply_sync(ns["f"]) == [15] * len(rc.ids)
    rc[:].push({"K": 20}, block=True)
    assert rc[:].apply_sync(ns["f"]) == [25] * len(rc.ids)
    assert lview.map_sync(lambda x: ns["helper"]() + x, [1, 2]) == [3, 4]


def test_a_submodule_imported_after_the_first_send_is_sent_along(tmp_path, monkeypatch):
    # (cloudpickle names the submodules of a package the function uses that are imported
    # when it pickles, for the engine to import them too)
    package = tmp_path / "px_pkg_sub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "inner.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ns = notebook("import px_pkg_sub\ndef f():\n    return px_pkg_sub.inner.VALUE")
    try:
        before = serialize.dumps_function(ns["f"])
        exec("import px_pkg_sub.inner", ns)
        after = serialize.dumps_function(ns["f"])
        assert after != before and b"px_pkg_sub.inner" in after
        serialize._DUMPED.clear()
        assert serialize.dumps_function(ns["f"]) == after
    finally:
        for name in ("px_pkg_sub.inner", "px_pkg_sub"):
            sys.modules.pop(name, None)


def test_zero_and_minus_zero_are_told_apart():
    ns = notebook("def f(x=0.0, z=0j):\n    return math.copysign(1, x), z")
    ns["math"] = math
    assert sent(ns["f"]) == (1.0, 0j)
    ns["f"].__defaults__ = (-0.0, complex(0.0, -0.0))
    sign, z = sent(ns["f"])
    assert sign == -1.0 and math.copysign(1, z.imag) == -1.0


def test_what_is_kept_goes_with_its_function_and_stays_small():
    import gc
    import weakref

    ns = notebook(
        "def make(blob):\n    def f():\n        return len(blob) + (f() if False else 0)\n"
        "    return f"
    )
    small, big = ns["make"](b"x" * 1000), ns["make"](b"x" * (1 << 20))
    assert serialize.dumps_function(small) is serialize.dumps_function(small)  # (kept)
    assert fnkey.fingerprint(big) is not None
    assert serialize.dumps_function(big) is not serialize.dumps_function(big)  # (too big)
    assert id(big) not in serialize._DUMPED
    gone = weakref.ref(small)  # (it calls itself: its key must not hold it)
    assert id(small) in serialize._DUMPED
    del small
    gc.collect()
    assert gone() is None
    assert all(weak() is not None for weak, _, _ in serialize._DUMPED.values())


def test_a_maps_function_leaves_the_data_it_names_behind_too():
    # (a map sends its function with every task: the data once per task, before)
    ns = notebook("import numpy as np\nDATA = np.ones(1 << 20)\nf = lambda i: DATA[i]")
    data = serialize.PickledFunction(ns["f"]).data
    assert len(data) < 2000
    with pytest.raises(NameError):
        cloudpickle.loads(data)(0)


def test_a_wrapped_notebook_function_leaves_its_data_behind_too():
    ns = notebook(
        "import numpy as np\nDATA = np.ones(1 << 20)\n"
        "def f():\n    return DATA.sum()\ndef helper():\n    return DATA.sum()\n"
        "def ok():\n    return DATA is not None"
    )
    big = {"DATA": ns["DATA"]}  # (objects given to require are sent: they are asked for)
    for wrapped, most in (
        (jx.require("math")(ns["f"]), 4000),
        (jx.require("math", ns["helper"])(ns["f"]), 6000),
        (jx.depend(ns["ok"])(ns["f"]), 6000),
        (jx.require(**big)(ns["f"]), (1 << 23) + 6000),  # (once, not twice)
    ):
        assert len(serialize.dumps_function(wrapped)) < most
    engine_ns = {"__builtins__": __builtins__, "DATA": np.ones(3)}  # (as a shell's)
    loaded = cloudpickle.loads(serialize.dumps_function(jx.depend(ns["ok"])(ns["f"])))
    assert serialize.bind_interactive(loaded, engine_ns)() == 3.0
