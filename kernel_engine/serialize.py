"""Serialization of functions, arguments and results.

cloudpickle with pickle protocol 5: the buffers pickle hands out of band (numpy arrays,
anything reducing through ``PickleBuffer``; ``bytes`` and ``bytearray`` of at least
:data:`OOB_THRESHOLD` bytes) travel as their own zmq frames, sent with ``copy=False`` and
never copied; on receipt they are read-only views on the received frames, so a received
array is always read-only, whatever its size (as IPython Parallel documents). Past
:data:`MAX_OOB_BUFFERS` buffers in one message the rest go in band, so a list of many
tiny arrays does not become thousands of frames.
"""

from __future__ import annotations

import io
import itertools
import keyword
import pickle
from collections.abc import Callable, Sequence
from types import CellType, FunctionType, ModuleType
from typing import Any
from weakref import ReferenceType, ref

import cloudpickle

from .errors import SerializationError
from .fnkey import KEPT, fingerprint, global_names, is_interactive

OOB_THRESHOLD = 64 * 1024
"""``bytes`` at least this large are sent as their own frames."""

MAX_OOB_BUFFERS = 256
"""At most this many out-of-band buffers per message."""


class Reference:
    """An argument that the engine replaces with a value from its own namespace.

    ``Reference("a")``, ``Reference("a.b")`` or any expression (``Reference("g[0]")``),
    passed to ``apply`` (at the top, or inside lists, tuples and dicts among the
    arguments), is evaluated in each engine's namespace when the task runs.
    """

    def __init__(self, name: str):
        if not isinstance(name, str):
            raise TypeError(f"Reference needs an expression (a string), not {name!r}")
        if name.isidentifier() and not keyword.iskeyword(name):
            self.name = name  # (a plain name, as every pull sends: no compile, 4 us)
            return
        try:
            compile(name, "<Reference>", "eval")
        except SyntaxError as exc:
            why = exc.msg
            raise ValueError(f"Reference needs a Python expression, not {name!r}: {why}") from None
        self.name = name

    def __repr__(self) -> str:
        return f"<Reference {self.name}>"

    def resolve(self, namespace: dict[str, Any]) -> Any:
        """The referenced value in ``namespace``: what code naming it there would get."""
        name = self.name
        if not name.isidentifier():
            return eval(compile(name, "<Reference>", "eval"), namespace)
        if not keyword.iskeyword(name):
            try:
                return namespace[name]  # (a plain name, as every pull sends: no compile)
            except KeyError:
                pass
        # a constant (True, None), a builtin (len), or a name Python reads normalized
        # (NFKC: code's 'ﬁ = 1' binds 'fi'): looked up as code does
        try:
            return eval(compile(name, "<Reference>", "eval"), namespace)
        except NameError:
            raise NameError(f"name {name!r} is not defined on this engine") from None


class _BytesBuffer:
    """Makes ``bytes`` arguments travel out of band (pickle keeps them in band otherwise)."""

    def __init__(self, data: bytes | bytearray):
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_restore_bytes, (pickle.PickleBuffer(self.data), type(self.data) is bytearray))


def _restore_bytes(buf: Any, mutable: bool) -> bytes | bytearray:
    return bytearray(buf) if mutable else bytes(buf)


def _wrap_large_bytes(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)) and len(obj) >= OOB_THRESHOLD:
        return _BytesBuffer(obj)
    return obj


def _out_of_band(buffers: list[Any]) -> Any:
    """A pickle ``buffer_callback`` collecting up to MAX_OOB_BUFFERS buffers in ``buffers``."""

    def take(pb: pickle.PickleBuffer) -> bool:
        if len(buffers) >= MAX_OOB_BUFFERS:
            return True  # in band
        buffers.append(pb.raw())
        return False

    return take


_PICKLERS = ("cloudpickle", "pickle", "dill")
_pickler: Any = cloudpickle
"""The module that pickles functions and what plain pickle cannot take (see
:func:`use`); data that plain pickle takes always goes through the C pickler."""


