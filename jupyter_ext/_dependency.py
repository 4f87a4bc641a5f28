"""Dependencies of load-balanced tasks: ``Dependency``, ``@depend`` and ``@require``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from kernel_engine import protocol
from kernel_engine.errors import UnmetDependency
from kernel_engine.serialize import bind_interactive

_FLAGS = ("all", "success", "failure")


class Dependency(set[str]):
    """A set of msg_ids a task waits for (``after``) or must run beside (``follow``).

    Parameters
    ----------
    dependencies
        msg_ids, AsyncResults, or other Dependencies (or an iterable of them); or the dict
        form of a Dependency (:meth:`as_dict`'s, or IPython Parallel's, whose msg_ids are
        under ``dependencies``), whose flags then override these.
    all
        Every dependency must be met (else: any one).
    success, failure
        Whether a dependency that succeeded / failed counts as met.
    """

    def __init__(
        self,
        dependencies: Any = (),
        all: bool = True,
        success: bool = True,
        failure: bool = False,
    ):
        if isinstance(dependencies, dict):
            unknown = set(dependencies) - {"msg_ids", "dependencies", *_FLAGS}
            if unknown:
                raise ValueError(
                    f"a Dependency's dict form has msg_ids (or dependencies), all, success and "
                    f"failure, not {sorted(map(str, unknown))}"
                )
            all = dependencies.get("all", all)
            success = dependencies.get("success", success)
            failure = dependencies.get("failure", failure)
            dependencies = [dependencies.get(k, ()) for k in ("msg_ids", "dependencies")]
        super().__init__(msg_ids_of(dependencies))
        # (checked: success="no" counted successes; the wire form takes bools only)
        self.all = protocol.check_bool("Dependency's all", all)
        self.success = protocol.check_bool("Dependency's success", success)
        self.failure = protocol.check_bool("Dependency's failure", failure)
        if not (success or failure):
            raise ValueError("a dependency must count success, failure, or both as met")

    def check(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency is met, given the msg_ids that completed (and failed)."""
        if not self:
            return True
        met = (set(completed) if self.success else set()) | (
            set(failed or ()) if self.failure else set()
        )
        return self.issubset(met) if self.all else not self.isdisjoint(met)

    def unreachable(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency can no longer be met, given what completed and failed."""
        if not self:
            return False
        spoilt = (set(completed) if not self.success else set()) | (
            set(failed or ()) if not self.failure else set()
        )
        return not self.isdisjoint(spoilt) if self.all else self.issubset(spoilt)

    def as_dict(self) -> dict[str, Any]:
        """What travels in a task's metadata."""
        return {
            "msg_ids": sorted(self),
            "all": self.all,
            "success": self.success,
            "failure": self.failure,
        }

    def __repr__(self) -> str:
        return (
            f"Dependency({sorted(self)}, all={self.all}, success={self.success}, "
            f"failure={self.failure})"
        )


def msg_ids_of(obj: Any) -> list[str]:
    """msg_ids from a msg_id, an AsyncResult, a Dependency, or an iterable of those."""
    if obj is None:
        return []
    if isinstance(obj, str):
        return [obj]
    ids = getattr(obj, "msg_ids", None)
    if ids is not None:
        return list(ids)
    if isinstance(obj, Iterable):
        out: list[str] = []
        for item in obj:
            out.extend(msg_ids_of(item))
        return out
    raise TypeError(f"expected msg_ids or AsyncResults, not a {type(obj).__name__}")


def as_dependency(obj: Any) -> dict[str, Any] | None:
    """The wire form of an ``after``/``follow`` flag (None when empty)."""
    if obj is None:
        return None
    dep = obj if isinstance(obj, Dependency) else Dependency(obj)
    return dep.as_dict() if dep else None


class DependentFunction:
    """A function that first checks, on the engine, that it can run there.

    When ``check(*args, **kwargs)`` returns False, the engine refuses the task with
    ``UnmetDependency`` and the scheduler tries another engine.
    """

    def __init__(self, f: Callable[..., Any], check: Callable[..., Any], *args: Any, **kwargs: Any):
        self.f = f
        self.check = check
        self.args = args
        self.kwargs = kwargs
        self.__name__ = getattr(f, "__name__", "dependent")
        self.__doc__ = getattr(f, "__doc__", None)

    def _px_bind(self, namespace: dict[str, Any]) -> DependentFunction:
        return DependentFunction(
            bind_interactive(self.f, namespace),
            bind_interactive(self.check, namespace),
            *self.args,
            **self.kwargs,
        )

    def _px_for_engines(self, for_engines: Callable[[Any], Any]) -> DependentFunction:
        """What is pickled of it: the functions it wraps as ``for_engines`` makes them
        (a notebook's without the data they name, see ``kernel_engine.serialize``)."""
        return DependentFunction(
            for_engines(self.f), for_engines(self.check), *self.args, **self.kwargs
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _is_false(self.check(*self.args, **self.kwargs)):
            raise UnmetDependency(
                "UnmetDependency", f"{getattr(self.check, '__name__', 'check')} was false here"
            )
        return self.f(*args, **kwargs)


def _is_false(result: Any) -> bool:
    """Whether a dependency check said no: it returned False (numpy's too). As in IPython
    Parallel, any other result, None say, lets the task run; raising UnmetDependency
    refuses it as well."""
    if isinstance(result, bool):
        return not result
    kind = type(result)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_") and not result


def depend(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Decorator: run the function only on engines where ``check(*args, **kwargs)`` does
    not return False (nor raise UnmetDependency)."""

    def decorate(f: Callable[..., Any]) -> DependentFunction:
        return DependentFunction(f, check, *args, **kwargs)

    return decorate


def _importable(*names: str) -> bool:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return False
    return True


class _Requirements:
    """The check of ``@require``: every module imports on the engine, and is then
    imported into the engine's namespace, with the functions and objects given."""

    def __init__(
        self,
        names: tuple[str, ...],
        functions: tuple[Callable[..., Any], ...] = (),
        objects: dict[str, Any] | None = None,
    ):
        self.names = names
        self.functions = functions
        self.objects = dict(objects or {})
        self.__name__ = f"require({', '.join(names)})"

    def _px_for_engines(self, for_engines: Callable[[Any], Any]) -> _Requirements:
        """What is pickled of it: its functions as ``for_engines`` makes them (the engine
        binds them to its namespace); its objects are sent as they are."""
        return _Requirements(self.names, tuple(map(for_engines, self.functions)), self.objects)

    def __call__(self) -> bool:
        if not _importable(*self.names):
            missing = [n for n in self.names if not _importable(n)]
            raise UnmetDependency("UnmetDependency", f"cannot import {', '.join(missing)}")
        namespace = _engine_namespace()
        if namespace is not None:
            for name in self.names:
                top = name.split(".")[0]
                namespace[top] = importlib.import_module(top)
            for f in self.functions:
                namespace[f.__name__] = bind_interactive(f, namespace)
            namespace.update(self.objects)
        return True


def _engine_namespace() -> dict[str, Any] | None:
    """The user namespace of the engine (the IPython shell) this runs in, if any."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover (IPython is a dependency)
        return None
    shell = get_ipython()
    return None if shell is None else shell.user_ns


def require(*modules: str | ModuleType | Callable[..., Any], **objects: Any) -> Callable[..., Any]:
    """Decorator: run the function only on engines where these modules import.

    As in IPython Parallel, the modules are then imported into the engine's namespace,
    functions given among them are put there too (by their names), and so are the
    keyword ``objects``.
    """
    names: list[str] = []
    functions: list[Callable[..., Any]] = []
    for item in modules:
        if isinstance(item, ModuleType):
            names.append(item.__name__)
        elif isinstance(item, str):
            names.append(item)
        elif callable(item) and isinstance(getattr(item, "__name__", None), str):
            functions.append(item)  # (put on the engine under its __name__)
        else:  # (a partial, say: no name to put it under)
            raise TypeError(
                f"require takes modules, module names or functions (objects with a "
                f"__name__); pass other objects by keyword (name=obj), not {item!r}"
            )

    def decorate(f: Callable[..., Any]) -> DependentFunction:
        return DependentFunction(f, _Requirements(tuple(names), tuple(functions), objects))

    return decorate


def dependent(f: Callable[..., Any], df: Callable[..., Any], *dargs: Any, **dkwargs: Any) -> Any:
    """``f``, run only where ``df(*dargs, **dkwargs)`` does not return False (what
    ``@depend`` makes)."""
    return DependentFunction(f, df, *dargs, **dkwargs)
