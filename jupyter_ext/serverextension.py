"""The Jupyter server extension: list, start, scale and stop clusters over REST.

IPython Parallel's server extension serves its routes under ``/ipyparallel/clusters``; the
same handlers answer there and under ``/jupyter-px/clusters`` (both below the server's
base URL). ``<key>`` is the cluster's id.

``GET /clusters``
    Every cluster: those made through this API and those running in the Jupyter runtime
    dir (:meth:`ClusterManager.load_clusters`), running ones first. One found running
    there and since stopped elsewhere is forgotten (it is not this server's to start
    again).
``POST /clusters``
    A new cluster from a JSON object of :class:`Cluster` arguments (``n``, ``cluster_id``,
    ``ip``, ``cwd``, ``start_timeout``, ...), plus ``"start": true`` to start it at once:
    201 with its model. 409 if its ``cluster_id`` is taken. A cluster that fails to start
    is not kept. Its engines run in ``cwd``: by default the server's root dir, which a
    relative ``cwd`` is relative to (as every path the server's API takes).
``GET /clusters/<key>``
    One cluster's model.
``POST /clusters/<key>``
    Start a stopped cluster (``{"n": N}``: with N engines). On a running cluster ``n``
    scales it to N engines: more are started, or the newest ones stopped; with no ``n``
    it is left as it is.
``DELETE /clusters/<key>``
    Stop the cluster (its engines and controller) and forget it: 204.

A model is :meth:`Cluster.to_dict` plus ``id`` (the key), ``state`` (``running``,
``stopped``, or what a request is doing to it: ``starting``, ``scaling``, ``stopping``),
``controller`` (``{"pid": ...}``, null when stopped) and ``engines`` (``n`` ready engines,
their ``ids``, and ``pids`` by id).

Errors are JSON ``{"message": ...}``, never a traceback: 400 for a body that is not a JSON
object or has an unknown field or one of the wrong type or value (the message names it);
403 without authentication or authorization (a cluster counts as the ``kernels`` resource:
it runs code); 404 for an unknown key; 409 while another request is changing the cluster
(rather than queueing behind a start that may take a minute); 500 when a start, scale or
stop fails, with the controller's own account.

Every blocking step (launching processes, waiting for engines, reading cluster folders)
runs in a worker thread through the clusters' async methods or :func:`asyncio.to_thread`:
the server's event loop only awaits. Clusters started here stop when the server exits
(``shutdown_atexit``, on by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from http.client import responses
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from kernel_engine import clusters, protocol
from kernel_engine.launchers import BUILTIN as BUILTIN_LAUNCHERS

from ._cluster import Cluster
from ._manager import ClusterManager

if TYPE_CHECKING:
    from jupyter_server.serverapp import ServerApp

__all__ = [
    "ClusterHandler",
    "ClusterListHandler",
    "cluster_model",
]

ROUTES = ("ipyparallel", "jupyter-px")
"""The URL prefixes the handlers are served under: IPython Parallel's, and ours."""
SETTINGS_KEY = "jupyter_px_clusters"

log = logging.getLogger(__name__)

_NONE = type(None)
_NUMBER = (int, float)
_NEW_FIELDS: dict[str, tuple[type, ...]] = {
    "start": (bool,),
    "n": (int, _NONE),
    "cluster_id": (str, _NONE),
    "engines": (str,),
    "ip": (str,),
    "cwd": (str, _NONE),
    "start_timeout": _NUMBER,
    "shutdown_atexit": (bool,),
    "log_level": (str,),
    "curve": (bool, _NONE),
    "client_timeout": _NUMBER,
    "on_client_lost": (str,),
}
_START_FIELDS: dict[str, tuple[type, ...]] = {"n": (int, _NONE)}
_TYPE_NAMES: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    _NONE: "null",
}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _http_error(status: int, message: str) -> web.HTTPError:
    # the message as an argument: tornado %-formats log_message with its args
    return web.HTTPError(status, "%s", message)


def _check_body(body: Any, fields: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """A request's JSON body (None: empty) with only known ``fields`` of their types.

    Raises a 400 naming the first field that is unknown or of the wrong type.
    """
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise _http_error(400, f"the body must be a JSON object, not {_json_kind(body)}")
    for name, value in body.items():
        if name not in fields:
            known = ", ".join(fields)
            raise _http_error(400, f"unknown field {name!r} (known fields: {known})")
        types = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in dict.fromkeys(types))
            raise _http_error(400, f"{name} must be {wanted}, not {_json_kind(value)}")
    return dict(body)


def _ready_ids(cluster: Cluster) -> list[int]:
    """The ids of the cluster's ready engines, from its folder (reads a file)."""
    ready = clusters.read_cluster(cluster.folder).info.get("ready") or []
    return sorted(int(i) for i in ready)


