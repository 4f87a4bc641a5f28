"""``rc.dashboard()``: the cluster at work, live in a notebook, plain ipywidgets.

What it shows comes from the controller's status stream
(:mod:`kernel_engine.controller.monitor`): the engines (state, current task, queue, tasks
done and failed, CPU, memory), the tasks' counts and a sparkline of the last minute's
throughput, and the latest errors, each with its traceback a click away. The same view is
the rich display of a :class:`~jupyter_ext.Client` and a :class:`~jupyter_ext.Cluster`.

It is three ``ipywidgets.HTML`` in a ``VBox`` (no front-end code beyond ipywidgets', so
it works wherever a notebook shows widgets), filled by the HTML renderers below; the
same renderers give the static snapshot shown where widgets cannot be (``text/html``;
``text/plain`` is ``jupyter px top``'s table). Every display of it carries that snapshot
beside the widget's view, so a front end without the widget's state (nbconvert, a saved
notebook reopened) shows the state, never an empty box.

Who runs what: no thread of its own. The client's IO thread receives the status and
updates the widgets (ipykernel's iopub takes sends from any thread); the client
subscribes to the stream only while a dashboard follows it, and the controller publishes
it only while someone subscribes. A dashboard follows the stream only while a front end
may show it (:class:`Attention`). It starts when it is displayed in a notebook kernel (a
front end counts its view only once the cells queued behind that one have run: a
notebook run at once must see it live), and stops when no view was counted after
:data:`FIRST_VIEW` seconds with no cell running (nbclient, nbconvert, a tab that never
opened; never started in a terminal), when its output is cleared (no view left), its
widget is closed, :meth:`Dashboard.close` is called or its client closes, or when no
front end gave a sign (a view shown, a cell run) for :data:`LEASE` seconds while no cell
ran (a browser tab closed says nothing). A view counted again starts it again. A
dashboard displayed but never viewed also refreshes its snapshot after each cell (one
status request per cell, on the shell thread), so a notebook executed headless saves the
latest state. One that stopped for good replaces its displays with the static snapshot
of its final state.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

from kernel_engine.top import (
    format_bytes,
    format_cpu,
    format_since,
    render_text,
    summary_lines,
    task_text,
)

if TYPE_CHECKING:
    from ._transport import Transport

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

STATE_COLORS = {
    "idle": "#9e9e9e",
    "busy": "#2e7d32",
    "starting": "#ef6c00",
    "restarting": "#ef6c00",
    "stopping": "#757575",
    "dead": "#c62828",
}

log = logging.getLogger("jupyter_ext")

LEASE = 600.0
"""Seconds a dashboard follows the stream with no sign of a front end (see
:class:`Attention`)."""

FETCH_TIMEOUT = 2.0
"""Seconds a status request made on the shell thread waits (a cell waits for it)."""

FETCH_BACKOFF = 30.0
"""Seconds a dashboard does not ask again a controller that did not answer."""

FIRST_VIEW = 5.0
"""Seconds without a cell running that a dashboard displayed in a notebook kernel follows
the stream before a front end counts a view of it (see :class:`Attention`)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BOX = "font-family:var(--jp-ui-font-family,sans-serif);font-size:12px;line-height:1.4"
_CELL = "padding:2px 8px;text-align:left;border-bottom:1px solid #e0e0e0;white-space:nowrap"


def sparkline_svg(history: Any, width: int = 240, height: int = 36) -> str:
    """Counts per second as an inline SVG area chart (newest on the right)."""
    values = [v if isinstance(v, (int, float)) else 0 for v in (history or [])]
    if not values:
        values = [0]
    top = max(values) or 1
    step = width / max(1, len(values) - 1)
    points = [
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    ]
    area = f"0,{height} " + " ".join(points) + f" {width},{height}"
    return (
        f"<svg class='px-sparkline' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='tasks per second, last minute'>"
        f"<polygon points='{area}' fill='#c8e6c9'/>"
        f"<polyline points='{' '.join(points)}' fill='none' stroke='#2e7d32' stroke-width='1.5'/>"
        "</svg>"
    )


def _bar(fraction: float, color: str, label: str) -> str:
    width = max(0.0, min(1.0, fraction)) * 100
    return (
        "<div style='display:flex;align-items:center;gap:6px'>"
        "<div style='width:60px;height:8px;background:#eee;border-radius:2px'>"
        f"<div style='width:{width:.0f}%;height:8px;background:{color};border-radius:2px'>"
        f"</div></div><span>{escape(label)}</span></div>"
    )


