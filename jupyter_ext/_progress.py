"""Progress while waiting: an ipywidgets bar in a notebook, a text bar elsewhere (and,
with ``per_engine=True``, a bar per engine: :mod:`._engine_progress`).

Switched off for one call with ``wait_interactive(show=False)``, or for the whole process
with the environment variable ``JUPYTER_PX_PROGRESS=off``; waiting is the same either way.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def progress_enabled() -> bool:
    """False when ``JUPYTER_PX_PROGRESS`` is ``off`` (or 0, false, no)."""
    return os.environ.get("JUPYTER_PX_PROGRESS", "").strip().lower() not in (
        "off",
        "0",
        "false",
        "no",
    )


def _in_notebook() -> bool:
    """Whether we run in a kernel whose frontend can show widgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def write_text_bar(label: str, done: int, total: int, text: str) -> None:
    """Redraw a progress line in place on stdout (where no widget can be shown)."""
    width = 30
    filled = int(width * done / max(total, 1))
    prefix = f"{label}: " if label else ""
    sys.stdout.write(f"\r{prefix}[{'#' * filled}{'.' * (width - filled)}] {text}")
    sys.stdout.flush()


def outcome(success: bool, interrupted: bool = False, ended: bool = True) -> str:
    """The word a display ends on (``ended``: the wait saw the end, not a timeout)."""
    if interrupted:
        return "interrupted"
    if not ended:
        return "not finished"
    return "done" if success else "failed"


def bar_html(label: str, done: int, total: int, text: str, color: str) -> str:
    """A progress bar as static HTML (what a widget showed, for front ends without it)."""
    width = 100 * done / max(total, 1)
    return (
        "<div class='px-progress' style='display:flex;gap:8px;align-items:center;"
        f"font-size:12px;margin:2px 0'><span style='min-width:70px'>{escape(label)}</span>"
        "<div style='width:300px;height:12px;background:#eee'>"
        f"<div style='width:{min(width, 100):.0f}%;height:12px;background:{color}'></div></div>"
        f"<span>{escape(text)}</span></div>"
    )


def widget_bundle(widget: Any, html: str, plain: str) -> dict[str, Any]:
    """A display of ``widget`` that carries ``html`` and ``plain`` for front ends that
    cannot show it (nbconvert, a saved notebook without its widget state)."""
    return {
        "text/plain": plain,
        "text/html": html,
        WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": widget.model_id},
    }


def show(bundle: dict[str, Any], display_id: str, update: bool = False) -> None:
    """Display ``bundle`` (raw) under ``display_id``, or replace what it shows."""
    from IPython.display import display, update_display

    try:
        if update:
            update_display(bundle, raw=True, display_id=display_id)
        else:
            display(bundle, raw=True, display_id=display_id)
    except Exception:
        pass


def progress_bar(total: int, description: str) -> Any:
    """An empty ipywidgets bar counting to ``total`` (the look every progress bar here has)."""
    import ipywidgets

    return ipywidgets.IntProgress(
        value=0,
        min=0,
        max=max(total, 1),
        description=description,
        bar_style="info",
        layout=ipywidgets.Layout(width="60%"),
    )


