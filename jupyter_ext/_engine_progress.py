"""Progress per engine: ``ar.wait_interactive(per_engine=True)`` and ``%%px
--progress-after``.

One bar per engine counting items (a map's chunks count their items), with its rate and
the time elapsed, under one bar for the whole; a failure turns its engine's bar red with
the error's name. Which engine runs a task is known when it is sent (a direct view) or
when its reply comes (load-balanced): until then its items are an engine's share of what
is left, so every bar ends full.

:func:`tally` is the pure part (tasks in, counts per engine out), tested without
processes. :class:`EngineProgress` shows it: ipywidgets in a notebook kernel (updated by
the waiting thread, which owns it), whose display carries the same bars as static HTML
and text and is replaced by them when the wait ends (done, failed, interrupted, or not
finished in time), so that a saved notebook shows the final state with or without its
widgets. Elsewhere (a terminal IPython, a script) text: on a terminal, the whole and one
line per engine (its state and counts) redrawn in place; on a pipe, the whole on one
line, and the engines' lines when the wait ends.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from typing import Any, TextIO

from kernel_engine.top import printable

from ._progress import (
    _in_notebook,
    bar_html,
    outcome,
    progress_bar,
    progress_enabled,
    show,
    widget_bundle,
    write_text_bar,
)

REDRAW_EVERY = 0.5
"""Seconds between two redraws of the engines' lines on a terminal."""


@dataclass(slots=True)
class EngineCount:
    """One engine's items: done, known to be its own (done or not), and the first
    error's name if one of its tasks failed."""

    done: int = 0
    assigned: int = 0
    error: str | None = None

    def total(self, share: int) -> int:
        """Its bar's length: its own items, plus ``share`` of those not placed yet."""
        return max(self.assigned + share, self.done, 1)


def tally(
    tasks: Iterable[tuple[int | None, int, bool, str | None]], engines: Iterable[int] = ()
) -> tuple[dict[int, EngineCount], int]:
    """Per engine counts from ``tasks``: (engine id or None, items, done, error name or
    None) each; ``engines`` are listed even with nothing yet. Returns the counts and the
    items of unfinished tasks whose engine is not known yet."""
    counts: dict[int, EngineCount] = {eid: EngineCount() for eid in engines}
    unplaced = 0
    for eid, items, done, error in tasks:
        if eid is None:
            if not done:
                unplaced += items
            continue
        count = counts.get(eid)
        if count is None:
            count = counts[eid] = EngineCount()
        count.assigned += items
        if done:
            count.done += items
        if error is not None and count.error is None:
            count.error = error
    return counts, unplaced


def share(unplaced: int, n_engines: int) -> int:
    """Each engine's share of ``unplaced`` items."""
    return math.ceil(unplaced / n_engines) if n_engines else 0


def describe(count: EngineCount, elapsed: float) -> str:
    """``12 items · 4.1/s · 2.9 s``, or the error's name."""
    rate = count.done / elapsed if elapsed > 0 else 0.0
    text = f"{count.done} items · {rate:.1f}/s · {elapsed:.1f} s"
    return f"{count.error} · {text}" if count.error else text


def engine_state(count: EngineCount, each: int, interrupted: bool = False) -> str:
    """One engine's state: ``failed`` (a task of it failed), ``done`` (nothing of it
    left), else ``running`` (``interrupted``, once the wait was)."""
    if count.error:
        return "failed"
    if count.done >= count.assigned and each == 0:
        return "done"
    return "interrupted" if interrupted else "running"


def engine_lines(
    counts: dict[int, EngineCount], each: int, elapsed: float, interrupted: bool = False
) -> list[str]:
    """One line per engine: ``engine 0: 12 items · 4.1/s · 2.9 s · done``."""
    return [
        f"engine {eid}: {describe(count, elapsed)} · {engine_state(count, each, interrupted)}"
        for eid, count in sorted(counts.items())
    ]


