"""``become_dask()`` / ``stop_dask()`` on a local cluster's engines."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytest.importorskip("distributed", reason="dask.distributed is not installed (the test extra)")


def _dask_servers() -> int:
    """On an engine: how many dask schedulers and workers in it are not closed."""
    import gc

    from distributed import Scheduler, Worker
    from distributed.core import Status

    return sum(
        isinstance(o, (Scheduler, Worker)) and o.status != Status.closed for o in gc.get_objects()
    )


def test_become_dask_twice_keeps_one_cluster_and_stop_dask_stops_it(rc):
    """A second ``become_dask`` keeps the cluster the first started (as IPython
    Parallel's): it started a second scheduler and workers, and left the first ones
    running on the engines, where ``stop_dask`` never stopped them."""
    first = rc.become_dask()
    try:
        second = rc.become_dask()
        assert second is first
        assert second.submit(lambda x: x + 1, 1).result(timeout=30) == 2
        assert len(second.scheduler_info()["workers"]) == len(rc.ids)
        assert sum(rc[:].apply_sync(_dask_servers)) == len(rc.ids) + 1
    finally:
        rc.stop_dask()
    assert rc[:].apply_sync(_dask_servers) == [0] * len(rc.ids)
    rc.stop_dask()  # (a second stop: nothing to do)