def summary_html(status: dict[str, Any], title: str = "", note: str = "") -> str:
    """The cluster's counts, and the last minute's throughput as a sparkline (``note``:
    a line on the dashboard's own state, such as its updates paused)."""
    cluster = status.get("cluster") or {}
    first, second = summary_lines(status)
    heading = f"<b>{escape(title)}</b> " if title else ""
    noted = f"<br><span class='px-note' style='color:#757575'>{escape(note)}</span>" if note else ""
    return (
        f"<div class='px-summary' style='{_BOX};display:flex;gap:16px;align-items:center'>"
        f"<div>{heading}<span class='px-cluster-line' style='font-weight:600'>{escape(first)}"
        "</span><br>"
        f"<span class='px-tasks-line'>{escape(second)}</span>{noted}</div>"
        f"{sparkline_svg(cluster.get('history'))}</div>"
    )


def engines_html(status: dict[str, Any], now: float | None = None) -> str:
    """One row per engine: state, current task (and for how long), queue, done, failed,
    CPU and memory."""
    now = time.time() if now is None else now
    rows = status.get("engines") or []
    top_queue = max([r.get("queue", 0) for r in rows if isinstance(r.get("queue"), int)] or [0])
    head = ["engine", "state", "task", "for", "queue", "done", "failed", "cpu", "memory", "host"]
    parts = [
        f"<table class='px-engines' style='{_BOX};border-collapse:collapse;margin:4px 0'><tr>",
        *(f"<th style='{_CELL}'>{h}</th>" for h in head),
        "</tr>",
    ]
    for row in rows:
        state = str(row.get("state", "?"))
        color = STATE_COLORS.get(state, "#9e9e9e")
        task = row.get("task")
        since = task.get("since") if isinstance(task, dict) else None
        queue = row.get("queue", 0) if isinstance(row.get("queue"), int) else 0
        cpu = row.get("cpu")
        cpu_part = cpu / 100 if isinstance(cpu, (int, float)) else 0.0
        title = escape(str(row.get("reason") or ""), quote=True)
        badge = (
            f"<span class='px-state' title='{title}' style='color:#fff;background:{color};"
            f"border-radius:3px;padding:0 6px'>{escape(state)}</span>"
        )
        cells = [
            escape(str(row.get("id", "?"))),
            badge,
            f"<span class='px-task'>{escape(task_text(row)[:60])}</span>",
            escape(format_since(since, now)),
            _bar(queue / top_queue if top_queue else 0.0, "#1565c0", str(queue)),
            f"<span class='px-done'>{escape(str(row.get('done', 0)))}</span>",
            f"<span class='px-failed'>{escape(str(row.get('failed', 0)))}</span>",
            _bar(cpu_part, "#6a1b9a", format_cpu(cpu)),
            escape(format_bytes(row.get("rss"))),
            escape(str(row.get("host") or "")),
        ]
        parts.append(
            f"<tr class='px-engine' data-engine='{escape(str(row.get('id')), quote=True)}' "
            f"data-state='{escape(state, quote=True)}'>"
        )
        parts += [f"<td style='{_CELL}'>{c}</td>" for c in cells]
        parts.append("</tr>")
    parts.append("</table>")
    return "".join(parts)


def errors_html(status: dict[str, Any]) -> str:
    """The latest errors, newest first, each a ``<details>`` whose body is the traceback."""
    errors = status.get("errors") or []
    if not errors:
        return f"<div class='px-errors' style='{_BOX};color:#757575'>no errors</div>"
    parts = [f"<div class='px-errors' style='{_BOX}'><b>latest errors</b>"]
    for err in errors:
        eid = err.get("engine_id")
        where = f"engine {eid}" if eid is not None else "controller"
        evalue = str(err.get("evalue", "")).splitlines()[:1]
        summary = f"{where} · {err.get('ename', 'error')}: {''.join(evalue)[:200]}"
        traceback = "\n".join(_ANSI.sub("", str(line)) for line in err.get("traceback") or [])
        parts.append(
            f"<details class='px-error' data-engine='{escape(str(eid), quote=True)}'>"
            f"<summary style='cursor:pointer;color:#c62828'>{escape(summary)}</summary>"
            f"<pre style='font-size:11px;background:#fafafa;padding:4px;max-height:20em;"
            f"overflow:auto'>{escape(traceback or '(no traceback)')}</pre></details>"
        )
    parts.append("</div>")
    return "".join(parts)


