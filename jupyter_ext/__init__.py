"""jupyter_ext: interactive parallel computing for Jupyter.

``import jupyter_ext as jx``; ``rc = jx.Cluster(n=4).start_and_connect_sync()``; then
``rc[:]`` (DirectView), ``rc.load_balanced_view()``, AsyncResults, ``%load_ext jupyter_ext``.
"""

from kernel_engine.serialize import Reference, interactive

from . import error  # (IPython Parallel's ``ipp.error``)
from ._asyncresult import AsyncHubResult, AsyncMapResult, AsyncResult
from ._canning import (
    PrePickled,
    can,
    can_map,
    deserialize_object,
    pack_apply_message,
    serialize_object,
    uncan,
    uncan_map,
    unpack_apply_message,
    use_cloudpickle,
    use_dill,
    use_pickle,
)
from ._client import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Client
from ._cluster import Cluster
from ._dependency import Dependency, depend, dependent, require
from ._executor import ViewExecutor
from ._lbview import LazyMapIterator, LoadBalancedView
from ._magics import load_ipython_extension
from ._manager import ClusterManager
from ._metadata import ExecuteReply, Metadata
from ._remotefunction import ParallelFunction, RemoteFunction, parallel, remote
from ._views import BroadcastView, DirectView, View
from .error import *  # noqa: F403  (the exceptions, as IPython Parallel's top level has them)
from .error import __all__ as _errors
from .integrations.joblib import register_joblib_backend

__version__ = "0.1.0"
version_info = (0, 1, 0)


def bind_kernel(**kwargs: object) -> None:
    """IPython Parallel's way to make an engine a kernel a console can attach to.

    jupyter-px's engines are Jupyter kernels already (``rc.engine_info(i)
    ["connection_info"]``, or ``jupyter console --existing`` on its connection file):
    there is nothing to do.
    """


__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "BroadcastView",
    "Client",
    "Cluster",
    "ClusterManager",
    "Dependency",
    "DirectView",
    "ExecuteReply",
    "LazyMapIterator",
    "LoadBalancedView",
    "Metadata",
    "ParallelFunction",
    "PrePickled",
    "Reference",
    "RemoteFunction",
    "View",
    "ViewExecutor",
    "bind_kernel",
    "can",
    "can_map",
    "depend",
    "dependent",
    "deserialize_object",
    "error",
    "interactive",
    "load_ipython_extension",
    "pack_apply_message",
    "parallel",
    "register_joblib_backend",
    "remote",
    "require",
    "serialize_object",
    "uncan",
    "uncan_map",
    "unpack_apply_message",
    "use_cloudpickle",
    "use_dill",
    "use_pickle",
    "version_info",
    *_errors,
]
