"""Views: how work is sent to engines (DirectView: to named engines)."""

from __future__ import annotations

import builtins
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol
from kernel_engine.engine import ops
from kernel_engine.serialize import PickledFunction, pack_apply

from ._asyncresult import AsyncMapResult, AsyncResult, MessageFuture

if TYPE_CHECKING:
    from ._client import Client


def _fname(f: Any) -> str:
    return str(getattr(f, "__name__", None) or type(f).__name__)


def partition(seq: Any, n: int, i: int, dist: str = "b") -> Any:
    """Part ``i`` of ``n`` of a sequence: contiguous blocks (``'b'``) or round robin (``'r'``)."""
    if dist == "r":
        return seq[i::n]
    if dist != "b":
        raise ValueError(f"dist must be 'b' (blocks) or 'r' (round robin), not {dist!r}")
    base, extra = divmod(len(seq), n)
    start = i * base + min(i, extra)
    return seq[start : start + base + (1 if i < extra else 0)]


def _sliceable(seq: Any) -> Any:
    return seq if hasattr(seq, "__getitem__") and hasattr(seq, "__len__") else list(seq)


class View:
    """What every view shares: flags, apply, map, waiting.

    Flags: ``block`` (wait and return results instead of AsyncResults), ``track`` (let
    ``AsyncResult.sent`` say when zmq is done with sent buffers), ``targets``, ``label``.
    """

    _flag_names: tuple[str, ...] = ("block", "track", "targets", "label")

    def __init__(self, client: Client, targets: Any = None):
        self.client = client
        self.targets = targets
        self.block = False
        self.track = False
        self.label: str | None = None
        self.history: list[str] = []

    def set_flags(self, **flags: Any) -> None:
        """Set view flags (``block``, ``track``, ``targets``, ...)."""
        for name, value in flags.items():
            if name not in self._flag_names:
                raise KeyError(f"invalid flag {name!r}; flags are {self._flag_names}")
            setattr(self, name, value)

    @contextlib.contextmanager
    def temp_flags(self, **flags: Any) -> Iterator[None]:
        """Set flags for the duration of a ``with`` block."""
        saved = {name: getattr(self, name) for name in flags}
        self.set_flags(**flags)
        try:
            yield
        finally:
            self.set_flags(**saved)

    def apply(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely; result or AsyncResult per ``block``."""
        return self._really_apply(f, args, kwargs)

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Call ``f(*args, **kwargs)`` remotely; returns an AsyncResult at once."""
        result: AsyncResult = self._really_apply(f, args, kwargs, block=False)
        return result

    def apply_sync(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely and wait for the result."""
        return self._really_apply(f, args, kwargs, block=True)

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        raise NotImplementedError

    def map(self, f: Callable[..., Any], *sequences: Any, **kwargs: Any) -> Any:
        """Parallel ``map``; result list or AsyncMapResult per ``block``."""
        raise NotImplementedError

    def map_async(self, f: Callable[..., Any], *sequences: Any, **kwargs: Any) -> Any:
        return self.map(f, *sequences, block=False, **kwargs)

    def map_sync(self, f: Callable[..., Any], *sequences: Any, **kwargs: Any) -> Any:
        return self.map(f, *sequences, block=True, **kwargs)

    def imap(self, f: Callable[..., Any], *sequences: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate over the results of a map as they arrive (in order)."""
        return iter(self.map(f, *sequences, block=False, **kwargs))

    def _finish(self, ar: AsyncResult, block: bool | None) -> Any:
        self.history.extend(ar.msg_ids)
        if not (self.block if block is None else block):
            return ar
        return self._block_on(ar)

    def _block_on(self, ar: AsyncResult) -> Any:
        """Wait for ``ar``; Ctrl-C interrupts the engines running it, then re-raises."""
        try:
            return ar.get()
        except KeyboardInterrupt:
            running = {
                f.metadata["engine_id"]
                for f in ar._children
                if not f.done() and f.metadata["engine_id"] is not None
            }
            if running:
                with contextlib.suppress(Exception):
                    self.client.send_signal(signal.SIGINT, sorted(running))
            raise

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for jobs (default: everything sent through this view); returns whether done."""
        return self.client.wait(self.history if jobs is None else jobs, timeout)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        """Do not run these jobs (default: all this view's outstanding ones)."""
        if jobs is None:
            jobs = [m for m in self.history if m in self.client.outstanding]
        self.client.abort(jobs, targets=targets, block=bool(block))

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict[Any, Any]:
        return self.client.queue_status(targets if targets is not None else self.targets)

    def purge_results(self, jobs: Any = "all", targets: Any = None) -> None:
        self.client.purge_results(jobs, targets)

    def remote(self, block: bool | None = None, **flags: Any) -> Callable[..., Any]:
        """Decorator: calls of the function run through this view."""
        from ._remotefunction import remote

        return remote(self, block=block, **flags)

    def parallel(
        self, dist: str = "b", block: bool | None = None, **flags: Any
    ) -> Callable[..., Any]:
        """Decorator: the function is called on parts of its sequence arguments in parallel."""
        from ._remotefunction import parallel

        return parallel(self, dist=dist, block=block, **flags)

    def get_result(self, msg_ids: Any, block: bool | None = None) -> Any:
        """The result of earlier work (msg_ids or AsyncResults), as an AsyncResult."""
        ar = self.client.get_result(msg_ids)
        return ar.get() if (self.block if block is None else block) else ar

    @property
    def executor(self) -> Any:
        """A ``concurrent.futures.Executor`` submitting through this view."""
        from ._executor import ViewExecutor

        return ViewExecutor(self)

    def __len__(self) -> int:
        return len(self._target_ids())

    def _target_ids(self, targets: Any = None) -> list[int]:
        return self.client._build_targets(self.targets if targets is None else targets)


class DirectView(View):
    """Work sent to named engines: every target runs every call.

    ``rc[0]`` (one engine: results are single values), ``rc[:]``, ``rc[::2]``,
    ``rc[0, 1]`` (several: results are lists in target order).
    """

    def __repr__(self) -> str:
        return f"<DirectView {self.targets}>"

    def _is_single(self, targets: Any) -> bool:
        return isinstance(targets, int)

    def _send_apply(
        self, targets: list[int], buffers: list[Any], track: bool
    ) -> list[MessageFuture]:
        client = self.client
        metadata = {"label": self.label} if self.label else None
        return [
            client._send(
                protocol.route_frame("lane", t),
                protocol.APPLY_REQUEST,
                {},
                buffers,
                metadata=metadata,
                engine_id=t,
                track=track,
                md_extra={"label": self.label},
            )
            for t in targets
        ]

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        chosen = self.targets if targets is None else targets
        ids = self._target_ids(chosen)
        buffers = pack_apply(f, args, kwargs)
        futures = self._send_apply(ids, buffers, self.track if track is None else track)
        ar = AsyncResult(self.client, futures, _fname(f), ids, single=self._is_single(chosen))
        return self._finish(ar, block)

    def map(
        self,
        f: Callable[..., Any],
        *sequences: Any,
        block: bool | None = None,
        track: bool | None = None,
        return_exceptions: bool = False,
    ) -> Any:
        """Static map: each engine gets one contiguous chunk of the sequences."""
        if not sequences:
            raise TypeError("map needs at least one sequence")
        seqs = [_sliceable(s) for s in sequences]
        length = min(len(s) for s in seqs)
        seqs = [s[:length] if len(s) != length else s for s in seqs]
        ids = self._target_ids()
        n = min(len(ids), length) or 1
        futures, sizes = [], []
        once = PickledFunction(f)
        for i, t in enumerate(ids[:n]):
            parts = [partition(s, n, i) for s in seqs]
            buffers = pack_apply(ops.map_chunk, (once, *parts), {})
            futures += self._send_apply([t], buffers, bool(self.track if track is None else track))
            sizes.append(len(parts[0]))
        ar = AsyncMapResult(
            self.client, futures, sizes, _fname(f), return_exceptions=return_exceptions
        )
        return self._finish(ar, block)

    def execute(
        self, code: str, silent: bool = False, targets: Any = None, block: bool | None = None
    ) -> AsyncResult:
        """Run code (a string) on the engines, as a notebook cell; returns the AsyncResult.

        With ``block``, waits first (raising the engines' errors). ``get()`` gives
        ExecuteReply objects (execution count, result, outputs).
        """
        chosen = self.targets if targets is None else targets
        ids = self._target_ids(chosen)
        content = {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        futures = [
            self.client._send(
                protocol.route_frame("shell", t),
                "execute_request",
                content,
                engine_id=t,
                kind="execute",
                md_extra={"execute_input": code},
            )
            for t in ids
        ]
        ar = AsyncResult(self.client, futures, "execute", ids, single=self._is_single(chosen))
        self.history.extend(ar.msg_ids)
        if self.block if block is None else block:
            self._block_on(ar)
        return ar

    def run(self, filename: str, targets: Any = None, block: bool | None = None) -> AsyncResult:
        """Execute the code of a local file on the engines."""
        with open(filename) as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block)

    def push(
        self,
        ns: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        """Assign the names of ``ns`` on the engines (arrays are sent without copies)."""
        if not isinstance(ns, dict):
            raise TypeError(f"push takes a dict of names to values, not {type(ns).__name__}")
        return self._really_apply(ops.push, (ns,), {}, targets, block, track)

    update = push

    def pull(
        self, names: str | Sequence[str], targets: Any = None, block: bool | None = None
    ) -> Any:
        """Values of names on the engines (one name: a value per engine; a list: lists)."""
        if not isinstance(names, str):
            names = list(names)
        return self._really_apply(ops.pull, (names,), {}, targets, block)

    def get(self, names: str | Sequence[str]) -> Any:
        """``pull`` that always waits."""
        return self.pull(names, block=True)

    def __getitem__(self, name: str) -> Any:
        return self.pull(name, block=True)

    def __setitem__(self, name: str, value: Any) -> None:
        self.push({name: value}, block=True)

    def scatter(
        self,
        key: str,
        seq: Any,
        dist: str = "b",
        flatten: bool = False,
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        """Partition ``seq`` over the engines and assign each part to ``key`` there.

        ``flatten=True`` assigns a part of one element as that element.
        """
        ids = self._target_ids(targets)
        seq = _sliceable(seq)
        track = bool(self.track if track is None else track)
        futures = []
        for i, t in enumerate(ids):
            part = partition(seq, len(ids), i, dist)
            if flatten and len(part) == 1:
                part = part[0]
            futures += self._send_apply([t], pack_apply(ops.push, ({key: part},), {}), track)
        ar = AsyncResult(self.client, futures, "scatter", ids)
        return self._finish(ar, block)

    def gather(
        self, key: str, dist: str = "b", targets: Any = None, block: bool | None = None
    ) -> Any:
        """Pull ``key`` from each engine and join the parts (the inverse of scatter)."""
        ids = self._target_ids(targets)
        futures = [
            f for t in ids for f in self._send_apply([t], pack_apply(ops.pull, (key,), {}), False)
        ]
        ar = _GatherResult(self.client, futures, "gather", ids, dist=dist)
        return self._finish(ar, block)

    def clear(self, targets: Any = None, block: bool | None = None) -> Any:
        """Remove every name from the engines' namespaces."""
        return self._really_apply(ops.clear, (), {}, targets, block)

    def sync_imports(self, local: bool = True, quiet: bool = False) -> SyncImports:
        """A ``with`` block whose imports happen on the engines too (``as`` names kept)."""
        return SyncImports(self, local=local, quiet=quiet)


class _GatherResult(AsyncResult):
    """Joins the parts a gather pulled: arrays concatenated, sequences chained."""

    def __init__(self, *args: Any, dist: str = "b", **kwargs: Any):
        self._dist = dist
        super().__init__(*args, **kwargs)

    def _reconstruct(self, results: list[Any]) -> Any:
        parts = [
            r if isinstance(r, (list, tuple, range)) or hasattr(r, "shape") else [r]
            for r in results
        ]
        if parts and all(hasattr(p, "shape") and hasattr(p, "dtype") for p in parts):
            import numpy

            if self._dist == "b":
                return numpy.concatenate(parts)
        if self._dist == "r":
            out: list[Any] = []
            longest = max((len(p) for p in parts), default=0)
            for i in range(longest):
                out.extend(p[i] for p in parts if i < len(p))
            return out
        joined: list[Any] = []
        for p in parts:
            joined.extend(p)
        return joined


def _remote_bind(bindings: list[tuple[str, str, str | None]]) -> None:
    """On an engine: ``name = import_module(module)`` or ``name = module.attr``."""
    import importlib

    ns = ops._namespace()
    for name, module, attr in bindings:
        mod = importlib.import_module(module)
        ns[name] = getattr(mod, attr) if attr else mod


class SyncImports:
    """Context manager of :meth:`DirectView.sync_imports`.

    Imports run locally as usual (unless ``local=False``, which skips nothing but keeps
    IPython Parallel's signature); on leaving the block, every name the block bound to
    an imported module or to a name imported from one is bound on the engines too.
    """

    def __init__(self, view: DirectView, local: bool = True, quiet: bool = False):
        self.view = view
        self.local = local
        self.quiet = quiet
        self.frame: FrameType | None = None
        self.before: dict[str, Any] = {}
        self.imports: list[tuple[str, tuple[str, ...]]] = []
        self._saved_import: Any = None

    def _namespace(self) -> dict[str, Any]:
        assert self.frame is not None
        return (
            self.frame.f_locals if self.frame.f_code.co_name != "<module>" else self.frame.f_globals
        )

    def __enter__(self) -> SyncImports:
        self.frame = sys._getframe(1)
        self.before = dict(self._namespace())
        self._saved_import = builtins.__import__
        saved = self._saved_import

        def hooked(
            name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
        ) -> ModuleType:
            module: ModuleType = saved(name, globals, locals, fromlist, level)
            if level == 0 and sys._getframe(1) is self.frame:
                self.imports.append((name, tuple(fromlist or ())))
            return module

        builtins.__import__ = hooked
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.__import__ = self._saved_import
        if exc[0] is not None:
            return
        bindings = self._bindings()
        if not bindings:
            return
        if not self.quiet:
            names = ", ".join(f"{n} ({m}{'.' + a if a else ''})" for n, m, a in bindings)
            print(f"importing on engine(s): {names}")
        self.view._really_apply(_remote_bind, (bindings,), {}, block=True)

    def _bindings(self) -> list[tuple[str, str, str | None]]:
        after = self._namespace()
        bindings: list[tuple[str, str, str | None]] = []
        for name, value in after.items():
            if self.before.get(name, object()) is value:
                continue
            if isinstance(value, ModuleType):
                bindings.append((name, value.__name__, None))
                continue
            for module_name, fromlist in self.imports:
                module = sys.modules.get(module_name)
                for attr in fromlist:
                    if module is not None and getattr(module, attr, None) is value:
                        bindings.append((name, module_name, attr))
                        break
        return bindings


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
        from ._dependency import as_dependency

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
            from kernel_engine.errors import NoEnginesRegistered

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
        futures, sizes = [], []
        for start in range(0, length, chunksize):
            parts = [s[start : start + chunksize] for s in seqs]
            futures.append(self._submit(pack_apply(mapper, (once, *parts), {}), track, md))
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
                future = self._submit(pack_apply(ops.map_chunk, (once, *parts), {}), False, md)
                ar = AsyncResult(self.client, [future], _fname(f), single=True)
                self.history.extend(ar.msg_ids)
                pending.append((ar, len(chunk)))
            if not pending:
                return
            if ordered:
                ar, _ = pending.pop(0)
            else:
                import concurrent.futures

                concurrent.futures.wait(
                    [a for a, _ in pending], None, concurrent.futures.FIRST_COMPLETED
                )
                index = next(i for i, (a, _) in enumerate(pending) if a.done())
                ar, _ = pending.pop(index)
            yield from ar.get()


def call_on_parts(
    view: View,
    f: Callable[..., Any],
    sequences: Sequence[Any],
    chunksize: int | None,
    ordered: bool,
) -> Any:
    """A ParallelFunction's call: ``f`` on parts of the sequences, results joined."""
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
    ar = _GatherResult(view.client, futures, _fname(f))
    return view._finish(ar, None)