def status_html(status: dict[str, Any], title: str = "", now: float | None = None) -> str:
    """The whole dashboard as static HTML (what the live one shows, at this moment)."""
    return (
        f"<div class='px-dashboard'>{summary_html(status, title)}"
        f"{engines_html(status, now)}{errors_html(status)}</div>"
    )


def _in_kernel() -> bool:
    """Whether this runs in a notebook kernel (where widgets can show)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Attention:
    """Whether a front end looks at a display: pure bookkeeping, times given.

    Front ends running ipywidgets (JupyterLab, Notebook 7, VS Code, Colab) count the views
    of a widget whose ``_view_count`` is an integer: one shown is a sign that someone
    looks, and so is a cell run in the kernel (a front end sent it). A browser tab closed
    takes its views with it without saying so: after :attr:`lease` seconds with no sign,
    and no cell running, the display counts as unseen (:meth:`lapsed`).

    The count of a view comes on the kernel's shell channel, behind the cells queued
    before it (a notebook run at once): a display is followed from the moment it is shown
    (``expect_view``), and lapses after :attr:`first_view` seconds with no cell running
    and still no view counted (nbclient, nbconvert, a tab that never opened).
    """

    def __init__(self, lease: float, first_view: float = FIRST_VIEW):
        self.lease = lease
        self.first_view = first_view
        self.views = 0
        self.seen = False  # (a view was ever counted)
        self.expect_view = False
        self.running = False  # (a cell runs: a front end waits for it)
        self.acked = float("-inf")

    def shown(self, views: int, now: float) -> None:
        """The front end counts ``views`` views now."""
        self.views = max(0, views)
        self.seen = self.seen or views > 0
        self.acked = now

    def cell(self, running: bool, now: float) -> None:
        """A cell starts (``running``) or ends."""
        self.running = running
        self.acked = now

    def touch(self, now: float) -> None:
        """A sign of a front end other than the above (asked to follow by hand)."""
        self.acked = now

    def lapsed(self, now: float) -> bool:
        """No sign of a front end for :attr:`lease` seconds (for :attr:`first_view`
        seconds, while a view is expected and none was counted yet), and no cell
        running."""
        limit = self.first_view if self.expect_view and not self.seen else self.lease
        return not self.running and now - self.acked >= limit


class _Cells:
    """The notebook kernel's cell runs, told to the displayed dashboards (IPython's
    ``pre_run_cell``/``post_run_cell`` events, on the shell thread; registered once per
    shell, the dashboards weakly held)."""

    def __init__(self, shell: Any):
        self.dashboards: weakref.WeakSet[Dashboard] = weakref.WeakSet()
        shell.events.register("pre_run_cell", self.pre)
        shell.events.register("post_run_cell", self.post)

    def pre(self, info: Any = None) -> None:
        for dashboard in list(self.dashboards):
            dashboard._cell(True)

    def post(self, result: Any = None) -> None:
        for dashboard in list(self.dashboards):
            dashboard._cell(False)
            if dashboard.closed:
                self.dashboards.discard(dashboard)


_cells: dict[int, _Cells] = {}


def _watch_cells(dashboard: Dashboard) -> None:
    """Tell ``dashboard`` of the cells the notebook kernel runs from now on."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    cells = _cells.get(id(shell))
    if cells is None:
        cells = _cells[id(shell)] = _Cells(shell)
    cells.dashboards.add(dashboard)


