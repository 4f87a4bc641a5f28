"""LoadBalancedView: work sent to whichever engine the scheduler picks."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol, wire
from kernel_engine.errors import NoEnginesRegistered
from kernel_engine.serialize import pack_apply

from ._asyncresult import AsyncResult, interrupt_running
from ._batch import SubmitBatch
from ._dependency import as_dependency
from ._request import Request
from ._views import View, _fname, _sliceable, chunk_packer

if TYPE_CHECKING:
    from ._client import Client


class _TaskFlags:
    """A load-balanced view's flags, checked, and JSON-encoded once for all the tasks of a
    call."""

    def __init__(self, flags: protocol.TaskFlags):
        self.flags = flags
        self.encoded = wire.dumps_json(flags.to_content())
        self.extra = {
            "label": flags.label,
            "after": list(flags.after.msg_ids) if flags.after else [],
            "follow": list(flags.follow.msg_ids) if flags.follow else [],
        }


def _dependency(name: str, value: Any) -> protocol.DependencySpec | None:
    """The wire form of an ``after``/``follow`` flag; TypeError naming the flag if bad."""
    try:
        spec = as_dependency(value)
    except TypeError as exc:
        raise TypeError(f"{name} must be msg_ids, AsyncResults or a Dependency: {exc}") from None
    return protocol.DependencySpec.from_content(name, spec)


def check_flag(name: str, value: Any) -> Any:
    """A load-balancing flag's value if it is valid; else TypeError/ValueError naming it.

    The controller checks again (:class:`kernel_engine.protocol.TaskFlags`): a flag set
    behind the view's back still never reaches its scheduler unchecked.
    """
    if name in ("after", "follow"):
        _dependency(name, value)
    elif name == "timeout":
        protocol.check_seconds(name, value)
    elif name == "time_limit":
        protocol.check_seconds(name, value, positive=True)
    elif name == "retries":
        protocol.check_int(name, value, 0, protocol.MAX_RETRIES)
    elif name == "label":
        protocol.check_label(name, value)
    return value


class LazyMapIterator:
    """The results of :meth:`LoadBalancedView.imap`, as they come; :meth:`cancel` stops
    taking more of the input."""

    def __init__(self) -> None:
        self.cancelled = False
        self.results: Iterator[Any] = iter(())

    def __iter__(self) -> LazyMapIterator:
        return self

    def __next__(self) -> Any:
        return next(self.results)

    def cancel(self) -> None:
        """Submit no more of the input (what is submitted already is still yielded)."""
        self.cancelled = True


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

    def _check_flags(self, flags: dict[str, Any]) -> None:
        """A value of the wrong type or range raises TypeError/ValueError naming the flag."""
        for name, value in flags.items():
            if name in self._flag_names:
                check_flag(name, value)
        super()._check_flags(flags)

    def _task_metadata(self) -> _TaskFlags:
        targets = None if self.targets is None else tuple(self._target_ids())
        flags = _TaskFlags(
            protocol.TaskFlags(
                targets=targets,
                after=_dependency("after", self.after),
                follow=_dependency("follow", self.follow),
                timeout=protocol.check_seconds("timeout", self.timeout),
                retries=protocol.check_int("retries", self.retries, 0, protocol.MAX_RETRIES),
                time_limit=protocol.check_seconds("time_limit", self.time_limit, positive=True),
                label=protocol.check_label("label", self.label),
            )
        )
        after, follow = flags.flags.after, flags.flags.follow
        if after or follow:
            self.transport.depend_on(
                [*(after.msg_ids if after else ()), *(follow.msg_ids if follow else ())]
            )
        return flags

    def _submit(self, buffers: list[Any], track: bool, md: _TaskFlags) -> Request:
        if not self.transport.engines:
            raise NoEnginesRegistered("the cluster has no engines to balance work over")
        return self.transport.submit(
            protocol.LB_ROUTE,
            protocol.APPLY_REQUEST,
            {},
            buffers,
            metadata=md.encoded,
            track=track,
            md_extra=md.extra,
        )

    def _batch(self, track: bool, md: _TaskFlags) -> SubmitBatch:
        """Sends the tasks of one call many to a message (see :mod:`._batch`)."""
        if not self.transport.engines:
            raise NoEnginesRegistered("the cluster has no engines to balance work over")
        return self.transport.submit_batch(
            protocol.APPLY_REQUEST, md.encoded, track=track, md_extra=md.extra
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
        ``ordered=False``; ``get()`` and ``block=True`` give the input's order); with
        ``return_exceptions`` an element that raised gives its error as its result instead
        of failing the map.
        """
        if not sequences:
            raise TypeError("map needs at least one sequence")
        protocol.check_int("chunksize", chunksize, 1, protocol.MAX_IDS)
        protocol.check_bool("ordered", ordered)
        protocol.check_bool("return_exceptions", return_exceptions)
        seqs = [_sliceable(s) for s in sequences]
        length = min(len(s) for s in seqs)
        md = self._task_metadata()
        track = bool(self.track if track is None else track)
        pack = chunk_packer(f, return_exceptions)
        futures: list[Request] = []
        sizes: list[int] = []
        with self._batch(track, md) as batch:
            for start in range(0, length, chunksize):
                parts = [s[start : start + chunksize] for s in seqs]
                futures.append(batch.add(pack(parts)))
                sizes.append(len(parts[0]))
        return self._map_result(futures, sizes, f, ordered, return_exceptions, block)

    def imap(
        self,
        f: Callable[..., Any],
        *sequences: Any,
        chunksize: int = 1,
        ordered: bool = True,
        max_outstanding: int | str = "auto",
        return_exceptions: bool = False,
    ) -> LazyMapIterator:
        """A lazy map: consumes the sequences (even infinite generators) as it goes.

        At most ``max_outstanding`` chunks are submitted and unfinished at a time
        (``'auto'``: 64 per engine). The iterator's ``cancel()`` stops consuming the
        input (what was submitted is still yielded). With ``return_exceptions``, an
        element that raised gives its error as its result instead of ending the map.

        When the input itself raises (a generator failing part way), the results of the
        elements before the failure are yielded, and then its exception is raised.
        """
        protocol.check_int("chunksize", chunksize, 1, protocol.MAX_IDS)
        protocol.check_bool("ordered", ordered)
        protocol.check_bool("return_exceptions", return_exceptions)
        if max_outstanding == "auto":
            limit = 64 * max(1, len(self.client.ids))
        else:
            limit = protocol.check_int("max_outstanding", max_outstanding, 1, protocol.MAX_IDS)
        iterator = LazyMapIterator()
        iterator.results = self._imap(
            iterator, f, sequences, chunksize, ordered, limit, return_exceptions
        )
        return iterator

    def _imap(
        self,
        state: LazyMapIterator,
        f: Callable[..., Any],
        sequences: Sequence[Any],
        chunksize: int,
        ordered: bool,
        limit: int,
        return_exceptions: bool,
    ) -> Iterator[Any]:
        iterators = [iter(s) for s in sequences]
        md = self._task_metadata()
        pack = chunk_packer(f, return_exceptions)
        pending: deque[AsyncResult] = deque()
        exhausted = False
        failed: BaseException | None = None  # (what the input raised, for after its results)
        while True:
            if not (exhausted or state.cancelled) and len(pending) < limit:
                with self._batch(False, md) as batch:  # (the refill leaves in batches)
                    while not (exhausted or state.cancelled) and len(pending) < limit:
                        chunk: list[tuple[Any, ...]] = []
                        try:
                            while len(chunk) < chunksize:
                                chunk.append(tuple([next(it) for it in iterators]))
                        except StopIteration:
                            exhausted = True
                        except Exception as exc:  # (the user's input failed: see imap)
                            exhausted, failed = True, exc
                        if not chunk:
                            exhausted = True
                            break
                        parts = [list(p) for p in zip(*chunk)]
                        future = batch.add(pack(parts))
                        ar = AsyncResult(self.client, [future], _fname(f), single=True)
                        self.history.extend(ar.msg_ids)
                        pending.append(ar)
            if not pending:
                if failed is not None:
                    raise failed
                return
            try:
                if ordered:
                    ar = pending[0]
                    self.transport.wait(ar._children, None)
                else:
                    self.transport.wait(pending, None, first=True)
                    ar = next(a for a in pending if a.done())
            except KeyboardInterrupt:  # (as in get: the engines stop, and no more is sent)
                state.cancelled = True
                interrupt_running(self.transport, [f for a in pending for f in a._children])
                raise
            pending.remove(ar)
            yield from ar.get()
