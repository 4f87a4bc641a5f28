"""IPython Parallel's serialization helpers, on jupyter-px's serialization.

IPython Parallel "cans" objects before pickling them (functions by value, References,
arrays out of band) through a per-type registry. jupyter-px does all of that with
cloudpickle and pickle protocol 5 (:mod:`kernel_engine.serialize`), so canning is the
identity here; the names exist so that code written for IPython Parallel runs unchanged,
and they do what that code expects of them.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import Any

from kernel_engine import serialize

can_map: dict[Any, Any] = {}
"""IPython Parallel's registry of canners; jupyter-px needs none (kept for code that
adds to it)."""

uncan_map: dict[Any, Any] = {}


def can(obj: Any) -> Any:
    """``obj`` ready for sending: jupyter-px's pickling needs nothing done first."""
    return obj


def uncan(obj: Any, g: dict[str, Any] | None = None) -> Any:
    """``obj`` as received: with a namespace ``g``, References in it are looked up there
    and interactive functions take ``g`` as their globals (as on an engine)."""
    return obj if g is None else serialize._resolve(obj, g)


def serialize_object(obj: Any, buffer_threshold: int = 1024, item_threshold: int = 64) -> list[Any]:
    """``obj`` as frames: a pickle and its out-of-band buffers (the thresholds of
    IPython Parallel are accepted; buffers go out of band by jupyter-px's own rule)."""
    return serialize.dumps(obj)


def deserialize_object(
    buffers: Sequence[Any], g: dict[str, Any] | None = None
) -> tuple[Any, list[Any]]:
    """``(obj, remaining buffers)`` from :func:`serialize_object` frames: the frames an
    object took are those its pickle asks for, so objects serialized one after the other
    into one list come back one per call."""
    frames = list(buffers)
    if not frames:
        raise ValueError("deserialize_object needs the frames of serialize_object")
    taken = 0

    def out_of_band() -> Iterator[memoryview]:
        nonlocal taken
        for frame in frames[1:]:
            taken += 1
            yield memoryview(frame).toreadonly()

    obj = pickle.loads(frames[0], buffers=out_of_band())
    return uncan(obj, g), frames[1 + taken :]


def pack_apply_message(f: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The frames of an ``apply_request`` calling ``f(*args, **kwargs)``."""
    return serialize.pack_apply(f, args, kwargs)


def unpack_apply_message(
    buffers: Sequence[Any], g: dict[str, Any] | None = None, copy: bool = False
) -> tuple[Any, list[Any], dict[str, Any]]:
    """``(f, args, kwargs)`` of :func:`pack_apply_message` frames, resolved in ``g``."""
    return serialize.unpack_apply(buffers, {} if g is None else g)


def use_cloudpickle() -> None:
    """Pickle functions with cloudpickle in this process (the default); a view's
    ``use_cloudpickle()`` switches its engines too."""
    serialize.use("cloudpickle")


def use_pickle() -> None:
    """Pickle functions by reference only, in this process."""
    serialize.use("pickle")


def use_dill() -> None:
    """Pickle with dill in this process (ImportError without dill)."""
    serialize.use("dill")


class PrePickled:
    """An object pickled once, to be sent many times (with every task of a map, say)."""

    def __init__(self, obj: Any):
        self.obj = obj
        self.buffers = [bytes(memoryview(b)) for b in serialize.dumps(obj)]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle, (self.buffers,))


def _unpickle(buffers: list[Any]) -> Any:
    return serialize.loads(buffers)
