"""Remote functions: ``@view.remote()`` and ``@view.parallel()``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from kernel_engine import protocol
from kernel_engine.engine import ops
from kernel_engine.serialize import pack_apply

from ._lbview import LoadBalancedView
from ._views import DirectView, View, _fname, _GatherResult, _sliceable, partition


class RemoteFunction:
    """A function whose calls run through a view (``apply``)."""

    def __init__(self, view: View, f: Callable[..., Any], block: bool | None = None, **flags: Any):
        self.view = view
        self.func = f
        self.block = block
        self.flags = flags
        view._check_flags(self._flags())  # (a bad flag is refused here, not at the call)
        functools.update_wrapper(self, f)

    def _flags(self) -> dict[str, Any]:
        flags = dict(self.flags)
        if self.block is not None:
            flags["block"] = self.block
        return flags

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", repr(self.func))
        return f"<{type(self).__name__} {name} on {self.view!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.view.temp_flags(**self._flags()):
            return self.view.apply(self.func, *args, **kwargs)


class ParallelFunction(RemoteFunction):
    """A function called on parts of its sequence arguments, in parallel.

    ``pf(seq)`` calls the function once per part (one part per engine on a DirectView,
    ``chunksize`` elements on a LoadBalancedView) and joins the results; ``pf.map(seq)``
    calls it once per element, like the builtin ``map``.

    On a DirectView, ``chunksize`` is ignored, with a warning (as IPython Parallel's).

    ``return_exceptions``: a call that raised gives its error in place of its part of
    the joined result (``pf.map``: in place of its element) instead of failing them all.
    """

    def __init__(
        self,
        view: View,
        f: Callable[..., Any],
        dist: str = "b",
        block: bool | None = None,
        chunksize: int | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        **flags: Any,
    ):
        super().__init__(view, f, block=block, **flags)
        if dist != "b":
            raise ValueError("only dist='b' (contiguous blocks) is supported")
        protocol.check_bool("ordered", ordered)
        protocol.check_bool("return_exceptions", return_exceptions)
        if chunksize is not None:
            chunksize = protocol.check_int("chunksize", chunksize, 1, protocol.MAX_IDS)
        if chunksize is not None and isinstance(view, DirectView):
            warnings.warn(
                "chunksize is ignored on a DirectView: its calls get one part per engine",
                UserWarning,
                stacklevel=2,
            )
            chunksize = None
        self.chunksize = chunksize
        self.ordered = ordered
        self.return_exceptions = return_exceptions

    def __call__(self, *sequences: Any) -> Any:
        with self.view.temp_flags(**self._flags()):
            return call_on_parts(
                self.view,
                self.func,
                sequences,
                self.chunksize,
                self.ordered,
                self.return_exceptions,
            )

    def map(self, *sequences: Any) -> Any:
        """``map(f, *sequences)`` in parallel, one call per element."""
        if isinstance(self.view, DirectView):
            with self.view.temp_flags(**self._flags()):
                return self.view._static_map(
                    self.func, sequences, None, None, self.return_exceptions, self.ordered
                )
        kwargs: dict[str, Any] = {}
        if self.chunksize is not None:
            kwargs["chunksize"] = self.chunksize
        if not self.ordered:
            kwargs["ordered"] = False
        if self.return_exceptions:
            kwargs["return_exceptions"] = True
        with self.view.temp_flags(**self._flags()):
            return self.view.map(self.func, *sequences, **kwargs)


def _check_view(name: str, view: Any) -> None:
    if not isinstance(view, View):
        raise TypeError(f"{name} takes a view (e.g. rc[:]) as view, not {type(view).__name__}")


def remote(view: View, block: bool | None = None, **flags: Any) -> Callable[..., RemoteFunction]:
    """Decorator: calls of the function run on ``view``'s engines."""
    _check_view("remote", view)
    view._check_flags({**flags, **({} if block is None else {"block": block})})

    def decorate(f: Callable[..., Any]) -> RemoteFunction:
        return RemoteFunction(view, f, block=block, **flags)

    return decorate


_PARALLEL_ARGUMENTS = ("chunksize", "ordered", "return_exceptions")
"""``parallel(...)``'s keywords that go to the ParallelFunction, not to the view's flags."""


def parallel(
    view: View, dist: str = "b", block: bool | None = None, **flags: Any
) -> Callable[..., ParallelFunction]:
    """Decorator: the function is called on parts of its sequence arguments in parallel."""
    _check_view("parallel", view)
    for name in ("ordered", "return_exceptions"):
        if name in flags:
            protocol.check_bool(name, flags[name])
    if flags.get("chunksize") is not None:
        protocol.check_int("chunksize", flags["chunksize"], 1, protocol.MAX_IDS)
    view_flags = {k: v for k, v in flags.items() if k not in _PARALLEL_ARGUMENTS}
    view._check_flags({**view_flags, **({} if block is None else {"block": block})})

    def decorate(f: Callable[..., Any]) -> ParallelFunction:
        return ParallelFunction(view, f, dist=dist, block=block, **flags)

    return decorate


def call_on_parts(
    view: View,
    f: Callable[..., Any],
    sequences: Sequence[Any],
    chunksize: int | None,
    ordered: bool,
    return_exceptions: bool = False,
) -> Any:
    """A ParallelFunction's call: ``f`` on parts of the sequences, results joined
    (``return_exceptions``: a part that raised joined as its error)."""
    seqs = [_sliceable(s) for s in sequences]
    length = min(len(s) for s in seqs)
    if isinstance(view, DirectView):
        ids = view._target_ids()
        n = min(len(ids), length) or 1
        futures = []
        for i, t in enumerate(ids[:n]):
            parts = [partition(s, n, i) for s in seqs]
            futures += view._send_apply([t], pack_apply(ops.call_part, (f, *parts), {}), False)
    else:
        assert isinstance(view, LoadBalancedView)
        size = chunksize or max(1, -(-length // max(1, len(view.client.ids))))
        md = view._task_metadata()
        futures = [
            view._submit(
                pack_apply(ops.call_part, (f, *[s[i : i + size] for s in seqs]), {}), False, md
            )
            for i in range(0, length, size)
        ]
    ar = _GatherResult(view.client, futures, _fname(f), return_exceptions=return_exceptions)
    return view._finish(ar, None)
