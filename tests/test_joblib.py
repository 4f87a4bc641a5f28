"""The joblib backend (``register_joblib_backend``) on real engines."""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest

import jupyter_ext as jx

joblib = pytest.importorskip("joblib")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fail_first(i: int) -> int:
    time.sleep(0.3)
    if i == 0:
        raise ValueError("boom")
    return i


def test_a_failed_parallel_aborts_only_its_own_tasks(rc):
    """A task failing in ``Parallel`` makes joblib abort what is left: the backend's own
    tasks, not the rest of the view's work (the user's tasks submitted meanwhile were
    aborted with it)."""
    view = rc.load_balanced_view()
    view.register_joblib_backend("px-abort-own")
    run = joblib.Parallel(backend="px-abort-own", return_as="generator")
    results = run(joblib.delayed(_fail_first)(i) for i in range(4))
    mine = [view.apply_async(time.sleep, 0.1) for _ in range(4)]
    with pytest.raises(jx.RemoteError, match="boom"):
        list(results)
    assert [ar.get(10) for ar in mine] == [None] * 4
