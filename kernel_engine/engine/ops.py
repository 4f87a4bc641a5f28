"""Functions that views send to engines for data movement (run in the engine's namespace).

They live in an importable module, so they travel by reference, not by value.
"""

from __future__ import annotations

from typing import Any

from kernel_engine.serialize import Reference


def _namespace() -> dict[str, Any]:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("not running inside an engine kernel")
    ns: dict[str, Any] = shell.user_ns
    return ns


def push(namespace: dict[str, Any]) -> None:
    """Assign every name of ``namespace`` in the engine's namespace."""
    _namespace().update(namespace)


def pull(names: str | list[str] | tuple[str, ...]) -> Any:
    """One value for a name, a list of values for a list of names."""
    ns = _namespace()
    if isinstance(names, str):
        return Reference(names).resolve(ns)
    return [Reference(name).resolve(ns) for name in names]


def clear() -> None:
    """Remove every user name from the engine's namespace."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        shell.reset(new_session=False)


def map_chunk(f: Any, *sequences: Any) -> list[Any]:
    """``list(map(f, *sequences))`` on one chunk of a map."""
    return list(map(f, *sequences))


def map_chunk_safe(f: Any, *sequences: Any) -> list[Any]:
    """Like :func:`map_chunk`, but an element that raises gives its RemoteError as result."""
    from kernel_engine.engine.lane import format_traceback
    from kernel_engine.errors import RemoteError

    out: list[Any] = []
    for args in zip(*sequences):
        try:
            out.append(f(*args))
        except Exception as exc:
            out.append(
                RemoteError(
                    type(exc).__name__, str(exc), format_traceback(exc), {"engine_id": engine_id()}
                )
            )
    return out


def call_part(f: Any, *parts: Any) -> Any:
    """``f(*parts)`` for a ParallelFunction: the result is one part of the joined result."""
    return f(*parts)


def engine_id() -> int | None:
    """This engine's id in its cluster."""
    from IPython import get_ipython

    shell = get_ipython()
    return getattr(getattr(shell, "kernel", None), "engine_id", None)
