"""What a function's pickle depends on, read without pickling it: so that a function sent
again is pickled again only when that changed (:func:`kernel_engine.serialize.dumps_function`).

A function defined in a notebook (``__main__``) travels by value: cloudpickle pickles its
code, name, defaults, closure, attributes and the functions, modules and classes among
the globals its code names (its data, which engines do not use, is left out: see
``kernel_engine.serialize._slim``), each by value again unless it is importable (a module,
or a function or class of an importable module, which go by reference: their module and
qualified name). That cost 25 us for an empty function and 150 us for one that names
``np`` and ``sys`` (this machine), at every ``apply`` of the same function.

:func:`fingerprint` builds a key of everything that pickle reads, or None when any of it
may change unseen: a mutable value (a list, a dict, an array, an instance) in the
closure, the defaults or the annotations (or among the globals of a function that is not
interactive, which travel whole); function attributes; a class defined in ``__main__``.
Immutable values are in the key by value (a scalar, a tuple of them), importable ones by
module and name, code objects and functions by identity (held by the key, so an
identity cannot be reused). Equal keys mean equal pickles.
"""

from __future__ import annotations

import struct
import sys
from types import BuiltinFunctionType, CodeType, FunctionType, ModuleType
from typing import Any, TypeGuard

import cloudpickle

MAX_DEPTH = 8
"""Functions by value nested this deep (a helper of a helper ...) at most; deeper: no key."""

MAX_ITEMS = 64
"""Items of a tuple or frozenset at most; more: no key (it would cost what pickling costs)."""

_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
_DOUBLE = struct.Struct("<d").pack
_MISSING = ("missing",)  # a name the code uses that the globals do not have (yet)


KEPT = (FunctionType, ModuleType, type)
"""What an engine keeps of an interactive function's globals when it binds the function
to its namespace (``kernel_engine.serialize.bind_interactive``): so, all that is sent of
them (``kernel_engine.serialize._slim``), and all that the key reads of them."""


def is_interactive(f: Any) -> TypeGuard[FunctionType]:
    """Whether ``f`` is a function defined interactively (``__main__``): it runs in an
    engine's namespace, and travels with its code, not its data."""
    return type(f) is FunctionType and f.__module__ == "__main__"


class _Unsafe(Exception):
    """Something the pickle depends on may change without the key changing."""


class Same:
    """A key part equal only to the same object (held, so its id is not reused)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return type(other) is Same and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


_NAMES: dict[int, tuple[CodeType, tuple[str, ...]]] = {}
"""id(code) -> (code, its names): the code held, so that its id is not reused."""
_NAMES_SIZE = 4096


def global_names(code: CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the code nested in it may use (cloudpickle keeps
    those of them that the function's globals have)."""
    entry = _NAMES.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    found = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if type(const) is CodeType:
            found.update(dict.fromkeys(global_names(const)))
    if len(_NAMES) >= _NAMES_SIZE:
        _NAMES.clear()
    names = tuple(found)
    _NAMES[id(code)] = (code, names)
    return names


def fingerprint(f: Any) -> tuple[Any, ...] | None:
    """A key equal for two calls exactly when cloudpickle would pickle ``f`` alike; None
    when it cannot be known without pickling (see the module docstring)."""
    if type(f) is not FunctionType:
        return None
    try:
        # (the modules loaded: cloudpickle sends along those submodules of the modules a
        # function names that its code names, as imported when it pickles; a count, which
        # an import changes, stands for the list, which costs a scan of them all)
        return (_function(f, 0, {}), len(sys.modules))
    except Exception:  # (_Unsafe; or anything odd, a tuple nested too deep say: pickled)
        return None


def _function(f: FunctionType, depth: int, seen: dict[int, int]) -> tuple[Any, ...]:
    ref = _by_reference(f)
    if ref is not None:
        return ref
    visit = seen.get(id(f))
    if visit is not None:  # (recursion, or a helper two functions use: its key is there)
        return ("seen", visit)  # (by the order of the visits: holding f would keep it alive)
    if depth > MAX_DEPTH or f.__dict__ or getattr(f, "__type_params__", None):
        raise _Unsafe  # (attributes: anything, changed at will; type parameters: rare)
    seen[id(f)] = len(seen)
    closure = f.__closure__
    kwdefaults = f.__kwdefaults__
    annotations = f.__annotations__
    return (
        Same(f.__code__),
        f.__name__,
        f.__qualname__,
        _value(f.__module__, depth, seen),
        _value(f.__doc__, depth, seen),
        _value(f.__defaults__, depth, seen),
        None
        if not kwdefaults
        else tuple((k, _value(v, depth, seen)) for k, v in kwdefaults.items()),
        None
        if not annotations
        else tuple((k, _value(v, depth, seen)) for k, v in annotations.items()),
        None if closure is None else tuple(_cell(c, depth, seen) for c in closure),
        _globals(f, depth, seen),
    )


def _globals(f: FunctionType, depth: int, seen: dict[int, int]) -> tuple[Any, ...]:
    """The key of the globals ``f``'s code names: all of them (a missing one too); for an
    interactive function only its functions, modules and classes, which are all that is
    sent of its globals (see ``kernel_engine.serialize._slim``)."""
    source = f.__globals__
    names = global_names(f.__code__)
    if not is_interactive(f):
        return tuple(_value(source.get(name, _MISSING), depth, seen) for name in names)
    out = []
    for name in names:
        value = source.get(name)
        if isinstance(value, KEPT):
            out.append((name, _value(value, depth, seen)))
    return tuple(out)


def _cell(cell: Any, depth: int, seen: dict[int, int]) -> Any:
    try:
        contents = cell.cell_contents
    except ValueError:  # (empty: a name assigned later)
        return _MISSING
    return _value(contents, depth, seen)


def _value(value: Any, depth: int, seen: dict[int, int]) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        if kind is float:  # (by its bits: 0.0 == -0.0, and nan != nan)
            return (kind, _DOUBLE(value))
        if kind is complex:
            return (kind, _DOUBLE(value.real), _DOUBLE(value.imag))
        return (kind, value)  # (the type too: 1, 1.0 and True are equal)
    if value is _MISSING:
        return _MISSING
    if kind is tuple or kind is frozenset:
        if len(value) > MAX_ITEMS:
            raise _Unsafe
        return (kind, tuple(_value(item, depth, seen) for item in value))
    if kind is FunctionType:
        return _function(value, depth + 1, seen)
    if kind is ModuleType:
        name = value.__name__
        if sys.modules.get(name) is value and not _registered_by_value(name):
            return ("module", name)
        raise _Unsafe
    if isinstance(value, type) or kind is BuiltinFunctionType:
        ref = _by_reference(value)
        if ref is not None:
            return ref
    raise _Unsafe


def _by_reference(obj: Any) -> tuple[str, str, str] | None:
    """("ref", module, qualified name) when cloudpickle pickles ``obj`` by reference
    (found under that name in an imported module other than ``__main__``, whose package
    is not registered to go by value); else None."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if type(module_name) is not str or type(qualname) is not str:
        return None
    if module_name == "__main__" or "<locals>" in qualname:
        return None
    found: Any = sys.modules.get(module_name)
    if found is None:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, _MISSING)
    if found is not obj or _registered_by_value(module_name):
        return None
    return ("ref", module_name, qualname)


def _registered_by_value(module_name: str) -> bool:
    registered = cloudpickle.list_registry_pickle_by_value()
    if not registered:
        return False
    parts = module_name.split(".")
    return any(".".join(parts[:i]) in registered for i in range(1, len(parts) + 1))