def use(name: str) -> None:
    """Pickle functions (and results) with ``"cloudpickle"`` (the default: interactive
    functions, lambdas and closures travel by value), ``"pickle"`` (by reference only) or
    ``"dill"`` (if installed), in this process: IPython Parallel's ``use_*``."""
    global _pickler
    if name not in _PICKLERS:
        raise ValueError(f"no pickler {name!r}; there are {_PICKLERS}")
    if name == "dill":
        try:
            import dill
        except ImportError:
            raise ImportError("use_dill() needs dill: pip install dill") from None
        _pickler = dill
    else:
        _pickler = cloudpickle if name == "cloudpickle" else pickle


def pickler() -> str:
    """The pickler :func:`use` chose."""
    return str(_pickler.__name__).split(".")[0]


def dumps(obj: Any) -> list[Any]:
    """Serialize ``obj`` to frames: the pickle first, then out-of-band buffers.

    Raises
    ------
    SerializationError
        When ``obj`` (or something inside it) cannot be pickled.
    """
    buffers: list[Any] = []
    take = _out_of_band(buffers)

    try:
        data = _pickler.dumps(_wrap_large_bytes(obj), protocol=5, buffer_callback=take)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {type(obj).__name__} object: {type(exc).__name__}: {exc}"
        ) from exc
    return [data, *buffers]


def loads(frames: Sequence[Any]) -> Any:
    """Rebuild an object from :func:`dumps` frames; buffers become read-only views."""
    buffers = [memoryview(f).toreadonly() for f in frames[1:]]
    return pickle.loads(frames[0], buffers=buffers)


_FUNCTION_CACHE: dict[bytes, Any] = {}
_FUNCTION_CACHE_SIZE = 256


def _load_function(data: Any) -> Any:
    """A function pickled once by :class:`PickledFunction`, unpickled once per engine
    (``data``: its bytes, or a view of them when they came out of band)."""
    if type(data) is not bytes:
        data = bytes(data)
    f = _FUNCTION_CACHE.get(data)
    if f is None:
        if len(_FUNCTION_CACHE) >= _FUNCTION_CACHE_SIZE:
            _FUNCTION_CACHE.clear()
        f = _FUNCTION_CACHE[data] = cloudpickle.loads(data)
    return f


class PickledFunction:
    """A function serialized once and sent with many tasks (a map's chunks).

    Pickling it costs a bytes copy, not a cloudpickle run; engines unpickle it once and
    reuse it while the same bytes keep coming. Its bytes travel out of band, as a frame of
    their own (with pickle's protocol 5 and a ``buffer_callback``, as :func:`pack_apply`
    pickles): the task database then keeps them once for the whole map, where inside the
    arguments' pickle they would be stored with every task.
    """

    def __init__(self, f: Any):
        self.__name__ = getattr(f, "__name__", type(f).__name__)
        try:
            self.data = _pickler.dumps(_for_engines(f), protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize function {self.__name__!r}: {type(exc).__name__}: {exc}"
            ) from exc

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if protocol >= 5 and len(self.data) >= 256:  # (a smaller one costs more as a frame)
            return (_load_function, (pickle.PickleBuffer(self.data),))
        return (_load_function, (self.data,))


_DUMPED: dict[int, tuple[ReferenceType[Any], tuple[Any, ...], bytes]] = {}
"""Functions pickled lately, by id: (a weak reference to the function, its
:func:`~kernel_engine.fnkey.fingerprint`, its bytes); an entry goes with its function."""
_DUMPED_SIZE = 1024
_DUMPED_MAX_ONE = 256 * 1024
"""Pickles larger than this are not kept (a function holding that much data costs the
pickling less, in proportion, than sending it)."""
_DUMPED_MAX_BYTES = 32 << 20
_dumped_bytes = [0]  # (a list: the weak references' callbacks change it, at exit too)