class ProgressDisplay:
    """Shows ``done / total`` and elapsed time; a widget or a text line.

    The widget's display carries the bar as HTML and text too, brought to its final state
    (done, failed, interrupted or not finished) when the wait ends, so a saved notebook
    shows it with or without its widget state.
    """

    def __init__(self, total: int, label: str = "", widget: bool | None = None, show: bool = True):
        self.total = total
        self.label = label
        self.widget: Any = None
        self._last_text = ""
        self._display_id = uuid.uuid4().hex
        self.show = show and progress_enabled()
        use_widget = _in_notebook() if widget is None else widget
        if use_widget and self.show:
            try:
                self._make_widget()
            except Exception:
                self.widget = None

    def _make_widget(self) -> None:
        import ipywidgets

        self.bar = progress_bar(self.total, self.label or "progress")
        self.text = ipywidgets.HTML(value=self._status(0, 0.0))
        self.widget = ipywidgets.HBox([self.bar, self.text])
        html, plain = self.snapshot(0, 0.0, "running")
        show(widget_bundle(self.widget, html, plain), self._display_id)

    def _status(self, done: int, elapsed: float) -> str:
        return f"{done}/{self.total} tasks, {elapsed:.1f} s"

    def snapshot(self, done: int, elapsed: float, state: str) -> tuple[str, str]:
        """The bar as (HTML, text), at ``done`` items, in ``state``."""
        label = self.label or "progress"
        text = f"{self._status(done, elapsed)} ({state})"
        color = {"done": "#2e7d32", "running": "#1976d2"}.get(state, "#c62828")
        return bar_html(label, done, self.total, text, color), f"{label}: {text}"

    def update(self, done: int, elapsed: float) -> None:
        if not self.show:
            return
        if self.widget is not None:
            self.bar.value = done
            self.text.value = self._status(done, elapsed)
            return
        text = self._status(done, elapsed)
        if text != self._last_text:
            write_text_bar(self.label, done, self.total, text)
            self._last_text = text

    def close(
        self,
        done: int,
        elapsed: float,
        success: bool,
        interrupted: bool = False,
        ended: bool = True,
    ) -> None:
        """The end of the wait: ``success`` of what was waited for, ``interrupted`` by
        Ctrl-C, ``ended`` (False: the wait timed out first)."""
        if not self.show:
            return
        self.update(done, elapsed)
        if self.widget is not None:
            self.bar.bar_style = "success" if success else "danger"
            html, plain = self.snapshot(done, elapsed, outcome(success, interrupted, ended))
            show(widget_bundle(self.widget, html, plain), self._display_id, update=True)
        else:
            # (the outcome, as the widget and the per-engine bars end: "2/2 tasks" alone
            # read as a success when the tasks failed, and a timed-out wait as done)
            sys.stdout.write(f" ({outcome(success, interrupted, ended)})\n")
            sys.stdout.flush()


def _wait_loop(
    done_count: Callable[[], int],
    finished: Callable[[float], bool],
    elapsed: Callable[[], float],
    total: int,
    label: str,
    interval: float,
    timeout: float | None,
    widget: bool | None,
    success: Callable[[], bool],
    interrupt: Callable[[], Any] = lambda: None,
    show: bool = True,
    display: Any = None,
) -> bool:
    if display is None:
        display = ProgressDisplay(total, label, widget, show)
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = False
    interrupted = False
    try:
        while True:
            wait = interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if finished(wait):
                ok = True
                break
            display.update(done_count(), elapsed())
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        interrupted = True
        interrupt()
        raise
    finally:
        display.close(done_count(), elapsed(), ok and success(), interrupted, ok)
    return ok


def wait_with_progress(
    ar: Any,
    interval: float = 0.1,
    timeout: float | None = None,
    widget: bool | None = None,
    show: bool = True,
    finished: Callable[[float], bool] | None = None,
    per_engine: bool = False,
) -> bool:
    """Wait for an AsyncResult (until ``finished(seconds)`` says so: by default until it
    is done), showing its progress (items, not messages); ``per_engine``: a bar per
    engine too."""
    display = None
    if per_engine:
        from ._engine_progress import EngineProgress

        display = EngineProgress(ar, ar._fname, widget, show)
    return _wait_loop(
        lambda: ar.progress,
        finished or ar.wait,
        lambda: ar.elapsed,
        ar._total(),
        ar._fname,
        interval,
        timeout,
        widget,
        # (not done yet, after an early return_when: no failure to show either)
        lambda: not ar.done() or (not ar.cancelled() and ar.exception() is None),
        ar._interrupt_running,
        show,
        display,
    )


def wait_futures_with_progress(
    futures: Sequence[Any],
    interval: float = 0.1,
    timeout: float | None = None,
    widget: bool | None = None,
) -> bool:
    """Wait for futures (a client's outstanding work), showing how many are done."""
    import concurrent.futures

    if not futures:
        return True  # nothing to wait for: no bar stuck at 0 of 1
    start = time.monotonic()

    def finished(wait: float) -> bool:
        return not concurrent.futures.wait(futures, wait)[1]

    return _wait_loop(
        lambda: sum(f.done() for f in futures),
        finished,
        lambda: time.monotonic() - start,
        len(futures),
        "",
        interval,
        timeout,
        widget,
        lambda: all(f.exception() is None for f in futures if not f.cancelled()),
    )
