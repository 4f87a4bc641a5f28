"""Reference rows for ``run.py``: what users would otherwise reach for on one machine
(``concurrent.futures.ProcessPoolExecutor``) and the floor any tool on ZeroMQ stands on
(raw pyzmq between two processes: no signing, no pickling, no bookkeeping).

Each class has the child-side interface of ``run.py``'s tools: ``load``, ``module``,
``start``, ``setup``, ``workloads``, ``stop``. Rows a reference has no counterpart for are
not measured (``n/a`` in the table; see ``Metric.refs``).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import workloads as W
import zmq

# ----------------------------------------------------------------- functions run in workers

_KEPT: dict[str, Any] = {}


def _pid_after(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def _nbytes(a: np.ndarray) -> int:
    """What a push costs: the array arrives (unpickled) in the worker."""
    return int(a.nbytes)


def _keep(mb: int) -> int:
    _KEPT["a"] = W.make_array(mb)
    return os.getpid()


def _kept() -> np.ndarray:
    return _KEPT["a"]


class PoolTool:
    """``ProcessPoolExecutor(n)``: a task is a ``submit``; a round trip ``.result()``."""

    def __init__(self) -> None:
        self.ex: ProcessPoolExecutor | None = None
        self.one: ProcessPoolExecutor | None = None
        self.setup_s = 0.0

    def load(self) -> None:
        pass

    def module(self) -> Any:
        import concurrent.futures

        return concurrent.futures

    def start(self, n: int, workdir: str) -> float:
        """Until ``n`` worker processes have each run a task (the pool starts them on
        demand: this makes it start them all)."""
        t0 = time.perf_counter()
        self.ex = ProcessPoolExecutor(n)
        pids = set(self.ex.map(_pid_after, [0.05] * n))
        if len(pids) != n:
            raise RuntimeError(f"{len(pids)} workers ran the start tasks, not {n}")
        return time.perf_counter() - t0 - 0.05

    def setup(self, notes: list[str]) -> bool:
        assert self.ex is not None
        t0 = time.perf_counter()
        list(self.ex.map(W.noop1, range(20)))
        self.setup_s = time.perf_counter() - t0
        return True

    def workloads(
        self, only: str, s: dict[str, Any], ctx: Any
    ) -> list[tuple[tuple[str, ...], Any]]:
        ex = self.ex
        assert ex is not None
        out: list[tuple[tuple[str, ...], Any]] = []

        def roundtrip() -> None:
            ex.submit(W.noop).result(W.CALL_TIMEOUT)

        if only in ("direct", "all"):
            out.append(
                (
                    # (the pool has one way to wait: both rows of jupyter_ext's compare to it)
                    ("apply_p50_ms", "apply_p90_ms", "apply_p99_ms", "apply_get_p50_ms"),
                    lambda: W._latencies_ms(roundtrip, s["apply_calls"], s["apply_warmup"]),
                )
            )
            out.append((W.transfer_keys(s["transfer_sizes"]), lambda: self._transfers(s)))
        if only in ("lb", "all"):
            out += [
                (
                    ("lb_apply_p50_ms",),
                    lambda: W._latencies_ms(roundtrip, s["lb_apply_calls"], 30),
                ),
                (("lb_map_tps",), lambda: self._map_rate(s["lb_map_n"])),
            ]
        return out

    def _map_rate(self, n: int) -> float:
        assert self.ex is not None
        list(self.ex.map(W.noop1, range(20), chunksize=1))
        t0 = time.perf_counter()
        res = list(self.ex.map(W.noop1, range(n), chunksize=1))
        dt = time.perf_counter() - t0
        if len(res) != n or res[-1] != n - 1:
            raise AssertionError(f"map returned {len(res)} results")
        return n / dt

    def _transfers(self, s: dict[str, Any]) -> dict[str, float]:
        # one worker, so that the array kept for pulls is where the pull runs
        one = self.one = ProcessPoolExecutor(1)
        one.submit(W.noop).result(W.CALL_TIMEOUT)

        def keep(arr: np.ndarray) -> None:
            one.submit(_keep, arr.nbytes // 2**20).result(W.CALL_TIMEOUT)

        try:
            return W.transfers(
                lambda a: one.submit(_nbytes, a).result(120),
                lambda: one.submit(_kept).result(120),
                keep,
                s["transfer_sizes"],
                s["transfer_reps"],
            )
        finally:
            one.shutdown()
            self.one = None

    def stop(self) -> None:
        for ex in (self.ex, self.one):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        self.ex = self.one = None


# ------------------------------------------------------------------------------ raw pyzmq


def _echo_server(port_to: Any) -> None:
    """A ROUTER on a port of its own choosing, sent through the pipe ``port_to``: ``e``
    echoes what follows; ``k`` keeps its frame (replies ``ok``); ``g`` sends the kept
    frame; ``q`` quits."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.sndhwm = sock.rcvhwm = 0
    port_to.send(sock.bind_to_random_port("tcp://127.0.0.1"))
    port_to.close()
    kept: Any = b""
    while True:
        ident, cmd, *rest = sock.recv_multipart(copy=False)
        op = cmd.bytes
        if op == b"e":
            sock.send_multipart([ident, *rest], copy=False)
        elif op == b"k":
            kept = rest[0]
            sock.send_multipart([ident, b"ok"])
        elif op == b"g":
            sock.send_multipart([ident, kept], copy=False)
        else:
            sock.send_multipart([ident, b"bye"])
            break
    sock.close(linger=1000)
    ctx.term()