def dumps_function(f: Any) -> bytes:
    """The first frame of an ``apply_request``: the callable alone, pickled by cloudpickle.

    A map computes it once and sends the same bytes with every task; engines unpickle
    each distinct function once (:func:`_load_function`). A function sent again is not
    pickled again while its :func:`~kernel_engine.fnkey.fingerprint` stays the same.
    """
    key = fingerprint(f) if _pickler is cloudpickle else None
    if key is not None:
        hit = _DUMPED.get(id(f))
        if hit is not None and hit[0]() is f and hit[1] == key:
            return hit[2]
    try:
        data = bytes(_pickler.dumps(_for_engines(f), protocol=5))
    except Exception as exc:
        name = getattr(f, "__name__", type(f).__name__)
        raise SerializationError(
            f"cannot serialize function {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    # (kept only if nothing changed it meanwhile: another thread may have, while it pickled)
    if key is not None and len(data) <= _DUMPED_MAX_ONE and fingerprint(f) == key:
        _keep(f, key, data)
    return data


def _keep(f: FunctionType, key: tuple[Any, ...], data: bytes) -> None:
    # (the callback uses what it needs from its closure: at exit, module globals are gone)
    dumped, total = _DUMPED, _dumped_bytes
    if len(dumped) >= _DUMPED_SIZE or total[0] + len(data) > _DUMPED_MAX_BYTES:
        dumped.clear()
        total[0] = 0
    fid = id(f)

    def gone(_: Any) -> None:  # (the function was collected: its entry, if still its own)
        entry = dumped.get(fid)
        if entry is not None and entry[0] is weak and dumped.pop(fid, None) is entry:
            total[0] -= len(entry[2])

    weak = ref(f, gone)
    old = dumped.get(fid)
    if old is not None:
        total[0] -= len(old[2])
    dumped[fid] = (weak, key, data)
    total[0] += len(data)


def _for_engines(f: Any) -> Any:
    """What is pickled of the callable ``f`` when cloudpickle pickles it: an interactive
    function (``__main__``) as :func:`_slim` makes it; an object whose class has a
    ``_px_for_engines(obj, for_engines)`` method (a function wrapped by
    ``@depend``/``@require``, which engines bind through ``_px_bind``) as that method
    makes it, with this function for the functions it wraps; anything else as it is."""
    if _pickler is not cloudpickle:
        return f
    if type(f) is FunctionType:
        return _slim(f, {}) if is_interactive(f) else f
    hook = getattr(type(f), "_px_for_engines", None)
    return f if hook is None else hook(f, _for_engines)


_MODULE_ATTRIBUTES = ("__package__", "__name__", "__path__", "__file__")


def _slim(f: FunctionType, memo: dict[int, FunctionType]) -> FunctionType:
    """A copy of the interactive function ``f`` whose globals hold only what
    :func:`bind_interactive` keeps of them on an engine: the functions (the interactive
    ones slimmed too), modules and classes its code names. Data it names is left out:
    an engine runs the function in its own namespace and would drop it (as IPython
    Parallel's engines, whose clients do not send it either). cloudpickle sent it along:
    a notebook's function naming a 100 MB array carried the array at every call.

    Its closure (values of its own, which do travel) keeps its values, but the
    interactive functions in it are slimmed too."""
    copy = memo.get(id(f))
    if copy is not None:
        return copy
    source = f.__globals__
    kept = {k: source[k] for k in _MODULE_ATTRIBUTES if k in source}
    cells = None if f.__closure__ is None else tuple(CellType() for _ in f.__closure__)
    copy = memo[id(f)] = FunctionType(f.__code__, kept, f.__name__, f.__defaults__, cells)
    copy.__kwdefaults__ = f.__kwdefaults__
    copy.__qualname__ = f.__qualname__
    copy.__doc__ = f.__doc__
    copy.__module__ = f.__module__
    copy.__annotations__ = f.__annotations__
    copy.__dict__.update(f.__dict__)
    for cell, original in zip(cells or (), f.__closure__ or ()):
        try:
            value = original.cell_contents
        except ValueError:  # (empty: stays empty)
            continue
        cell.cell_contents = _slim(value, memo) if is_interactive(value) else value
    for name in global_names(f.__code__):
        value = source.get(name)
        if is_interactive(value):
            kept[name] = _slim(value, memo)
        elif isinstance(value, KEPT):
            kept[name] = value
    return copy


class _NeedsCloudpickle(Exception):
    """Plain pickle met something only cloudpickle may serialize (interactive code)."""


class _PlainPickler(pickle.Pickler):
    """The standard (C) pickler, refusing what it would pickle wrongly by reference.

    Functions and classes defined interactively (``__main__``) or nested in functions must
    travel by value, which only cloudpickle does; for plain data this is much faster.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (FunctionType, type)) and (
            obj.__module__ == "__main__" or "<locals>" in obj.__qualname__
        ):
            raise _NeedsCloudpickle
        if isinstance(obj, (CellType, ModuleType)) or type(obj).__module__ == "__main__":
            raise _NeedsCloudpickle
        return NotImplemented


def _dumps_fast(obj: Any) -> list[Any]:
    """:func:`dumps` with the standard pickler when that is correct, else cloudpickle."""
    buffers: list[Any] = []
    take = _out_of_band(buffers)

    stream = io.BytesIO()
    try:
        _PlainPickler(stream, protocol=5, buffer_callback=take).dump(obj)
    except Exception:
        return dumps(obj)
    return [stream.getvalue(), *buffers]


_SCALARS = frozenset({type(None), bool, int, float, str})
"""Result types that ``pickle.dumps`` writes as :func:`_dumps_fast` would (the C pickler
asks no ``reducer_override`` about them, and they hand out no buffers)."""


def dumps_result(obj: Any) -> list[Any]:
    """:func:`dumps` of a task's result, through the standard (C) pickler when that is
    correct (cloudpickle's pickler costs more to set up than a tiny result to pickle)."""
    if type(obj) in _SCALARS:  # (most results: no pickler or stream to set up)
        return [pickle.dumps(obj, protocol=5)]
    return _dumps_fast(_wrap_large_bytes(obj))


def pack_apply(
    f: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    function_frame: bytes | None = None,
) -> list[Any]:
    """Frames for an ``apply_request``: the function, then the arguments and their buffers.

    ``function_frame`` is :func:`dumps_function` of ``f``, when the caller has it already.
    On failure the error names the culprit: the function, argument ``i`` or keyword ``k``.
    """
    head = function_frame if function_frame is not None else dumps_function(f)
    try:
        return [head, *_dumps_fast((tuple(_wrap_large_bytes(a) for a in args), kwargs))]
    except SerializationError as exc:
        culprit = _find_culprit(f, args, kwargs)
        if culprit is None:
            raise
        raise SerializationError(f"{culprit}: {exc.__cause__}") from exc.__cause__


def _find_culprit(f: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    candidates: list[tuple[str, Any]] = [(f"function {getattr(f, '__name__', f)!r}", f)]
    candidates += [(f"argument {i} ({type(a).__name__})", a) for i, a in enumerate(args)]
    candidates += [(f"keyword argument {k!r} ({type(v).__name__})", v) for k, v in kwargs.items()]
    for label, value in candidates:
        if not _pickles(value):
            return f"cannot serialize {label}{_where_inside(value)}"
    return None


def _pickles(value: Any) -> bool:
    try:
        cloudpickle.dumps(value, protocol=5, buffer_callback=lambda pb: False)
    except Exception:
        return False
    return True


def _where_inside(value: Any, depth: int = 0) -> str:
    """Where in a dict, list or tuple that does not pickle the item that does not is
    (`` at ['l'] (lock)``: a push's name, say); empty when not found (searched down to
    three levels, among the first :data:`RESOLVE_ITEMS` ** 2 items of each)."""
    if depth >= 3 or type(value) not in (dict, list, tuple):
        return ""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in itertools.islice(items, RESOLVE_ITEMS**2):
        if not _pickles(item):
            inner = _where_inside(item, depth + 1)
            here = f"[{key!r}]"
            if inner.startswith(" at "):
                return f" at {here}{inner[4:]}"
            return f" at {here} ({type(item).__name__})"
    return ""


def bind_interactive(obj: Any, namespace: dict[str, Any]) -> Any:
    """Make a function defined interactively (``__main__``) use ``namespace`` as globals.

    This is what makes ``view.apply(lambda: a)`` read the engine's ``a``. Code that the
    function needs and that cloudpickle brought along (functions, classes, modules it
    references) is added to ``namespace``: interactively defined functions replace older
    copies, modules and classes are added only where missing. Data is not, so a variable
    that only the client defines raises ``NameError`` on the engine.

    An object whose class has a ``_px_bind(namespace)`` method (a function wrapped by
    ``@depend``/``@require``) binds what it wraps through it.
    """
    if not isinstance(obj, FunctionType):
        bind = getattr(type(obj), "_px_bind", None)
        return obj if bind is None else bind(obj, namespace)
    if not is_interactive(obj):
        return obj
    if obj.__globals__ is namespace:
        return obj
    for name, value in obj.__globals__.items():
        if name.startswith("__") or value is namespace.get(name):
            continue
        if is_interactive(value):
            # The caller's current version of a helper wins over an older copy.
            namespace[name] = value
            namespace[name] = bind_interactive(value, namespace)
        elif isinstance(value, KEPT) and name not in namespace:
            namespace[name] = value
    closure = obj.__closure__
    if closure:
        closure = tuple(_bind_cell(cell, namespace) for cell in closure)
    bound = FunctionType(obj.__code__, namespace, obj.__name__, obj.__defaults__, closure)
    bound.__kwdefaults__ = obj.__kwdefaults__
    bound.__qualname__ = obj.__qualname__
    bound.__doc__ = obj.__doc__
    bound.__dict__.update(obj.__dict__)
    bound.__module__ = "__main__"
    return bound


def _bind_cell(cell: CellType, namespace: dict[str, Any]) -> CellType:
    """A closure cell holding an interactive function gets the bound function."""
    try:
        contents = cell.cell_contents
    except ValueError:  # an empty cell
        return cell
    if is_interactive(contents):
        return CellType(bind_interactive(contents, namespace))
    return cell


def unpack_apply(
    frames: Sequence[Any], namespace: dict[str, Any]
) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """The call an ``apply_request`` carries, with References resolved in ``namespace``."""
    f = _load_function(bytes(frames[0]))
    args, kwargs = loads(frames[1:])
    f = bind_interactive(f, namespace)
    args = [_resolve(a, namespace) for a in args]
    kwargs = {k: _resolve(v, namespace) for k, v in kwargs.items()}
    return f, args, kwargs


RESOLVE_ITEMS = 64
"""Arguments are searched for References (and interactive functions to bind) inside
lists, tuples and dicts of at most this many items (as IPython Parallel does: a long
sequence is data, and searching it would cost every task)."""

RESOLVE_DEPTH = 4


def _resolve(value: Any, namespace: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with References replaced and interactive functions bound, at any depth
    up to :data:`RESOLVE_DEPTH` (a container is copied only if something in it changed)."""
    if isinstance(value, Reference):
        return value.resolve(namespace)
    kind = type(value)
    if depth < RESOLVE_DEPTH and kind in (list, tuple) and len(value) <= RESOLVE_ITEMS:
        items = [_resolve(v, namespace, depth + 1) for v in value]
        return kind(items) if any(a is not b for a, b in zip(items, value)) else value
    if depth < RESOLVE_DEPTH and kind is dict and len(value) <= RESOLVE_ITEMS:
        resolved = {k: _resolve(v, namespace, depth + 1) for k, v in value.items()}
        changed = any(resolved[k] is not v for k, v in value.items())
        return resolved if changed else value
    return bind_interactive(value, namespace)


def interactive(f: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: treat ``f`` as defined interactively, so it runs in the engine's namespace.

    The function then travels by value (even from an importable module) and its globals
    on the engine are the engine's namespace.
    """
    f.__module__ = "__main__"
    return f
