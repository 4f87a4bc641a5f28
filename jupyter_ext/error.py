"""The exceptions, under IPython Parallel's module name: code written for it imports
``ipyparallel.error`` (``from ipyparallel.error import RemoteError``, ``except
ipp.error.TimeoutError:``), which is this with only the import changed.

``TimeoutError`` is Python's own, which ``AsyncResult.get`` raises here (IPython
Parallel's is a class of its own: ``except ipp.error.TimeoutError`` catches ours too).
"""

from builtins import TimeoutError

from kernel_engine.errors import (
    AlreadyDisplayedError,
    ClusterError,
    CompositeError,
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    InvalidTarget,
    IPythonError,
    KernelError,
    LaunchError,
    NoEnginesRegistered,
    RegistrationError,
    RemoteError,
    SerializationError,
    StoreError,
    TaskAborted,
    TaskRejectError,
    TaskTimeout,
    UnmetDependency,
    collect_exceptions,
    unwrap_exception,
    wrap_exception,
)

__all__ = [
    "AlreadyDisplayedError",
    "ClusterError",
    "CompositeError",
    "DependencyTimeout",
    "EngineError",
    "IPythonError",
    "ImpossibleDependency",
    "InvalidDependency",
    "InvalidTarget",
    "KernelError",
    "LaunchError",
    "NoEnginesRegistered",
    "RegistrationError",
    "RemoteError",
    "SerializationError",
    "StoreError",
    "TaskAborted",
    "TaskRejectError",
    "TaskTimeout",
    "TimeoutError",
    "UnmetDependency",
    "collect_exceptions",
    "unwrap_exception",
    "wrap_exception",
]
