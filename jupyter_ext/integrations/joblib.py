"""joblib on a cluster: ``register_joblib_backend()`` then ``Parallel(backend="ipyparallel")``.

A joblib backend whose workers are a view's engines: each batch joblib makes is one
``apply_async`` (load-balanced by default), and ``n_jobs`` is the number of engines.
``register_joblib_backend()`` with no view uses the newest running cluster, or starts one
(stopped when this process exits), as IPython Parallel's does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._executor import OwnWork

if TYPE_CHECKING:
    from .._views import View

DEFAULT_NAME = "ipyparallel"
"""The backend's name by default: IPython Parallel's, so its users' code runs as it is."""


def _default_view() -> View:
    """A load-balanced view of the newest running cluster, or of a new one."""
    from .._client import Client
    from .._cluster import Cluster

    try:
        client = Client()
    except FileNotFoundError:
        client = Cluster().start_and_connect_sync()
    return client.load_balanced_view()


def register_joblib_backend(
    name: str = DEFAULT_NAME, make_default: bool = False, view: View | None = None
) -> None:
    """Register a joblib backend named ``name`` running batches on ``view`` (default: a
    load-balanced view of the newest running cluster, made when joblib first uses it)."""
    import joblib
    from joblib.parallel import ParallelBackendBase

    class ViewBackend(ParallelBackendBase):  # type: ignore[misc]
        """joblib's batches as tasks of a view."""

        supports_retrieve_callback = True

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self._view = view
            # what this backend submitted and is not done: the view may run others'
            # work too (the user's own tasks, another Parallel), which an abort spares
            self._own = OwnWork()

        @property
        def view(self) -> View:
            if self._view is None:
                self._view = _default_view()
            return self._view

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            return max(1, len(self.view))

        def submit(self, func: Any, callback: Any = None) -> Any:
            ar = self.view.apply_async(func)
            self._own.add(ar)
            if callback is not None:
                ar.add_done_callback(callback)
            return ar

        def retrieve_result_callback(self, out: Any) -> Any:
            return out.get()

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """Abort this backend's tasks that have not started (only its own)."""
            for ar in self._own.take():
                ar.abort()

    joblib.register_parallel_backend(name, ViewBackend, make_default=make_default)