class Dashboard:
    """A live view of a cluster: see the module docstring.

    ``Dashboard(transport, title="", lease=LEASE)``; ``rc.dashboard()`` makes one. Shown
    like any widget (as a cell's value, or with ``display``); ``status`` is the latest
    snapshot; :meth:`refresh` asks the controller for one now; :meth:`start` follows the
    stream whether or not a view is counted (until :meth:`stop`, or the lease lapses);
    :meth:`close` stops it for good.
    """

    def __init__(self, transport: Transport, title: str = "", lease: float = LEASE):
        self.transport = transport
        self.title = title
        self.status: dict[str, Any] | None = None
        self.updates = 0
        self.active = False
        self.closed = False
        self.paused = False
        """Whether it stopped because no front end showed a sign for ``lease`` seconds
        (a cell run or a view shown starts it again)."""
        self.attention = Attention(lease)
        self._unanswered_until = 0.0  # (monotonic: see _fetch)
        self._display_id = uuid.uuid4().hex
        self._displayed = False
        self._fresh = False  # (displayed by the cell now running)
        self.heading: Callable[[], tuple[str, str]] | None = None
        """(HTML above the view, ``text/plain``) of a display that shows it under its
        owner's summary (the Client's or Cluster's rich display)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._box: Any = None
        self._parts: tuple[Any, Any, Any] | None = None

    @property
    def lease(self) -> float:
        """Seconds it follows the stream with no sign of a front end (see
        :class:`Attention`)."""
        return self.attention.lease

    @lease.setter
    def lease(self, seconds: float) -> None:
        self.attention.lease = seconds

    # ----- the widget

    def widget(self) -> Any:
        """The ``ipywidgets.VBox`` (made on first use); it updates while a front end
        shows it."""
        if self._box is None:
            import ipywidgets

            status = self.status or self._fetch()
            header = ipywidgets.HTML(summary_html(status, self.title))
            engines = ipywidgets.HTML(engines_html(status))
            errors = ipywidgets.HTML(errors_html(status))
            box = ipywidgets.VBox([header, engines, errors])
            box.add_class("jupyter-px-dashboard")
            box._view_count = 0  # (so that the front end counts the views it shows)
            box.observe(self._views, "_view_count")
            box.observe(self._comm_changed, "comm")
            if box.comm is not None:
                box.comm.on_close(self._comm_closed)
            self._parts = (header, engines, errors)
            self._box = box
        return self._box

    def _views(self, change: dict[str, Any]) -> None:
        """The front end shows ``change['new']`` views (shell thread): the first starts
        the updates, none (its output cleared) stops them."""
        count = change.get("new") or 0
        self.attention.shown(count, time.monotonic())
        if count > 0:
            self.start()
        else:
            self.stop()

    def _comm_changed(self, change: dict[str, Any]) -> None:
        if change.get("new") is None:  # (the widget was closed here)
            self.close()

    def _comm_closed(self, msg: Any = None) -> None:
        self.close()  # (the front end closed the widget)

    def _cell(self, running: bool) -> None:
        """A cell of the notebook kernel starts or ends (shell thread)."""
        now = time.monotonic()
        self.attention.cell(running, now)
        if self.closed:
            return
        if self.paused and self.attention.views > 0:
            self.start()
        if not running and self._displayed:
            if self._fresh:
                self._fresh = False  # (the cell that showed it: no view counted yet)
            elif not self.attention.seen:
                self._snapshot_display()

    def _snapshot_display(self) -> None:
        """A display no front end has counted a view of (nbclient, nbconvert, a tab not
        open): its widgets and its static snapshot brought up to date after each cell,
        so that a saved notebook shows the latest state (the stream's latest while it
        follows it, else one short request)."""
        if self.transport.closed:
            return
        self._render(self.status if self.active and self.status else self._fetch())
        try:
            from IPython.display import update_display

            update_display(self.mimebundle(), raw=True, display_id=self._display_id)
        except Exception:
            pass

    def _fetch(self, timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
        """A snapshot from the controller now (shell thread: a short wait). One that does
        not answer is not asked again for :data:`FETCH_BACKOFF` seconds; meanwhile, and
        then, the last status it gave stands (an empty one if none)."""
        if time.monotonic() >= self._unanswered_until:
            try:
                status = self.transport.status(timeout=timeout)
            except Exception as exc:
                self._unanswered_until = time.monotonic() + FETCH_BACKOFF
                log.info("dashboard of cluster %s: %s", self.transport.cluster_id, exc)
            else:
                self._take(status)
                return status
        empty = {"cluster_id": self.transport.cluster_id, "engines": []}
        return self.status or empty

    def _take(self, status: dict[str, Any]) -> None:
        with self._lock:
            self.status = status
            self.updates += 1
            self._changed.notify_all()

    def _on_status(self, status: dict[str, Any]) -> None:
        """A status from the stream (IO thread): keep it, update the widgets; stop once
        no front end showed a sign for the lease."""
        with self._lock:
            if not self.active:
                return
            lapsed = self.attention.lapsed(time.monotonic())
            if lapsed:
                self.active, self.paused = False, True
        if lapsed:
            self.transport.remove_status_handler(self._on_status)
        self._take(status)
        self._render(status)

    def _note(self) -> str:
        if self.closed:
            return "final state (closed)"
        if self.paused and not self.attention.seen:
            return "updates paused: no front end counted a view of it"
        if self.paused:
            return (
                f"updates paused: no sign of a front end for {self.lease:g} s "
                "(they resume when a cell runs or the view is shown again)"
            )
        return ""

    def _render(self, status: dict[str, Any]) -> None:
        if self._parts is None:
            return
        header, engines, errors = self._parts
        header.value = summary_html(status, self.title, self._note())
        engines.value = engines_html(status)
        errors.value = errors_html(status)

    # ----- life

    def start(self) -> None:
        """Follow the status stream (the client subscribes; idempotent)."""
        with self._lock:
            self.attention.touch(time.monotonic())
            self.paused = False
            if self.active or self.closed or self.transport.closed:
                return
            self.active = True
        self.transport.add_status_handler(self._on_status)

    def stop(self) -> None:
        """Stop following the stream (the display keeps its last state)."""
        with self._lock:
            if not self.active:
                return
            self.active = False
        self.transport.remove_status_handler(self._on_status)

    def close(self, fetch: bool = True) -> None:
        """Stop for good; displays of it become the static snapshot of its final state
        (asked of the controller, unless ``fetch`` is False: the caller gave it)."""
        if self.closed:
            return
        self.stop()
        self.closed = True
        shown = self._parts is not None or self._displayed
        if fetch and shown and not self.transport.closed:
            self._fetch()  # (its final state)
        self._unanswered_until = float("inf")  # (closed: never asks again)
        if self._parts is not None and self.status is not None:
            self._render(self.status)
        if self._displayed:
            try:
                from IPython.display import update_display

                update_display(self._static_bundle(), raw=True, display_id=self._display_id)
            except Exception:
                pass

    def refresh(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Ask the controller for the status now (it counts everything this client sent
        before), show it and return it."""
        status = self.transport.status(timeout=timeout)
        self._take(status)
        self._render(status)
        return status

    def wait_update(self, after: int, timeout: float | None = None) -> bool:
        """Wait until more than ``after`` updates arrived (see :attr:`updates`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.updates <= after:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # ----- display

    def _static_bundle(self) -> dict[str, Any]:
        if self.status is None and not self.transport.closed:
            self._fetch()  # (once: a controller that did not answer is not asked again)
        status = self.status or {}
        bundle = {
            "text/plain": render_text(status) if status else repr(self),
            "text/html": status_html(status, self.title) if status else escape(repr(self)),
        }
        if self.heading is not None:
            html, plain = self.heading()
            bundle = {
                "text/plain": f"{plain}\n{bundle['text/plain']}",
                "text/html": html + bundle["text/html"],
            }
        return bundle

    def mimebundle(self) -> dict[str, Any]:
        """What a display of it holds: the widget's view (in a notebook kernel, while not
        closed) beside the static snapshot (HTML and text) for front ends without
        widgets. The updates start only once a front end counts a view of it."""
        if self.closed or not _in_kernel():
            return self._static_bundle()
        box = self.widget()
        bundle = self._static_bundle()
        bundle[WIDGET_VIEW] = {"version_major": 2, "version_minor": 0, "model_id": box.model_id}
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        bundle = self.mimebundle()
        if WIDGET_VIEW in bundle:
            display(bundle, raw=True, display_id=self._display_id)
            if not self._displayed:
                _watch_cells(self)
            self._displayed = True
            self._fresh = True
            if not self.attention.seen:
                # (a front end counts its view only once the cells queued behind this
                # one ran: it follows from now, while cells run and for FIRST_VIEW s)
                self.attention.expect_view = True
                self.start()
        else:
            display(bundle, raw=True)

    def _repr_html_(self) -> str:
        return str(self._static_bundle()["text/html"])

    def __repr__(self) -> str:
        state = "live" if self.active else "paused" if self.paused else "not followed"
        state = "closed" if self.closed else state
        return f"<Dashboard of cluster {self.transport.cluster_id} ({state})>"


class Dashboards:
    """The dashboards of one client, closed with it (weakly held: a dashboard nobody
    keeps or shows is simply collected)."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self._all: weakref.WeakSet[Dashboard] = weakref.WeakSet()
        self._own: Dashboard | None = None

    def new(self, title: str = "") -> Dashboard:
        dashboard = Dashboard(self.transport, title)
        self._all.add(dashboard)
        return dashboard

    def own(self) -> Dashboard:
        """The one dashboard of the client's (and its cluster's) rich display."""
        if self._own is None or self._own.closed:
            self._own = self.new()
        return self._own

    def close(self) -> None:
        """Close every dashboard, their final state asked of the controller once."""
        dashboards = [d for d in list(self._all) if not d.closed]
        shown = [d for d in dashboards if d._parts is not None or d._displayed]
        if shown and not self.transport.closed:
            shown[0]._fetch()
            if shown[0].status is not None:
                for dashboard in shown[1:]:
                    dashboard._take(shown[0].status)
        for dashboard in dashboards:
            dashboard.close(fetch=False)