class ZmqTool:
    """Two processes and a DEALER/ROUTER pair over ``tcp://127.0.0.1``: the round trip,
    the pipelined rate and bulk transfers with nothing on top."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.ctx: zmq.Context[Any] | None = None
        self.sock: Any = None
        self.setup_s = 0.0

    def load(self) -> None:
        pass

    def module(self) -> Any:
        return zmq

    def start(self, n: int, workdir: str) -> float:
        t0 = time.perf_counter()
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.sndhwm = sock.rcvhwm = 0
        sock.linger = 0
        # (the server binds a port itself and says which: a port found free here and
        # let go could be taken before it binds, and zmq lets go of a port a little later)
        fork = multiprocessing.get_context("fork")
        port_from, port_to = fork.Pipe(duplex=False)
        self.proc = fork.Process(target=_echo_server, args=(port_to,), daemon=True)
        self.proc.start()
        port_to.close()
        if not port_from.poll(W.CALL_TIMEOUT):
            raise RuntimeError("the echo server did not start")
        sock.connect(f"tcp://127.0.0.1:{port_from.recv()}")
        port_from.close()
        sock.rcvtimeo = int(W.CALL_TIMEOUT * 1000)
        self.sock = sock
        self.call(b"e", b"hello")
        return time.perf_counter() - t0

    def call(self, *frames: Any) -> list[Any]:
        self.sock.send_multipart(frames, copy=False)
        return list(self.sock.recv_multipart(copy=False))

    def setup(self, notes: list[str]) -> bool:
        return True

    def workloads(
        self, only: str, s: dict[str, Any], ctx: Any
    ) -> list[tuple[tuple[str, ...], Any]]:
        out: list[tuple[tuple[str, ...], Any]] = []
        if only in ("direct", "all"):
            out.append(
                (
                    ("apply_p50_ms", "apply_p90_ms", "apply_p99_ms"),
                    lambda: W._latencies_ms(
                        lambda: self.call(b"e", b"x"), s["apply_calls"], s["apply_warmup"]
                    ),
                )
            )
            out.append((W.transfer_keys(s["transfer_sizes"]), lambda: self._transfers(s)))
        if only in ("lb", "all"):
            out.append((("lb_map_tps",), lambda: self._pipelined(max(s["lb_map_n"], 20_000))))
        return out

    def _pipelined(self, n: int) -> float:
        """``n`` small messages sent, then ``n`` replies received: messages/s."""
        sock = self.sock
        t0 = time.perf_counter()
        for i in range(n):
            sock.send_multipart([b"e", b"%d" % i])
        for _ in range(n):
            sock.recv_multipart()
        return n / (time.perf_counter() - t0)

    def _transfers(self, s: dict[str, Any]) -> dict[str, float]:
        def push(arr: np.ndarray) -> None:
            self.call(b"k", arr)

        def pull() -> np.ndarray:
            frame = self.call(b"g")[0]
            return np.frombuffer(frame.buffer, dtype=np.float64)

        return W.transfers(
            push, pull, lambda a: self.call(b"k", a), s["transfer_sizes"], s["transfer_reps"]
        )

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.send_multipart([b"q"])
            except zmq.ZMQError:
                pass
            self.sock.close(linger=0)
            self.sock = None
        if self.proc is not None:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self.proc = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