def cluster_model(key: str, cluster: Cluster, doing: str | None = None) -> dict[str, Any]:
    """The JSON model of a cluster (reads its folder: call it off the event loop).

    Parameters
    ----------
    doing
        What a request is doing to it now (``starting``...), shown as its state.
    """
    model = cluster.to_dict()
    running = cluster.running
    info = clusters.read_cluster(cluster.folder).info if running else {}
    ready = sorted(int(i) for i in info.get("ready") or [])
    engines = info.get("engines") or {}
    model.update(
        id=key,
        state=doing or ("running" if running else "stopped"),
        controller={"pid": cluster.controller_pid} if running else None,
        engines={
            "n": len(ready),
            "ids": ready,
            "pids": {str(i): (engines.get(str(i)) or {}).get("pid") for i in ready},
        },
    )
    return model


class _Registry:
    """The server's clusters (a ClusterManager) and what requests are doing to them."""

    def __init__(self, default_cwd: str | None = None) -> None:
        self.manager = ClusterManager()
        self.default_cwd = default_cwd
        self.busy: dict[str, str] = {}
        self.made: set[str] = set()
        """The keys of the clusters made through this API (the others were found running
        in the runtime dir)."""
        self.loading = asyncio.Lock()

    def _forget_stopped(self, keep: set[str]) -> None:
        """Forget the clusters found in the runtime dir that no longer run (worker thread).

        Their owner stopped them, or they died: restarting one from here would start a
        cluster nobody stops (it was adopted without ``shutdown_atexit``), and a new
        controller on its folder (``--restore``) is found again by the next load.
        """
        for key, cluster in list(self.manager.clusters.items()):
            if key in self.made or key in keep or cluster.running:
                continue
            self.manager.clusters.pop(key, None)
            client, cluster._client = cluster._client, None
            if client is not None:
                client.close()

    async def load_unlocked(self) -> None:
        """Add the clusters running in the runtime dir, forget those found there before
        that stopped since (hold :attr:`loading`)."""
        keep = set(self.busy)
        try:
            await asyncio.to_thread(self._forget_stopped, keep)
            await asyncio.to_thread(self.manager.load_clusters)
        except Exception:
            # a cluster that stopped while it was being read; the next listing finds the rest
            log.warning("jupyter-px: could not load every running cluster", exc_info=True)

    async def load(self) -> dict[str, Cluster]:
        """Every known cluster, those running in the runtime dir included."""
        async with self.loading:
            await self.load_unlocked()
        return dict(self.manager.clusters)

    @contextlib.contextmanager
    def claim(self, key: str, doing: str) -> Iterator[None]:
        """Mark the cluster as busy ``doing`` something; a 409 if it already is."""
        if key in self.busy:
            raise _http_error(409, f"cluster {key} is {self.busy[key]}; try again when done")
        self.busy[key] = doing
        try:
            yield
        finally:
            del self.busy[key]


class _BaseHandler(APIHandler):
    auth_resource = "kernels"

    @property
    def registry(self) -> _Registry:
        registry: _Registry = self.settings[SETTINGS_KEY]
        return registry

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"message": ...}``: the HTTPError's message, else the status's name only."""
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        message = responses.get(status_code, "Unknown HTTP Error")
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.finish(json.dumps({"message": message}))

    def failure(self, exc: BaseException, what: str) -> web.HTTPError:
        """A 500 saying what failed and why, the traceback kept for the server's log."""
        self.log.error("jupyter-px: %s", what, exc_info=exc)
        return _http_error(500, f"{what}: {exc}")

    async def reply(self, key: str, cluster: Cluster, status: int = 200) -> None:
        doing = self.registry.busy.get(key)
        model = await asyncio.to_thread(cluster_model, key, cluster, doing)
        self.set_status(status)
        self.finish(json.dumps(model))


