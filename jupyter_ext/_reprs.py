"""HTML summaries of clusters, clients, views and results for notebooks."""

from __future__ import annotations

from collections import Counter
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._asyncresult import AsyncResult
    from ._client import Client
    from ._cluster import Cluster
    from ._views import View

_STYLE = "border-collapse:collapse;font-size:12px;margin:2px 0"
_CELL = "padding:1px 8px;text-align:left;border-bottom:1px solid #ddd"


def table(
    title: str,
    rows: list[tuple[str, Any]],
    grid: list[list[Any]] | None = None,
    header: list[str] | None = None,
) -> str:
    """A titled key/value table, optionally followed by a grid (one row per engine)."""
    parts = [f"<div><b>{escape(title)}</b>", f"<table style='{_STYLE}'>"]
    for key, value in rows:
        parts.append(
            f"<tr><th style='{_CELL}'>{escape(key)}</th><td style='{_CELL}'>"
            f"{escape(str(value))}</td></tr>"
        )
    parts.append("</table>")
    if grid:
        parts.append(f"<table style='{_STYLE}'><tr>")
        parts += [f"<th style='{_CELL}'>{escape(h)}</th>" for h in header or []]
        parts.append("</tr>")
        for row in grid:
            cells = "".join(f"<td style='{_CELL}'>{escape(str(c))}</td>" for c in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


def engines_grid(client: Client) -> list[list[Any]]:
    """One row per engine: id, pid, host, and this client's unfinished requests there."""
    waiting = Counter(
        client.metadata[m]["engine_id"] for m in list(client.outstanding) if m in client.metadata
    )
    return [
        [eid, info.get("pid"), info.get("hostname"), waiting.get(eid, 0)]
        for eid, info in sorted(client.transport.engines.items())
    ]


ENGINE_HEADER = ["engine", "pid", "host", "waiting here"]


def client_html(client: Client) -> str:
    rows = [
        ("cluster", client.cluster_id),
        ("engines", len(client.ids)),
        ("outstanding", len(client.outstanding)),
        ("submitted", len(client.history)),
    ]
    dead = client.transport.dead
    if dead:
        rows.append(("engines lost", ", ".join(f"{k}: {v}" for k, v in dead.items())))
    return table("jupyter_ext.Client", rows, engines_grid(client), ENGINE_HEADER)


def cluster_html(cluster: Cluster) -> str:
    rows = [
        ("cluster", cluster.cluster_id),
        ("state", "running" if cluster.running else "stopped"),
        ("engines requested", cluster.n),
        ("controller pid", cluster.controller_pid or "-"),
        ("connection file", cluster.connection_file),
    ]
    client = cluster._client
    grid = engines_grid(client) if client is not None and not client.transport.closed else None
    return table("jupyter_ext.Cluster", rows, grid, ENGINE_HEADER)


def view_html(view: View) -> str:
    rows = [("targets", view.targets if view.targets is not None else "all (load-balanced)")]
    rows += [(name, getattr(view, name)) for name in view._flag_names if name != "targets"]
    rows.append(("submitted through this view", len(view.history)))
    return table(type(view).__name__, rows)


def result_html(ar: AsyncResult) -> str:
    if ar.done():
        exc = None if ar.cancelled() else ar.exception()
        state = "cancelled" if ar.cancelled() else ("error" if exc is not None else "done")
    else:
        state = "pending"
    rows = [
        ("function", ar._fname),
        ("state", state),
        ("progress", f"{ar.progress}/{ar._total()}"),
        ("elapsed", f"{ar.elapsed:.3f} s"),
    ]
    if ar.done() and state == "done":
        rows += [("wall time", f"{ar.wall_time:.3f} s"), ("serial time", f"{ar.serial_time:.3f} s")]
    engines = Counter(md["engine_id"] for md in ar._metadata_list() if md["engine_id"] is not None)
    if engines:
        rows.append(("engines", ", ".join(f"{e} ({n})" for e, n in sorted(engines.items()))))
    if state == "error":
        rows.append(("error", repr(ar.exception())))
    return table(type(ar).__name__, rows)
