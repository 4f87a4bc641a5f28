"""Views: how work is sent to engines (DirectView: to named engines)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kernel_engine import protocol, serialize, shm, wire
from kernel_engine.engine import ops
from kernel_engine.serialize import PickledFunction, dumps_function, pack_apply

from ._asyncresult import AsyncMapResult, AsyncResult
from ._bounded import History
from ._request import Parts, Request
from ._transport import engine_id_of

if TYPE_CHECKING:
    from ._client import Client
    from ._syncimports import SyncImports


def chunk_packer(
    f: Callable[..., Any], return_exceptions: bool
) -> Callable[[list[Any]], list[Any]]:
    """The frames of each chunk's ``apply_request`` of a map of ``f`` (given the chunk's
    slice of each sequence): the mapper (per element with ``return_exceptions``) and ``f``
    pickled once for all the map's chunks."""
    mapper = ops.map_chunk_safe if return_exceptions else ops.map_chunk
    once = PickledFunction(f)
    head = dumps_function(mapper)
    return lambda parts: pack_apply(mapper, (once, *parts), {}, head)


def _fname(f: Any) -> str:
    return str(getattr(f, "__name__", None) or type(f).__name__)


def partition(seq: Any, n: int, i: int, dist: str = "b") -> Any:
    """Part ``i`` of ``n`` of a sequence: contiguous blocks (``'b'``) or round robin (``'r'``)."""
    if dist == "r":
        return seq[i::n]
    _check_dist(dist)
    base, extra = divmod(len(seq), n)
    start = i * base + min(i, extra)
    return seq[start : start + base + (1 if i < extra else 0)]


def _check_dist(dist: Any) -> None:
    if not (isinstance(dist, str) and dist in ("b", "r")):
        raise ValueError(f"dist must be 'b' (blocks) or 'r' (round robin), not {dist!r}")


def _all(targets: Any) -> bool:
    return isinstance(targets, str) and targets == "all"


def _check_flags(**flags: Any) -> None:
    """A call's ``block``/``track``/``silent`` given (not None) must be a bool, as
    set_flags requires: TypeError naming it (rather than "no" taken as True)."""
    for name, value in flags.items():
        if value is not None:
            protocol.check_bool(name, value)