class ClusterListHandler(_BaseHandler):
    """``GET``: every cluster; ``POST``: a new one (started with ``"start": true``)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        found = await self.registry.load()
        busy = dict(self.registry.busy)

        def models() -> list[dict[str, Any]]:
            return [cluster_model(key, c, busy.get(key)) for key, c in found.items()]

        listed = await asyncio.to_thread(models)
        listed.sort(key=lambda m: (m["state"] == "stopped", m["id"]))
        self.finish(json.dumps(listed))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = _check_body(self.get_json_body(), _NEW_FIELDS)
        start = body.pop("start", False)
        root = self.registry.default_cwd
        if root and (body.get("cwd") is None or not os.path.isabs(body["cwd"])):
            # (relative to the root dir, not to wherever the server process was started)
            body["cwd"] = os.path.join(root, body.get("cwd") or "")
        registry = self.registry
        async with registry.loading:
            await registry.load_unlocked()
            wanted = body.get("cluster_id")
            if wanted is not None and wanted in registry.manager.clusters:
                raise _http_error(409, f"cluster {wanted} exists already")
            engines = body.get("engines", "local")
            if engines not in BUILTIN_LAUNCHERS:
                # a plug-in would be imported, and run, in this server: not from a request
                known = ", ".join(repr(n) for n in BUILTIN_LAUNCHERS)
                raise _http_error(400, f"engines: {engines!r} is not one of {known}")
            try:
                _, cluster = registry.manager.new_cluster(**body)
            except (TypeError, ValueError) as exc:
                raise _http_error(400, str(exc)) from None
            key = cluster.cluster_id
            registry.made.add(key)
        if start:
            with registry.claim(key, "starting"):
                try:
                    await cluster.start_cluster()
                except Exception as exc:
                    # a failed start leaves nothing running (Cluster sees to that) nor listed
                    registry.manager.clusters.pop(key, None)
                    registry.made.discard(key)
                    raise self.failure(exc, f"cluster {key} did not start") from None
        self.set_header("Location", url_path_join(self.request.path, key))
        await self.reply(key, cluster, 201)


class ClusterHandler(_BaseHandler):
    """One cluster: ``GET`` its model, ``POST`` start or scale it, ``DELETE`` stop it."""

    async def _find(self, key: str) -> Cluster:
        registry = self.registry
        cluster = registry.manager.clusters.get(key)
        if cluster is None or key not in registry.made:
            # perhaps started elsewhere since the last listing, or stopped there since
            cluster = (await registry.load()).get(key)
        if cluster is None:
            raise _http_error(404, f"no cluster {key!r}")
        return cluster

    @web.authenticated
    @authorized
    async def get(self, key: str) -> None:
        await self.reply(key, await self._find(key))

    @web.authenticated
    @authorized
    async def post(self, key: str) -> None:
        n = _check_body(self.get_json_body(), _START_FIELDS).get("n")
        if n is not None:
            try:
                protocol.check_int("n", n, 0, 4096)
            except ValueError as exc:
                raise _http_error(400, str(exc)) from None
        cluster = await self._find(key)
        if not cluster.running:
            with self.registry.claim(key, "starting"):
                try:
                    await cluster.start_cluster(n)
                except Exception as exc:
                    raise self.failure(exc, f"cluster {key} did not start") from None
                if n is not None:
                    cluster.n = n
        elif n is not None:
            with self.registry.claim(key, "scaling"):
                try:
                    await self._scale(cluster, n)
                except Exception as exc:
                    raise self.failure(exc, f"cluster {key} did not scale to {n} engines") from None
        await self.reply(key, cluster)

    @staticmethod
    async def _scale(cluster: Cluster, n: int) -> None:
        """Start engines up to ``n``, or stop the newest down to ``n``."""
        ready = await asyncio.to_thread(_ready_ids, cluster)
        if n > len(ready):
            await cluster.start_engines(n - len(ready))
        elif n < len(ready):
            await cluster.stop_engines(ready[n:])
        cluster.n = n

    @web.authenticated
    @authorized
    async def delete(self, key: str) -> None:
        cluster = await self._find(key)
        with self.registry.claim(key, "stopping"):
            try:
                await cluster.stop_cluster()
            except Exception as exc:
                raise self.failure(exc, f"cluster {key} did not stop") from None
            # (stopped now: forgotten without another stop on the event loop)
            self.registry.manager.clusters.pop(key, None)
            self.registry.made.discard(key)
        self.set_status(204)
        self.finish()


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_ext.serverextension"}]


def _load_jupyter_server_extension(serverapp: ServerApp) -> None:
    """Serve the cluster API under each of :data:`ROUTES`, below the base URL."""
    web_app = serverapp.web_app
    web_app.settings[SETTINGS_KEY] = _Registry(default_cwd=serverapp.root_dir)
    base_url = web_app.settings["base_url"]
    handlers: list[tuple[str, type[APIHandler]]] = []
    for prefix in ROUTES:
        handlers.append((url_path_join(base_url, prefix, "clusters") + "/?", ClusterListHandler))
        handlers.append((url_path_join(base_url, prefix, "clusters", "([^/]+)"), ClusterHandler))
    web_app.add_handlers(".*$", handlers)
    serverapp.log.info(
        "jupyter-px: cluster API at %s", ", ".join(f"{base_url}{p}/clusters" for p in ROUTES)
    )
    if serverapp.jpserver_extensions.get("ipyparallel"):
        # tornado serves a path with the handlers added first, and extensions load in
        # alphabetical order: "ipyparallel" before "jupyter_ext"
        serverapp.log.warning(
            "jupyter-px: ipyparallel's server extension is enabled too and answers "
            "%sipyparallel/clusters; jupyter-px's clusters are at %sjupyter-px/clusters",
            base_url,
            base_url,
        )