def _task_rows(ar: Any) -> list[tuple[int | None, int, bool, str | None]]:
    """(engine, items, done, error name) of each of an AsyncResult's tasks."""
    sizes = getattr(ar, "_chunk_sizes", None) or [1] * len(ar._children)
    rows = []
    for child, size in zip(ar._children, sizes):
        done = child.done()
        error = None
        if done and not child.cancelled():
            exc = child.exception()
            if exc is not None:
                error = printable(str(getattr(exc, "ename", None) or type(exc).__name__))
        eid = child.metadata.get("engine_id")
        rows.append((eid if isinstance(eid, int) else None, size, done, error))
    return rows


def bars_html(
    counts: dict[int, EngineCount],
    each: int,
    elapsed: float,
    ended: bool,
    interrupted: bool = False,
) -> str:
    """The per-engine bars as static HTML (what the widgets show, at this moment)."""
    parts = ["<div class='px-engine-progress' style='font-size:12px'>"]
    for eid, count in sorted(counts.items()):
        total = count.done if ended and not count.error else count.total(each)
        state = engine_state(count, each, interrupted)
        color = "#c62828" if count.error else ("#2e7d32" if ended else "#1976d2")
        parts.append(
            f"<div class='px-engine-bar' data-engine='{eid}' data-state='{state}'>"
            + bar_html(
                f"engine {eid}", count.done, total, f"{describe(count, elapsed)} · {state}", color
            )
            + "</div>"
        )
    parts.append("</div>")
    return "".join(parts)


