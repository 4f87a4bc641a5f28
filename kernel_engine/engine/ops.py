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
    """``list(map(f, *sequences))`` on one engine's share of a static map."""
    return list(map(f, *sequences))


def engine_id() -> int | None:
    """This engine's id in its cluster."""
    from IPython import get_ipython

    shell = get_ipython()
    return getattr(getattr(shell, "kernel", None), "engine_id", None)
