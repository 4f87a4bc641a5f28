"""``jupyter px top``: a cluster's engines in the terminal, live or once.

Reads the controller's status (see :mod:`kernel_engine.controller.monitor`) with the
cluster's connection file. ``--once`` subscribes for a moment, until a snapshot has every
engine's own report (CPU, memory: engines report only while someone subscribes), and
prints it (or the answer to one ``px_status_request`` if none comes). Otherwise it
subscribes to the status stream and redraws the table in place as snapshots come (at
most every ``--interval`` seconds), until Ctrl-C or the controller's end. The text
rendering here is also what notebooks show where widgets cannot be
(``jupyter_ext._dashboard``), so the two never disagree.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, TextIO

import zmq

from kernel_engine import clusters, processes, protocol, wire
from kernel_engine.errors import short_id

SPARKS = " ▁▂▃▄▅▆▇█"
REPORT_WAIT = 4 * protocol.ENGINE_REPORT_EVERY
"""Seconds ``--once`` waits for every engine's report."""

COLUMNS = ("engine", "state", "task", "for", "queue", "done", "failed", "cpu", "memory", "host")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` without control characters (each one ``?``): what a task names itself or
    its error (a label, an exception's name or message) must not drive the terminal."""
    return _CONTROL.sub("?", text)


def format_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # (not reached)


def format_cpu(cpu: Any) -> str:
    if not isinstance(cpu, (int, float)) or isinstance(cpu, bool):
        return "-"
    return f"{cpu:.0f}%"


def format_since(since: Any, now: float) -> str:
    """How long ago ``since`` (a Unix time) was: ``3.2s``, ``4m05s``, ``2h10m``."""
    if not isinstance(since, (int, float)) or isinstance(since, bool):
        return ""
    span = max(0.0, now - since)
    if span < 60:
        return f"{span:.1f}s"
    if span < 3600:
        return f"{int(span // 60)}m{int(span % 60):02d}s"
    return f"{int(span // 3600)}h{int(span % 3600 // 60):02d}m"


def task_text(row: dict[str, Any]) -> str:
    """An engine's current task, as a person reads it (``f (1a2b3c4d)``)."""
    task = row.get("task")
    if isinstance(task, dict):
        name = str(task.get("name") or "task")
        return f"{name} ({short_id(task.get('msg_id', ''))})"
    if row.get("state") == "dead":
        return str(row.get("reason") or "")
    return ""


def sparkline(history: Any) -> str:
    """Counts as a line of block characters, scaled to the largest."""
    if not isinstance(history, list) or not history:
        return ""
    values = [v if isinstance(v, (int, float)) else 0 for v in history]
    top = max(values) or 1
    return "".join(SPARKS[round(v / top * (len(SPARKS) - 1))] for v in values)


def summary_lines(status: dict[str, Any]) -> list[str]:
    """The cluster's line and the tasks' line."""
    c = status.get("cluster") or {}
    engines = f"{c.get('engines', 0)} engines ({c.get('busy', 0)} busy"
    engines += f", {c.get('dead', 0)} dead)" if c.get("dead") else ")"
    rate = c.get("throughput", 0.0)
    return [
        f"cluster {status.get('cluster_id', '')} · {engines} · "
        f"{rate:.1f} tasks/s over the last minute",
        f"tasks: {c.get('submitted', 0)} submitted, {c.get('queued', 0)} queued, "
        f"{c.get('running', 0)} on engines, {c.get('done', 0)} done, "
        f"{c.get('failed', 0)} failed",
    ]


def engine_cells(row: dict[str, Any], now: float) -> list[str]:
    task = row.get("task")
    since = task.get("since") if isinstance(task, dict) else None
    return [
        str(row.get("id", "?")),
        str(row.get("state", "?")),
        task_text(row),
        format_since(since, now),
        str(row.get("queue", 0)),
        str(row.get("done", 0)),
        str(row.get("failed", 0)),
        format_cpu(row.get("cpu")),
        format_bytes(row.get("rss")),
        str(row.get("host") or ""),
    ]


def render_text(status: dict[str, Any], width: int = 120, now: float | None = None) -> str:
    """A status snapshot as plain text: summary, throughput, one line per engine, the
    latest errors. Lines are cut at ``width`` characters."""
    now = time.time() if now is None else now
    lines = summary_lines(status)
    history = (status.get("cluster") or {}).get("history")
    if history:
        lines.append(f"last minute: {sparkline(history)}")
    rows = [list(COLUMNS)] + [
        [printable(cell) for cell in engine_cells(r, now)] for r in status.get("engines") or []
    ]
    task_col = COLUMNS.index("task")
    for row in rows:
        row[task_col] = row[task_col][:40]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lost = [r for r in status.get("engines") or [] if r.get("state") == "dead" and r.get("reason")]
    if lost:
        lines += ["", "engines lost:"]
        lines += [f"  {str(r['reason']).splitlines()[0]}" for r in lost[-5:]]
    errors = status.get("errors") or []
    if errors:
        lines += ["", "latest errors:"]
        for err in errors[:5]:
            where = err.get("engine_id")
            place = f"engine {where}" if where is not None else "controller"
            value = str(err.get("evalue", "")).splitlines()[:1]
            lines.append(f"  {place}: {err.get('ename', 'error')}: {''.join(value)}")
    return "\n".join(printable(line)[:width] for line in lines)


# ----- reading the status


def _socket(context: zmq.Context[Any], kind: int, info: dict[str, Any]) -> zmq.Socket[Any]:
    sock = context.socket(kind)
    sock.linger = 0
    server = info.get("curve_serverkey")
    if server:
        wire.curve_client(sock, str(server).encode())
    return sock


def _url(info: dict[str, Any], port_key: str) -> str:
    return f"{info.get('transport', 'tcp')}://{info['ip']}:{info[port_key]}"


def fetch_status(info: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One snapshot from the controller of connection info ``info`` (TimeoutError if it
    does not answer within ``timeout`` s)."""
    signer = wire.Wire(str(info["key"]).encode(), username="top")
    context: zmq.Context[Any] = zmq.Context()
    try:
        sock = _socket(context, zmq.DEALER, info)
        sock.connect(_url(info, "client_port"))
        header = signer.send(sock, protocol.STATUS_REQUEST, {}, idents=[protocol.HUB_ROUTE])
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"the controller did not answer within {timeout} s")
            msg = signer.recv(sock.recv_multipart())
            if msg.parent_header.get("msg_id") != header["msg_id"]:
                continue
            content = msg.content
            if content.get("status") == "error":
                raise RuntimeError(f"{content.get('ename')}: {content.get('evalue')}")
            return content
    finally:
        context.destroy(linger=0)


def stream_status(
    info: dict[str, Any], poll: float = 0.5
) -> Generator[dict[str, Any] | None, None, None]:
    """Snapshots as the controller publishes them; None every ``poll`` s without one (so
    the caller can check on the controller). Subscribing is what makes the controller
    publish; closing the iterator unsubscribes."""
    signer = wire.Wire(str(info["key"]).encode(), username="top")
    context: zmq.Context[Any] = zmq.Context()
    try:
        sock = _socket(context, zmq.SUB, info)
        sock.setsockopt(zmq.SUBSCRIBE, protocol.STATUS_TOPIC)
        sock.connect(_url(info, "iopub_port"))
        while True:
            if not sock.poll(int(poll * 1000)):
                yield None
                continue
            frames = sock.recv_multipart()
            try:
                msg = signer.recv(frames)
            except wire.MessageError:
                continue  # (not signed with the cluster's key: not from its controller)
            if msg.msg_type == protocol.CLUSTER_STATUS:
                yield msg.content
    finally:
        context.destroy(linger=0)


def reported_status(info: dict[str, Any], wait: float = REPORT_WAIT) -> dict[str, Any]:
    """One snapshot with every engine's own report (CPU, memory) in it, if one comes within
    ``wait`` s: engines report only while someone subscribes, so this subscribes; else the
    controller's answer to one request (TimeoutError if it gives none)."""
    deadline = time.monotonic() + wait
    stream = stream_status(info, poll=0.1)
    try:
        for status in stream:
            if status is not None and all(
                row.get("cpu") is not None
                for row in status.get("engines", [])
                if row.get("state") in ("idle", "busy")  # (the others report nothing)
            ):
                return status
            if time.monotonic() >= deadline:
                break
    finally:
        stream.close()
    return fetch_status(info)


def read_info(cluster_id: str | None) -> dict[str, Any]:
    """The client connection info of cluster ``cluster_id`` (None: the newest running)."""
    path = clusters.find_connection_file(cluster_id)
    info: dict[str, Any] = json.loads(Path(path).read_text())
    return info


def top(
    cluster_id: str | None = None,
    once: bool = False,
    interval: float = 1.0,
    out: TextIO | None = None,
    width: int | None = None,
) -> int:
    """Print the cluster's engines once (``once``), or redraw them every ``interval`` s
    until Ctrl-C or the controller's end; returns an exit code."""
    out = sys.stdout if out is None else out
    info = read_info(cluster_id)
    if width is None:
        import shutil

        width = shutil.get_terminal_size((120, 40)).columns
    if once:
        out.write(render_text(reported_status(info), width) + "\n")
        out.flush()
        return 0
    tty = out.isatty()
    pid = int(info.get("controller_pid") or 0)
    local = info.get("ip") in protocol.LOCAL_IPS
    shown = float("-inf")
    latest: dict[str, Any] | None = None
    try:
        for status in stream_status(info):
            if status is not None:
                latest = status
            elif local and pid and not processes.running(pid):
                out.write(f"\nthe controller (pid {pid}) is gone\n")
                return 0
            if latest is None or time.monotonic() - shown < interval:
                continue
            shown = time.monotonic()
            text = render_text(latest, width)
            out.write(("\x1b[H\x1b[2J" + text + "\n") if tty else (text + "\n\n"))
            out.flush()
            latest = None
    except KeyboardInterrupt:
        pass
    return 0