class EngineProgress:
    """Bars for an AsyncResult: the whole, and one per engine (see the module docstring).

    ``update(done, elapsed)`` and ``close(done, elapsed, success, interrupted, ended)`` as
    :class:`~jupyter_ext._progress.ProgressDisplay`.
    """

    def __init__(
        self,
        ar: Any,
        label: str = "",
        widget: bool | None = None,
        show: bool = True,
        engines: Iterable[int] | None = None,
        out: TextIO | None = None,
    ):
        self.ar = ar
        self.total = ar._total()
        self.label = label
        self.show = show and progress_enabled()
        ids = list(engines) if engines is not None else ar._transport.ids
        self.engines = ids
        self.widget: Any = None
        self.out = out
        self._rows: dict[int, tuple[Any, Any]] = {}
        self._display_id = uuid.uuid4().hex
        self._last_text = ""
        self._drawn = 0  # (lines drawn on a terminal, to draw over)
        self._redrawn = float("-inf")
        use_widget = _in_notebook() if widget is None else widget
        if use_widget and self.show:
            try:
                self._make_widget()
            except Exception:
                self.widget = None

    def counts(self) -> tuple[dict[int, EngineCount], int]:
        """Per engine counts now, and each engine's share of the items not placed yet."""
        counts, unplaced = tally(_task_rows(self.ar), self._targets())
        return counts, share(unplaced, len(counts) or len(self.engines))

    def _targets(self) -> list[int]:
        """The engines bars are drawn for before they finish anything: those a direct
        view's tasks name, else every engine."""
        named = {md.get("engine_id") for md in (c.metadata for c in self.ar._children)}
        named.discard(None)
        if named and all(c.metadata.get("engine_id") is not None for c in self.ar._children):
            return sorted(e for e in named if isinstance(e, int))
        return list(self.engines)

    def _head(self, done: int, elapsed: float, state: str | None = None) -> str:
        text = f"{self.label or 'progress'}: {done}/{self.total} tasks, {elapsed:.1f} s"
        return f"{text} ({state})" if state else text

    def snapshot(
        self, done: int, elapsed: float, state: str, ended: bool = False, interrupted: bool = False
    ) -> tuple[str, str]:
        """The whole and the engines' bars as (HTML, text), in ``state``."""
        counts, each = self.counts()
        head = self._head(done, elapsed, state)
        plain = "\n".join(
            [head, *(f"  {line}" for line in engine_lines(counts, each, elapsed, interrupted))]
        )
        html = f"<div><b>{escape(head)}</b></div>" + bars_html(
            counts, each, elapsed, ended, interrupted
        )
        return html, plain

    def _make_widget(self) -> None:
        import ipywidgets

        self.bar = progress_bar(self.total, self.label or "progress")
        self.text = ipywidgets.HTML(value=f"0/{self.total} tasks, 0.0 s")
        self.engine_box = ipywidgets.VBox([])
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.bar, self.text]), self.engine_box])
        self.widget.add_class("jupyter-px-engine-progress")
        html, plain = self.snapshot(0, 0.0, "running")
        show(widget_bundle(self.widget, html, plain), self._display_id)

    def _row(self, eid: int) -> tuple[Any, Any]:
        row = self._rows.get(eid)
        if row is None:
            import ipywidgets

            bar = progress_bar(1, f"engine {eid}")
            text = ipywidgets.HTML(value="")
            box = ipywidgets.HBox([bar, text])
            box.add_class("jupyter-px-engine-bar")
            row = self._rows[eid] = (bar, text)
            children = [*self.engine_box.children, box]
            # (sorted by engine id, whatever order the engines come in)
            self.engine_box.children = sorted(
                children, key=lambda b: int(b.children[0].description.split()[-1])
            )
        return row

    def update(self, done: int, elapsed: float) -> None:
        if not self.show:
            return
        if self.widget is None:
            self._text_update(done, elapsed)
            return
        self.bar.value = done
        self.text.value = f"{done}/{self.total} tasks, {elapsed:.1f} s"
        counts, each = self.counts()
        for eid, count in sorted(counts.items()):
            bar, text = self._row(eid)
            total = count.total(each)
            if bar.max != total:  # (max before value: a value past max is clipped)
                bar.max = max(total, bar.value)
            bar.value = count.done
            if count.error:
                bar.bar_style = "danger"
            text.value = escape(describe(count, elapsed))

    def _stream(self) -> TextIO:
        return sys.stdout if self.out is None else self.out

    def _tty(self) -> bool:
        try:
            return self._stream().isatty()
        except (AttributeError, ValueError):
            return False

    def _text_update(self, done: int, elapsed: float) -> None:
        if self._tty():
            now = time.monotonic()
            if now - self._redrawn >= REDRAW_EVERY:
                self._redrawn = now
                counts, each = self.counts()
                self._draw([self._head(done, elapsed), *engine_lines(counts, each, elapsed)])
            return
        text = f"{done}/{self.total} tasks, {elapsed:.1f} s"
        if text != self._last_text:
            write_text_bar(self.label, done, self.total, text)
            self._last_text = text

    def _draw(self, lines: list[str]) -> None:
        """Lines on a terminal, over those drawn before."""
        out = self._stream()
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        out.flush()
        self._drawn = len(lines)

    def close(
        self,
        done: int,
        elapsed: float,
        success: bool,
        interrupted: bool = False,
        ended: bool = True,
    ) -> None:
        """The end of the wait (see :meth:`ProgressDisplay.close`): the bars' final state,
        as widgets and as the display's HTML and text (or as text lines)."""
        if not self.show:
            return
        self.update(done, elapsed)
        state = outcome(success, interrupted, ended)
        finished = self.ar.done()
        counts, each = self.counts()
        if self.widget is None:
            lines = engine_lines(counts, each, elapsed, interrupted)
            if self._tty():
                self._draw([self._head(done, elapsed, state), *lines])
            else:
                out = self._stream()
                out.write(f" ({state})\n" + "".join(f"  {line}\n" for line in lines))
                out.flush()
            return
        self.bar.bar_style = "success" if success else "danger"
        for eid, count in counts.items():
            bar, _ = self._row(eid)
            if not count.error:
                bar.max = max(count.done, 1) if finished else bar.max
                bar.value = count.done
                bar.bar_style = "success" if finished else "info"
        html, plain = self.snapshot(done, elapsed, state, finished, interrupted)
        show({"text/plain": plain, "text/html": html}, self._display_id, update=True)
