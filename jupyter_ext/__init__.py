"""jupyter_ext: interactive parallel computing for Jupyter.

``import jupyter_ext as jx``; ``rc = jx.Cluster(n=4).start_and_connect_sync()``; then
``rc[:]`` (DirectView), ``rc.load_balanced_view()``, AsyncResults, ``%load_ext jupyter_ext``.
"""

from kernel_engine.errors import (
    ClusterError,
    CompositeError,
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    InvalidTarget,
    NoEnginesRegistered,
    RemoteError,
    SerializationError,
    TaskAborted,
    TaskTimeout,
    UnmetDependency,
)
from kernel_engine.serialize import Reference, interactive

from ._asyncresult import AsyncHubResult, AsyncMapResult, AsyncResult
from ._client import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Client
from ._cluster import Cluster
from ._dependency import Dependency, depend, require
from ._lbview import LoadBalancedView
from ._magics import load_ipython_extension
from ._metadata import ExecuteReply, Metadata
from ._remotefunction import ParallelFunction, RemoteFunction, parallel, remote
from ._views import DirectView, View

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "Cluster",
    "ClusterError",
    "CompositeError",
    "Dependency",
    "DependencyTimeout",
    "DirectView",
    "EngineError",
    "ExecuteReply",
    "ImpossibleDependency",
    "InvalidDependency",
    "InvalidTarget",
    "LoadBalancedView",
    "Metadata",
    "NoEnginesRegistered",
    "ParallelFunction",
    "Reference",
    "RemoteError",
    "RemoteFunction",
    "SerializationError",
    "TaskAborted",
    "TaskTimeout",
    "UnmetDependency",
    "View",
    "depend",
    "interactive",
    "load_ipython_extension",
    "parallel",
    "remote",
    "require",
]
