"""The controller process: owns the engines and multiplexes clients onto them.

Sockets: a ROUTER for clients' requests (``client_port``) and a PUB relaying every
engine's iopub, tagged ``engine.<id>``, plus the controller's own events
(``iopub_port``). Requests are forwarded as frames; the controller parses headers (and
reply parent headers) only, never unpickles user data, and never re-signs what it relays.
Every forwarded request is remembered until its engine answers, so an engine's death
turns each of them into an ``EngineError`` reply at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from kernel_engine import protocol

from .balancer import Balancer
from .engines import Engine, EngineSet
from .hub import Hub
from .loop import PollLoop
from .router import Router

log = logging.getLogger("kernel_engine.controller")


class Controller:
    """One cluster's controller.

    Parameters
    ----------
    folder
        The cluster folder: connection file, engine logs and connection files.
    ip
        The interface clients and engines use (127.0.0.1 unless asked otherwise).
    cluster_id
        The cluster's name.
    parent_pid
        Stop when this process (the launching notebook or script) is gone.
    """

    def __init__(
        self,
        folder: Path,
        ip: str = "127.0.0.1",
        cluster_id: str = "",
        parent_pid: int | None = None,
        cwd: str | None = None,
    ):
        self.folder = folder
        self.ip = ip
        self.cluster_id = cluster_id or folder.name
        self.parent_pid = parent_pid
        self.cwd = cwd
        self.context: zmq.Context[Any] = zmq.Context()
        # No high-water marks: a busy engine or a slow client must never block this loop
        # (a DEALER blocks at its mark) nor lose replies (a ROUTER drops at its mark).
        self.context.sndhwm = 0
        self.context.rcvhwm = 0
        self.wire = protocol.Wire(protocol.new_key(), username="controller")
        self.loop = PollLoop()
        self.hub = Hub()
        self.clients = self.context.socket(zmq.ROUTER)
        self.clients.linger = 0
        self.clients.router_mandatory = False
        self.client_port = self.clients.bind_to_random_port(f"tcp://{ip}")
        self.iopub = self.context.socket(zmq.PUB)
        self.iopub.linger = 0
        self.iopub.sndhwm = 0
        self.iopub_port = self.iopub.bind_to_random_port(f"tcp://{ip}")
        self.engines = EngineSet(self.loop, self.context, self.wire, folder, ip, self.cluster_id)
        self.router = Router(self)
        self.balancer = Balancer(self)
        self.dead: dict[int, str] = {}
        self._awaiting: set[int] = set()
        self._startup_reported = False
        self.exit_code = 0
        self.engines.on_ready = self._engine_ready
        self.engines.on_dead = self._engine_dead
        self.engines.on_message = self.router.from_engine
        self.engines.on_iopub = self.router.relay_iopub
        self.loop.add_socket(self.clients, self.router.from_client)
        if parent_pid:
            self.loop.call_every(0.5, self._check_parent)

    @property
    def connection_file(self) -> Path:
        return self.folder / "client.json"

    def connection_info(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "ip": self.ip,
            "transport": "tcp",
            "client_port": self.client_port,
            "iopub_port": self.iopub_port,
            "key": self.wire.key.decode(),
            "signature_scheme": protocol.SIGNATURE_SCHEME,
            "controller_pid": os.getpid(),
            "folder": str(self.folder),
        }

    def write_files(self) -> None:
        """Write the client connection file (mode 0600) and the cluster description."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.connection_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.connection_info(), f, indent=1)
        os.chmod(self.connection_file, 0o600)
        self._write_cluster_json()

    def _write_cluster_json(self) -> None:
        info = {
            "cluster_id": self.cluster_id,
            "controller_pid": os.getpid(),
            "connection_file": str(self.connection_file),
            "engines": {str(e.id): e.info() for e in self.engines.engines.values()},
            "ready": self.engines.ready_ids(),
            "updated": time.time(),
        }
        tmp = self.folder / "cluster.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.folder / "cluster.json")

    def start_engines(self, n: int) -> list[int]:
        """Start ``n`` engines; returns their ids (they become ready asynchronously)."""
        started = self.engines.start(n, cwd=self.cwd)
        ids = [e.id for e in started]
        self._awaiting.update(ids)
        return ids

    def _engine_ready(self, engine: Engine) -> None:
        self.balancer.engine_added(engine)
        self.router.publish_event(protocol.ENGINE_REGISTERED, {"engine": engine.info()})
        self._awaiting.discard(engine.id)
        self._write_cluster_json()
        if not self._awaiting and not self._startup_reported:
            self._report({"status": "ready", "ids": self.engines.ready_ids()})

    def _engine_dead(self, engine: Engine, reason: str) -> None:
        self.dead[engine.id] = reason.splitlines()[0]
        self.router.fail_inflight(engine, "EngineError", self.dead[engine.id])
        self.balancer.engine_removed(engine)
        self.router.publish_event(
            protocol.ENGINE_UNREGISTERED, {"engine_id": engine.id, "reason": reason}
        )
        self._write_cluster_json()
        if engine.id in self._awaiting and not self._startup_reported:
            self._report({"status": "error", "message": f"engine failed to start: {reason}"})
            self.loop.stop()
            self.exit_code = 1
        self._awaiting.discard(engine.id)

    def _report(self, status: dict[str, Any]) -> None:
        """Tell whoever launched us (on stdout) that startup finished, then leave stdout."""
        self._startup_reported = True
        status["connection_file"] = str(self.connection_file)
        try:
            sys.stdout.write(json.dumps(status) + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def _check_parent(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.warning("parent process %i is gone; stopping", self.parent_pid)
            self.loop.stop()

    def run(self) -> int:
        """Serve until stopped (a shutdown request, SIGTERM/SIGINT, or the parent's exit)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.loop.stop())
        try:
            self.loop.run()
        finally:
            self.close()
        return self.exit_code

    def stop_engines(self, eids: list[int] | None = None, reason: str = "was stopped") -> None:
        """Stop engines; their unanswered requests fail with ``EngineError``."""
        for engine in self.engines.stop(eids):
            self.dead[engine.id] = f"engine {engine.id} {reason}"
            self.router.fail_inflight(engine, "EngineError", self.dead[engine.id])
            self.balancer.engine_removed(engine)
            self.router.publish_event(
                protocol.ENGINE_UNREGISTERED,
                {"engine_id": engine.id, "reason": self.dead[engine.id]},
            )
        self._write_cluster_json()

    def close(self) -> None:
        """Stop every engine, tell clients, close sockets, remove the cluster folder files."""
        try:
            self.stop_engines(reason="was stopped with its cluster")
            self.router.publish_event(protocol.CONTROLLER_STOPPING, {})
        finally:
            for name in ("client.json", "cluster.json"):
                try:
                    (self.folder / name).unlink()
                except OSError:
                    pass
            self.clients.close(linger=0)
            self.iopub.close(linger=100)
            self.context.term()
