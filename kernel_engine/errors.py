"""The error classes that engines, the controller and clients raise."""

from __future__ import annotations

from typing import Any


def short_id(msg_id: Any) -> str:
    """A msg_id as shown to people: its last 8 characters (one process's msg_ids share
    their first 20, see :func:`kernel_engine.wire.new_msg_id`)."""
    return str(msg_id)[-8:]


class PXError(Exception):
    """Raised as the base of every jupyter-px error."""


class RemoteError(PXError):
    """Raised when a task raised an exception on an engine.

    Parameters
    ----------
    ename, evalue
        The remote exception's class name and ``str``.
    traceback
        The remote traceback, as text lines.
    engine_info
        Where it ran: ``engine_id``, ``engine_uuid``, ``msg_id``.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: list[str] | str | None = None,
        engine_info: dict[str, Any] | None = None,
    ):
        self.ename = ename
        self.evalue = evalue
        self.traceback = "\n".join(traceback) if isinstance(traceback, list) else (traceback or "")
        self.engine_info = dict(engine_info or {})
        self.engine_id: int | None = self.engine_info.get("engine_id")
        super().__init__(ename, evalue, self.traceback, self.engine_info)

    def __repr__(self) -> str:
        where = f"[{self.engine_id}:{short_id(self.engine_info.get('msg_id', ''))}]"
        return f"{where} {self.ename}: {self.evalue}"

    def __str__(self) -> str:
        tb = f"\n{self.traceback}" if self.traceback else ""
        return f"{self.ename}({self.evalue}) on engine {self.engine_id}{tb}"

    def render_traceback(self) -> list[str]:
        """IPython's hook: show the remote traceback instead of the local one."""
        lines = [f"[Engine {self.engine_id}] {self.ename}: {self.evalue}"]
        if self.traceback:
            lines.extend(self.traceback.splitlines())
        return lines

    def _render_traceback_(self) -> list[str]:
        return self.render_traceback()

    def print_traceback(self, excid: int | None = None) -> None:
        """Print the remote traceback."""
        print("\n".join(self.render_traceback()))


class CompositeError(RemoteError):
    """Raised when several tasks of one AsyncResult failed; ``elist`` holds each error."""

    tb_limit = 4

    def __init__(self, message: str, elist: list[RemoteError]):
        self.elist = list(elist)
        self.message = message
        first = self.elist[0] if self.elist else None
        super().__init__(
            first.ename if first else "CompositeError",
            message,
            first.traceback if first else "",
            first.engine_info if first else {},
        )

    def __str__(self) -> str:
        lines = [self.message]
        for err in self.elist[: self.tb_limit]:
            lines.append(repr(err))
        if len(self.elist) > self.tb_limit:
            lines.append(f"... {len(self.elist) - self.tb_limit} more exceptions ...")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CompositeError({len(self.elist)} errors)"

    def render_traceback(self, excid: int | None = None) -> list[str]:
        """One compact traceback per engine (or only error ``excid``)."""
        chosen = self.elist if excid is None else [self.elist[excid]]
        lines: list[str] = [self.message]
        for err in chosen[: self.tb_limit if excid is None else 1]:
            lines.append("")
            lines.extend(err.render_traceback())
        if excid is None and len(self.elist) > self.tb_limit:
            lines.append(f"... {len(self.elist) - self.tb_limit} more exceptions ...")
        return lines

    def raise_exception(self, excid: int = 0) -> None:
        """Raise error number ``excid`` of ``elist`` on its own."""
        raise self.elist[excid]

    def print_traceback(self, excid: int | None = None) -> None:
        """Print the tracebacks (or only error ``excid``'s)."""
        print("\n".join(self.render_traceback(excid)))


class AlreadyDisplayedError(CompositeError):
    """Raised by ``%%px`` when the engines' errors were already shown as they happened;
    ``original_error`` is the error itself."""

    def __init__(self, original_error: RemoteError):
        self.original_error = original_error
        elist = (
            original_error.elist if isinstance(original_error, CompositeError) else [original_error]
        )
        n = len(elist)
        super().__init__(f"{n} error{'s' if n != 1 else ''} (shown above)", elist)

    def __str__(self) -> str:
        return self.message

    def render_traceback(self, excid: int | None = None) -> list[str]:
        """The one-line summary (``excid``: that error's traceback after all)."""
        return [self.message] if excid is None else super().render_traceback(excid)

    def _render_traceback_(self) -> list[str]:
        return [self.message]


class EngineError(RemoteError):
    """Raised when the engine running (or holding) a task died or was stopped."""


class TaskAborted(RemoteError):
    """Raised when a task was aborted before it ran."""


class TaskTimeout(RemoteError, TimeoutError):
    """Raised when a task ran longer than its ``time_limit`` and was interrupted."""


class TaskRejectError(PXError):
    """Raised when an engine refused a task (IPython Parallel's name; jupyter-px's
    engines refuse through ``UnmetDependency``)."""


class NoEnginesRegistered(PXError):
    """Raised when work is submitted to a cluster with no engines."""


class InvalidTarget(PXError, ValueError):
    """Raised when a view names engines that do not exist."""


class UnmetDependency(RemoteError):
    """Raised on an engine when a task's requirements are not met there."""


class ImpossibleDependency(UnmetDependency):
    """Raised when a task's dependencies can never be met."""


class DependencyTimeout(ImpossibleDependency):
    """Raised when a task's dependencies were not met within its ``timeout``."""


class InvalidDependency(ImpossibleDependency):
    """Raised when a task depends on msg_ids the controller never saw."""


class SerializationError(PXError, TypeError):
    """Raised when an argument or result cannot be serialized; names the culprit."""


class ClusterError(PXError, RuntimeError):
    """Raised when a cluster or its engines fail to start or stop; carries their stderr."""


class LaunchError(ClusterError):
    """Raised when a launcher (mpiexec, sbatch, ...) fails; its message quotes the
    launcher's own output."""


class RegistrationError(ClusterError):
    """Raised when an engine could not join its cluster (refused, or no controller
    answered); says why."""


class StoreError(PXError, RuntimeError):
    """Raised when the task database cannot be opened or written; names the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"task database {path}: {message}")


# IPython Parallel's names for the base class, so its ``except`` clauses still catch.
IPythonError = PXError
KernelError = PXError


def collect_exceptions(results: list[Any], method: str) -> list[Any]:
    """``results``, or raise CompositeError if any of them is a RemoteError."""
    errors = [r for r in results if isinstance(r, RemoteError)]
    if errors:
        raise CompositeError(f"one or more exceptions from call to method: {method}", errors)
    return results


def wrap_exception(engine_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The exception being handled, as an error reply's content."""
    import sys
    import traceback

    etype, evalue, tb = sys.exc_info()
    name = etype.__name__ if etype is not None else "Error"
    return {
        "status": "error",
        "ename": name,
        "evalue": str(evalue),
        "traceback": traceback.format_exception(etype, evalue, tb),
        "engine_info": dict(engine_info or {}),
    }


def unwrap_exception(content: dict[str, Any]) -> RemoteError:
    """The RemoteError of an error reply's content."""
    return RemoteError(
        str(content.get("ename", "Error")),
        str(content.get("evalue", "")),
        content.get("traceback") or "",
        content.get("engine_info") or {},
    )


REMOTE_ERROR_CLASSES: dict[str, type[RemoteError]] = {
    cls.__name__: cls
    for cls in (
        EngineError,
        TaskAborted,
        TaskTimeout,
        UnmetDependency,
        ImpossibleDependency,
        DependencyTimeout,
        InvalidDependency,
    )
}
