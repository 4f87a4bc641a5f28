"""LoadBalancedView: work sent to whichever engine the scheduler picks."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol
from kernel_engine.engine import ops
from kernel_engine.errors import NoEnginesRegistered
from kernel_engine.serialize import PickledFunction, dumps_function, pack_apply

from ._asyncresult import AsyncMapResult, AsyncResult, MessageFuture
from ._dependency import as_dependency
from ._views import View, _fname, _sliceable

if TYPE_CHECKING:
    from ._client import Client


class _TaskFlags:
    """A load-balanced view's flags, JSON-encoded once for all the tasks of a call."""

    def __init__(self, flags: dict[str, Any]):
        self.flags = flags
        self.encoded = protocol.dumps_json(flags)
        after, follow = flags["after"], flags["follow"]
        self.extra = {
            "label": flags["label"],
            "after": after["msg_ids"] if after else [],
            "follow": follow["msg_ids"] if follow else [],
        }


class LoadBalancedView(View):
    """Work sent to whichever engine the controller's scheduler picks.

    Flags beyond every view's: ``after`` (run after these tasks), ``follow`` (run where
    these tasks ran), ``timeout`` (seconds to wait for those dependencies), ``retries``
    (resubmit a task that failed or whose engine died), ``time_limit`` (seconds a task may
    run before it is interrupted and fails with TaskTimeout); ``targets`` restricts engines.
    """

    _flag_names = (*View._flag_names, "after", "follow", "timeout", "retries", "time_limit")

    def __init__(self, client: Client, targets: Any = None):
        super().__init__(client, targets)
        self.after: Any = None
        self.follow: Any = None
        self.timeout: float | None = None
        self.retries = 0
        self.time_limit: float | None = None

    def __repr__(self) -> str:
        return f"<LoadBalancedView {self.targets}>"

    def __getattr__(self, name: str) -> Any:
        if name in ("push", "pull", "scatter", "gather", "execute", "update", "run"):
            raise AttributeError(
                f"LoadBalancedView has no {name}(): where a task runs is the scheduler's "
                "choice; use a DirectView (rc[:]) to move data"
            )
        raise AttributeError(name)

    def _task_metadata(self) -> _TaskFlags:
        targets = None if self.targets is None else self._target_ids()
        return _TaskFlags(
            {
                "targets": targets,
                "after": as_dependency(self.after),
                "follow": as_dependency(self.follow),
                "timeout": self.timeout,
                "retries": self.retries,
                "time_limit": self.time_limit,
                "label": self.label,
            }
        )

    def _submit(self, buffers: list[Any], track: bool, md: _TaskFlags) -> MessageFuture:
        if not self.client.ids and not self.client._engines:
            raise NoEnginesRegistered("the cluster has no engines to balance work over")
        return self.client._send(
            protocol.LB_ROUTE,
            protocol.APPLY_REQUEST,
            {},
            buffers,
            metadata=md.encoded,
            track=track,
            md_extra=md.extra,
        )

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        if targets is not None:
            with self.temp_flags(targets=targets):
                return self._really_apply(f, args, kwargs, None, block, track)
        md = self._task_metadata()
        future = self._submit(
            pack_apply(f, args, kwargs), bool(self.track if track is None else track), md
        )
        ar = AsyncResult(self.client, [future], _fname(f), None, single=True)
        return self._finish(ar, block)

    def map(
        self,
        f: Callable[..., Any],
        *sequences: Any,
        block: bool | None = None,
        track: bool | None = None,
        chunksize: int = 1,
        ordered: bool = True,
        return_exceptions: bool = False,
    ) -> Any:
        """Load-balanced map: one task per ``chunksize`` elements.

        The AsyncMapResult iterates as results arrive (in completion order with
        ``ordered=False``); with ``return_exceptions`` an element that raised gives its
        error as its result instead of failing the map.
        """
        if not sequences:
            raise TypeError("map needs at least one sequence")
        if chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, not {chunksize}")
        seqs = [_sliceable(s) for s in sequences]
        length = min(len(s) for s in seqs)
        md = self._task_metadata()
        track = bool(self.track if track is None else track)
        mapper = ops.map_chunk_safe if return_exceptions else ops.map_chunk
        once = PickledFunction(f)
        head = dumps_function(mapper)
        futures, sizes = [], []
        for start in range(0, length, chunksize):
            parts = [s[start : start + chunksize] for s in seqs]
            buffers = pack_apply(mapper, (once, *parts), {}, head)
            futures.append(self._submit(buffers, track, md))
            sizes.append(len(parts[0]))
        ar = AsyncMapResult(
            self.client,
            futures,
            sizes,
            _fname(f),
            ordered=ordered,
            return_exceptions=return_exceptions,
        )
        return self._finish(ar, block)

    def imap(
        self,
        f: Callable[..., Any],
        *sequences: Any,
        chunksize: int = 1,
        ordered: bool = True,
        max_outstanding: int | str = "auto",
    ) -> Iterator[Any]:
        """A lazy map: consumes the sequences (even infinite generators) as it goes.

        At most ``max_outstanding`` chunks are submitted and unfinished at a time
        (``'auto'``: 64 per engine).
        """
        limit = (
            64 * max(1, len(self.client.ids)) if max_outstanding == "auto" else int(max_outstanding)
        )
        iterators = [iter(s) for s in sequences]
        md = self._task_metadata()
        once = PickledFunction(f)
        head = dumps_function(ops.map_chunk)
        pending: list[tuple[AsyncResult, int]] = []
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                chunk: list[tuple[Any, ...]] = []
                for _ in range(chunksize):
                    try:
                        chunk.append(tuple(next(it) for it in iterators))
                    except (StopIteration, RuntimeError):
                        exhausted = True
                        break
                if not chunk:
                    exhausted = True
                    break
                parts = [list(p) for p in zip(*chunk)]
                future = self._submit(
                    pack_apply(ops.map_chunk, (once, *parts), {}, head), False, md
                )
                ar = AsyncResult(self.client, [future], _fname(f), single=True)
                self.history.extend(ar.msg_ids)
                pending.append((ar, len(chunk)))
            if not pending:
                return
            if ordered:
                ar, _ = pending.pop(0)
            else:
                concurrent.futures.wait(
                    [a for a, _ in pending], None, concurrent.futures.FIRST_COMPLETED
                )
                index = next(i for i, (a, _) in enumerate(pending) if a.done())
                ar, _ = pending.pop(index)
            yield from ar.get()