def _check_key(call: str, key: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(f"{call} takes a name (a string) as key, not {key!r}")


_MAPS_RESULTS = wire.dumps_json({shm.REPLY_KEY: True})


def _mapping_results(metadata: dict[str, Any] | None) -> dict[str, Any] | bytes:
    """A request's metadata saying that its engine may send a very large result in
    shared memory (see :data:`kernel_engine.shm.REPLY_KEY`)."""
    return _MAPS_RESULTS if metadata is None else {**metadata, shm.REPLY_KEY: True}


def _sliceable(seq: Any, call: str = "map") -> Any:
    """``seq`` if it takes slices (a list, an array, a range...), else its elements as a
    list (a generator, a set, a dict's keys, as IPython Parallel takes them); TypeError
    naming ``call`` for what is not iterable."""
    if hasattr(seq, "__getitem__") and hasattr(seq, "__len__"):
        try:
            seq[0:0]
        except (TypeError, KeyError):  # (a mapping: its keys, as iterating it gives)
            pass
        else:
            return seq
    if not isinstance(seq, Iterable):
        raise TypeError(f"{call} takes a sequence, not {type(seq).__name__} ({seq!r:.80})")
    return list(seq)


def _function_of(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``apply``'s function: its first argument, else its keyword ``f``."""
    if args:
        return args[0], args[1:]
    if "f" in kwargs:
        return kwargs.pop("f"), ()
    raise TypeError("apply() needs the function to call: apply(f, *args, **kwargs)")


class View:
    """What every view shares: flags, apply, map, waiting.

    Flags: ``block`` (wait and return results instead of AsyncResults), ``track`` (let
    ``AsyncResult.sent`` say when zmq is done with sent buffers), ``targets``, ``label``.
    """

    _flag_names: tuple[str, ...] = ("block", "track", "targets", "label")

    def __init__(self, client: Client, targets: Any = None):
        self.client = client
        self.transport = client.transport
        self.targets = targets
        self.block = False
        self.track = False
        self.label: str | None = None
        self.history: History[str] = History(client.transport.history.maxlen or 100_000)

    def set_flags(self, **flags: Any) -> None:
        """Set view flags (``block``, ``track``, ``targets``, ...).

        Every flag is checked before any is set: an unknown one raises KeyError, a value
        of the wrong type or range TypeError/ValueError naming the flag.
        """
        self._check_flags(flags)
        for name, value in flags.items():
            setattr(self, name, value)

    def _check_flags(self, flags: dict[str, Any]) -> None:
        """What :meth:`set_flags` checks (also ``remote(...)``/``parallel(...)``'s flags)."""
        for name, value in flags.items():
            if name not in self._flag_names:
                raise KeyError(f"invalid flag {name!r}; flags are {self._flag_names}")
            if name in ("block", "track"):
                protocol.check_bool(name, value)
            elif name == "label":
                protocol.check_label(name, value)
            elif name == "targets" and value is not None and not _all(value):
                self.transport.targets(value)  # ('all': whichever engines there are at use)

    @contextlib.contextmanager
    def temp_flags(self, **flags: Any) -> Iterator[None]:
        """Set flags for the duration of a ``with`` block."""
        saved = {name: getattr(self, name) for name in flags}
        self.set_flags(**flags)
        try:
            yield
        finally:
            self.set_flags(**saved)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely; result or AsyncResult per ``block``.

        ``f`` is the first argument, or the keyword ``f=`` when no argument is given
        (so a function of a parameter named ``f`` still gets it: ``apply(g, f=1)``)."""
        f, args = _function_of(args, kwargs)
        return self._really_apply(f, args, kwargs)

    def apply_async(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Call ``f(*args, **kwargs)`` remotely; returns an AsyncResult at once."""
        f, args = _function_of(args, kwargs)
        result: AsyncResult = self._really_apply(f, args, kwargs, block=False)
        return result

    def apply_sync(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` remotely and wait for the result."""
        f, args = _function_of(args, kwargs)
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

    def _map_result(
        self,
        futures: list[Any],
        sizes: list[int],
        f: Callable[..., Any],
        ordered: bool,
        return_exceptions: bool,
        block: bool | None,
    ) -> Any:
        """The AsyncMapResult of a map's chunks (``sizes``: their elements), as
        :meth:`_finish` gives it."""
        ar = AsyncMapResult(
            self.client,
            futures,
            sizes,
            _fname(f),
            ordered=ordered,
            return_exceptions=return_exceptions,
        )
        return self._finish(ar, block)

    def _block_on(self, ar: AsyncResult) -> Any:
        """Wait for ``ar``; Ctrl-C interrupts the engines running it, then re-raises."""
        return ar.get()

    def wait(self, jobs: Any = None, timeout: float | None = None) -> bool:
        """Wait for jobs (default: everything sent through this view); returns whether done."""
        return self.client.wait(self.history if jobs is None else jobs, timeout)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        """Do not run these jobs (default: all this view's outstanding ones)."""
        if jobs is None:
            outstanding = self.client.outstanding
            jobs = [m for m in self.history if m in outstanding]
        self.client.abort(jobs, targets=targets, block=False if block is None else block)

    @property
    def outstanding(self) -> set[str]:
        """msg_ids this view submitted that have not finished."""
        return self.client.outstanding.intersection(self.history)

    @property
    def results(self) -> dict[str, Any]:
        """The results the client keeps of this view's tasks."""
        kept = self.client.results
        return {m: kept[m] for m in self.history if m in kept}

    def spin(self) -> None:
        """Kept for IPython Parallel compatibility: results arrive on their own."""

    def shutdown(self, targets: Any = None, restart: bool = False, hub: bool = False) -> None:
        """Stop this view's engines (``targets``: some of them)."""
        chosen = self._target_ids(targets)
        self.client.shutdown(chosen, restart=restart, hub=hub)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict[Any, Any]:
        return self.client.queue_status(
            targets if targets is not None else self.targets, verbose=verbose
        )

    def purge_results(self, jobs: Any = None, targets: Any = None) -> None:
        """Forget finished results here and on the controller: ``jobs`` and those of the
        engines ``targets``, as the client's (``targets="all"``: this view's engines);
        neither given: this view's own finished results, not those of other views or
        clients (``jobs="all"``: every one)."""
        if jobs is None and targets is None:
            outstanding = self.client.outstanding
            jobs = [m for m in self.history if m not in outstanding]
        elif _all(targets) and self.targets is not None:
            targets = self.targets  # (as IPython Parallel's: this view's engines, not all)
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
        _check_flags(block=block)
        ar = self.client.get_result(msg_ids)
        return ar.get() if (self.block if block is None else block) else ar

    def register_joblib_backend(
        self, name: str = "ipyparallel", make_default: bool = False
    ) -> None:
        """Make this view a joblib backend: ``Parallel(backend=name)`` runs on it."""
        from .integrations.joblib import register_joblib_backend

        register_joblib_backend(name, make_default, view=self)

    @property
    def executor(self) -> Any:
        """A ``concurrent.futures.Executor`` submitting through this view."""
        from ._executor import ViewExecutor

        return ViewExecutor(self)

    def __len__(self) -> int:
        return len(self._target_ids())

    def _repr_html_(self) -> str:
        from ._reprs import view_html

        return view_html(self)

    def _target_ids(self, targets: Any = None) -> list[int]:
        return self.transport.targets(self.targets if targets is None else targets)


SEGMENT_FAN_OUT = 8
"""From this many targets, work whose buffers are in a shared-memory segment leaves a
DirectView as one broadcast even when the client reaches the engines' lanes: the client's
CPU then stays about flat in N (4.0 against 12.6 ms for a 1 MiB push to 32 engines), the
wall time about the same. Below it, N small lane messages are quicker (5.5 against 6.9 ms
to 2 engines) and cost the controller nothing."""


class DirectView(View):
    """Work sent to named engines: every target runs every call.

    ``rc[0]`` (one engine: results are single values), ``rc[:]``, ``rc[::2]``,
    ``rc[0, 1]`` (several: results are lists in target order).
    """

    def __repr__(self) -> str:
        return f"<DirectView {self.targets}>"

    fan_out_from: int | None = 2
    """Work for this many targets or more leaves the client as one broadcast message,
    which the controller sends on to each engine (None: one message per engine).

    A DirectView does so for ``execute`` (which goes to the engines' shells through the
    controller anyway), for work whose large buffers every target maps from one
    shared-memory segment when there are :data:`SEGMENT_FAN_OUT` targets or more (a
    ``push`` of an array: one small message, whatever N), and
    for the rest only when this client does not reach the engines' task lanes itself
    (it runs on another host than the controller, or ``JUPYTER_PX_DIRECT=0``). Beside
    the engines, N sends to the lanes cost the client more CPU than one broadcast, but
    the round trip less, since the replies come back without the controller's hop (see
    ``benchmarks/broadcast.py``). A BroadcastView always fans out."""

    _always_fan_out = False

    def _is_single(self, targets: Any) -> bool:
        return engine_id_of(targets) is not None  # (an int, or numpy's)

    def _fans_out(self, targets: list[int], routed: bool = False) -> bool:
        """Whether to send to ``targets`` as one broadcast (``routed``: one message per
        engine would go through the controller too)."""
        if self.fan_out_from is None or len(targets) < max(2, self.fan_out_from):
            return False
        return routed or self._always_fan_out or not self.transport.direct

    def _send_apply(
        self,
        targets: list[int],
        buffers: list[Any],
        track: bool,
        wait: bool = False,
        on_sent: Callable[[str], None] | None = None,
    ) -> list[Request]:
        """Send an ``apply_request`` to each target: one broadcast message for many
        targets (:attr:`fan_out_from`), else one message per target. Engines of this host
        share its large buffers through one shared-memory segment when there are two or
        more of them (one, for buffers of 32 MiB or more). ``wait``: the caller blocks
        for the result (to one target, it may then read the reply itself: see
        :meth:`.Transport.submit`); ``on_sent(msg_id)`` for each request sent to one
        target, as it leaves."""
        label = protocol.check_label("label", self.label)  # (set behind set_flags' back?)
        metadata = {"label": label} if label else None
        segment, local = None, set()
        requests: list[Request] = []
        shared: list[Request] = []
        # (a call that waits for several engines sends to each first, then waits for
        # those sent on the thread's own sockets together)
        here_later: list[Any] | None = [] if wait and len(targets) > 1 else None
        try:
            # (in the try: a Ctrl-C just after the segment is made still releases it)
            # (to one engine, only for very large buffers: see shm.ONE_ENGINE_THRESHOLD)
            if shm.worth_sharing(buffers, len(targets)) and shm.enabled():
                engines = self.transport.engines
                local = {t for t in targets if shm.is_local(engines.get(t))}
                one = len(targets) == 1
                segment = shm.share(buffers) if len(local) > 1 or (one and local) else None
            # (a segment goes in a broadcast only when every target maps it; then the
            # broadcast's one small message beats N sends, lanes or not)
            by_segment = segment is not None and len(targets) >= SEGMENT_FAN_OUT
            if self._fans_out(targets, routed=by_segment) and (
                segment is None or local.issuperset(targets)
            ):
                content, frames = {}, buffers
                if segment is not None:
                    content = {shm.CONTENT_KEY: segment.reference}
                    frames = segment.placeholders(buffers)
                sent = self.transport.submit_broadcast(
                    targets,
                    protocol.APPLY_REQUEST,
                    content,
                    frames,
                    metadata,
                    track,
                    md_extra={"label": label},
                )
                if sent is not None:
                    if segment is not None:
                        shared = sent
                    return sent
            maps = self.transport.maps_results
            for t in targets:
                content, frames = {}, buffers
                if segment is not None and t in local:
                    content = {shm.CONTENT_KEY: segment.reference}
                    frames = segment.placeholders(buffers)
                request = self.transport.submit(
                    protocol.route_frame("lane", t),
                    protocol.APPLY_REQUEST,
                    content,
                    frames,
                    metadata=_mapping_results(metadata) if maps(t) else metadata,
                    engine_id=t,
                    track=track,
                    md_extra={"label": label},
                    wait=wait,
                    on_sent=on_sent,
                    here_later=here_later,
                )
                requests.append(request)
                if content:
                    shared.append(request)
            if here_later:
                self.transport.wait_here_all(here_later, _not_here(requests, here_later))
        except BaseException as exc:
            if here_later:  # (sent, not waited for yet; the others interrupted too)
                also = _not_here(requests, here_later)
                self.transport.leave_here_all(here_later, exc, also=also)
            raise
        finally:
            if segment is not None:  # (its name goes once every engine has answered)
                parts = Parts.of(shared)
                segment.release_after([parts.future()] if parts is not None else shared)
        return requests

    def _really_apply(
        self,
        f: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        _check_flags(block=block, track=track)
        chosen = self.targets if targets is None else targets
        ids = self._target_ids(chosen)
        buffers = pack_apply(f, args, kwargs)
        wait = self.block if block is None else bool(block)
        sent: list[str] = []
        try:
            futures = self._send_apply(
                ids, buffers, self.track if track is None else track, wait, sent.append
            )
        except BaseException:  # (Ctrl-C in a call that waited: what left is this view's)
            self.history.extend(sent)
            raise
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
        """Static map: each engine gets one contiguous chunk of the sequences.

        With ``return_exceptions``, an element that raised gives its error as its result
        (the other elements of its engine's chunk their results) instead of failing the map.
        """
        return self._static_map(f, sequences, block, track, return_exceptions)

    def _static_map(
        self,
        f: Callable[..., Any],
        sequences: Sequence[Any],
        block: bool | None,
        track: bool | None,
        return_exceptions: bool,
        ordered: bool = True,
    ) -> Any:
        """:meth:`map`; ``ordered=False`` (a ParallelFunction's): its AsyncMapResult
        iterates in the order the engines' chunks complete."""
        _check_flags(block=block, track=track)
        if not sequences:
            raise TypeError("map needs at least one sequence")
        protocol.check_bool("return_exceptions", return_exceptions)
        seqs = [_sliceable(s) for s in sequences]
        length = min(len(s) for s in seqs)
        seqs = [s[:length] if len(s) != length else s for s in seqs]
        ids = self._target_ids()
        n = min(len(ids), length) or 1
        futures, sizes = [], []
        pack = chunk_packer(f, return_exceptions)
        for i, t in enumerate(ids[:n]):
            parts = [partition(s, n, i) for s in seqs]
            futures += self._send_apply(
                [t], pack(parts), bool(self.track if track is None else track)
            )
            sizes.append(len(parts[0]))
        return self._map_result(futures, sizes, f, ordered, return_exceptions, block)

    def execute(
        self,
        code: str,
        silent: bool = True,
        targets: Any = None,
        block: bool | None = None,
        label: str | None = None,
    ) -> AsyncResult:
        """Run code (a string) on the engines; returns the AsyncResult.

        ``silent`` (the default, as in IPython Parallel) runs it quietly: no execution
        count, no history, no ``Out``; what it prints still comes back. ``silent=False``
        runs it as a notebook cell (``%px`` does that). With ``block``, waits first
        (raising the engines' errors). ``get()`` gives ExecuteReply objects (execution
        count, result, outputs).
        """
        _check_flags(silent=silent, block=block)
        if not isinstance(code, str):
            raise TypeError(f"execute takes code as a string, not {type(code).__name__}")
        protocol.check_label("label", label)
        protocol.check_label("label", self.label)
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
        md_extra = {"execute_input": code, "label": label or self.label}
        futures: list[Request] | None = None
        if self._fans_out(ids, routed=True):
            futures = self.transport.submit_broadcast(
                ids, "execute_request", content, kind="execute", md_extra=md_extra
            )
        futures = futures or [
            self.transport.submit(
                protocol.route_frame("shell", t),
                "execute_request",
                content,
                engine_id=t,
                kind="execute",
                md_extra=md_extra,
            )
            for t in ids
        ]
        ar = AsyncResult(self.client, futures, "execute", ids, single=self._is_single(chosen))
        self.history.extend(ar.msg_ids)
        if self.block if block is None else block:
            self._block_on(ar)
        return ar

    def run(
        self,
        filename: str,
        targets: Any = None,
        block: bool | None = None,
        label: str | None = None,
    ) -> AsyncResult:
        """Execute the code of a local file on the engines (quietly, as :meth:`execute`)."""
        with open(filename) as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block, label=label)

    @property
    def importer(self) -> SyncImports:
        """``with view.importer:`` imports on the engines too (:meth:`sync_imports`)."""
        return self.sync_imports()

    def push(
        self,
        ns: dict[str, Any],
        targets: Any = None,
        block: bool | None = None,
        track: bool | None = None,
    ) -> Any:
        """Assign the names of ``ns`` on the engines (arrays are sent without copies).

        Engines receive arrays read-only. When two or more target engines run on this
        host, buffers of 1 MiB or more (numpy arrays, large bytes) are written once into a
        shared-memory segment that those engines map read-only, so pushing an array to N
        engines costs one copy of it in all, not N; to one engine of this host, buffers of
        32 MiB or more go that way too, one copy instead of two through a socket (see
        :mod:`kernel_engine.shm`; set ``JUPYTER_PX_SHM=0`` to turn it off).
        """
        if not isinstance(ns, dict):
            raise TypeError(f"push takes a dict of names to values, not {type(ns).__name__}")
        bad = [k for k in ns if not isinstance(k, str)]
        if bad:
            raise TypeError(f"push takes names (strings) as keys, not {bad[0]!r}")
        return self._really_apply(ops.push, (ns,), {}, targets, block, track)

    update = push

    def pull(
        self, names: str | Sequence[str], targets: Any = None, block: bool | None = None
    ) -> Any:
        """Values of names on the engines (one name: a value per engine; a list: lists)."""
        if not isinstance(names, str):
            if not isinstance(names, Iterable):
                raise TypeError(f"pull takes a name or a list of names, not {names!r}")
            names = list(names)
            if not all(isinstance(n, str) for n in names):
                raise TypeError(f"pull takes a name or a list of names, not {names!r}")
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
        _check_flags(block=block, track=track)
        _check_key("scatter", key)
        _check_dist(dist)
        protocol.check_bool("flatten", flatten)
        ids = self._target_ids(targets)
        seq = _sliceable(seq, "scatter")
        track = bool(self.track if track is None else track)
        futures = []
        for i, t in enumerate(ids):
            part = partition(seq, len(ids), i, dist)
            if flatten and len(part) == 1:
                part = part[0]
            futures += self._send_apply([t], pack_apply(ops.push, ({key: part},), {}), track)
        ar = AsyncResult(self.client, futures, "scatter", ids)
        return self._finish(ar, block)  # (blocking: a None per engine, as the seeds show)

    def gather(
        self, key: str, dist: str = "b", targets: Any = None, block: bool | None = None
    ) -> Any:
        """Pull ``key`` from each engine and join the parts (the inverse of scatter)."""
        _check_flags(block=block)
        _check_key("gather", key)
        _check_dist(dist)
        ids = self._target_ids(targets)
        futures = [
            f for t in ids for f in self._send_apply([t], pack_apply(ops.pull, (key,), {}), False)
        ]
        ar = _GatherResult(self.client, futures, "gather", ids, dist=dist)
        return self._finish(ar, block)

    def clear(self, targets: Any = None, block: bool | None = None) -> Any:
        """Remove every name from the engines' namespaces (blocking: returns nothing)."""
        done = self._really_apply(ops.clear, (), {}, targets, block)
        return done if isinstance(done, AsyncResult) else None

    def activate(self, suffix: str = "") -> None:
        """Register ``%px<suffix>``, ``%%px<suffix>``, ``%autopx<suffix>``... for this view."""
        from ._magics import activate

        activate(self, suffix)

    def use_cloudpickle(self) -> None:
        """Pickle functions with cloudpickle (the default), here and on the engines."""
        self._use("cloudpickle")

    def use_pickle(self) -> None:
        """Pickle functions by reference only, here and on the engines."""
        self._use("pickle")

    def use_dill(self) -> None:
        """Pickle with dill (if installed here and on the engines)."""
        self._use("dill")

    def _use(self, name: str) -> None:
        serialize.use(name)
        self._really_apply(serialize.use, (name,), {}, block=True)

    def sync_imports(self, local: bool = True, quiet: bool = False) -> SyncImports:
        """A ``with`` block whose imports happen on the engines too (``as`` names kept)."""
        from ._syncimports import SyncImports

        return SyncImports(self, local=local, quiet=quiet)


class BroadcastView(DirectView):
    """IPython Parallel's broadcast view: the same work on every target.

    Its calls are the DirectView's, but work for two or more targets leaves the client as
    one message, whatever the number of engines: the controller sends it on to each (see
    :mod:`kernel_engine.controller.broadcast`). Each engine's part keeps its own msg_id,
    metadata and error, and results come back in the order of the targets.
    ``is_coalescing`` is accepted for compatibility (replies come back one per engine).
    """

    _always_fan_out = True

    def __init__(self, client: Client, targets: Any = "all", is_coalescing: bool = False):
        super().__init__(client, targets)
        self.is_coalescing = protocol.check_bool("is_coalescing", is_coalescing)

    def __repr__(self) -> str:
        return f"<BroadcastView {self.targets}>"


class _GatherResult(AsyncResult):
    """Joins the parts a gather pulled: arrays concatenated, sequences chained.

    ``return_exceptions``: a part that failed is joined as its error (one element).
    """

    def __init__(self, *args: Any, dist: str = "b", return_exceptions: bool = False, **kwargs: Any):
        self._dist = dist
        self._return_exceptions = return_exceptions
        super().__init__(*args, **kwargs)

    def _finish(self) -> None:
        if not self._return_exceptions:
            super()._finish()
            return
        try:
            self._set_reconstructed(self._outcomes())
        except concurrent.futures.InvalidStateError:
            pass  # (cancelled meanwhile)

    def _reconstruct(self, results: list[Any]) -> Any:
        # (as IPython Parallel's: arrays are joined as arrays, lists, tuples and ranges as
        # their elements; anything else, a numpy scalar or a DataFrame say, is one element)
        if results and all(_is_array(r) for r in results):
            import numpy

            masked = any(isinstance(r, numpy.ma.MaskedArray) for r in results)
            joined = (numpy.ma.concatenate if masked else numpy.concatenate)(results)
            if self._dist == "r":  # (the parts' rows interleaved, as scatter dealt them)
                starts = numpy.cumsum([0, *(len(r) for r in results)])
                order = [
                    starts[p] + i
                    for i in range(max(len(r) for r in results))
                    for p, r in enumerate(results)
                    if i < len(r)
                ]
                joined = joined[numpy.asarray(order, dtype=numpy.intp)]
            return joined
        parts = [r if isinstance(r, (list, tuple, range)) or _is_array(r) else [r] for r in results]
        if self._dist == "r":
            out: list[Any] = []
            longest = max((len(p) for p in parts), default=0)
            for i in range(longest):
                out.extend(p[i] for p in parts if i < len(p))
            return out
        joined_list: list[Any] = []
        for p in parts:
            joined_list.extend(p)
        return joined_list


def _is_array(obj: Any) -> bool:
    """Whether ``obj`` is a numpy array of one dimension or more (a part of a gather to
    join as rows; a 0-d array or a numpy scalar is one element)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray) and obj.ndim > 0


def _not_here(requests: list[Request], pairs: list[Any]) -> list[Request]:
    """The requests of a call that did not go on the calling thread's own sockets
    (``pairs``: those that did, with their sockets)."""
    mine = {id(r) for r, _ in pairs}
    return [r for r in requests if id(r) not in mine]
