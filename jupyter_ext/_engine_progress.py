"""Progress per engine: ``ar.wait_interactive(per_engine=True)`` and ``%%px
--progress-after``.

One bar per engine counting items (a map's chunks count their items), with its rate and
the time elapsed, under one bar for the whole; a failure turns its engine's bar red with
the error's name. Which engine runs a task is known when it is sent (a direct view) or
when its reply comes (load-balanced): until then its items are an engine's share of what
is left, so every bar ends full.

:func:`tally` is the pure part (tasks in, counts per engine out), tested without
processes. :class:`EngineProgress` shows it: ipywidgets in a notebook kernel (updated by
the waiting thread, which owns it), replaced when it ends by the same bars as static HTML
so that a saved notebook shows the final state with or without its widgets; text lines
elsewhere.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from typing import Any

from ._progress import _in_notebook, progress_bar, progress_enabled, write_text_bar

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


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
                error = str(getattr(exc, "ename", None) or type(exc).__name__)
        eid = child.metadata.get("engine_id")
        rows.append((eid if isinstance(eid, int) else None, size, done, error))
    return rows


def bars_html(counts: dict[int, EngineCount], each: int, elapsed: float, ended: bool) -> str:
    """The per-engine bars as static HTML (what the widgets showed, at the end)."""
    parts = ["<div class='px-engine-progress' style='font-size:12px'>"]
    for eid, count in sorted(counts.items()):
        total = count.done if ended and not count.error else count.total(each)
        width = 100 * count.done / max(total, 1)
        color = "#c62828" if count.error else ("#2e7d32" if ended else "#1976d2")
        parts.append(
            f"<div class='px-engine-bar' data-engine='{eid}' style='display:flex;gap:8px;"
            "align-items:center;margin:2px 0'>"
            f"<span style='width:70px'>engine {eid}</span>"
            "<div style='width:300px;height:12px;background:#eee'>"
            f"<div style='width:{width:.0f}%;height:12px;background:{color}'></div></div>"
            f"<span>{escape(describe(count, elapsed))}</span></div>"
        )
    parts.append("</div>")
    return "".join(parts)


class EngineProgress:
    """Bars for an AsyncResult: the whole, and one per engine (see the module docstring).

    ``update(done, elapsed)`` and ``close(done, elapsed, success)`` as
    :class:`~jupyter_ext._progress.ProgressDisplay`.
    """

    def __init__(
        self,
        ar: Any,
        label: str = "",
        widget: bool | None = None,
        show: bool = True,
        engines: Iterable[int] | None = None,
    ):
        self.ar = ar
        self.total = ar._total()
        self.label = label
        self.show = show and progress_enabled()
        ids = list(engines) if engines is not None else ar._transport.ids
        self.engines = ids
        self.widget: Any = None
        self._rows: dict[int, tuple[Any, Any]] = {}
        self._display_id = uuid.uuid4().hex
        self._last_text = ""
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

    def _make_widget(self) -> None:
        import ipywidgets
        from IPython.display import display

        self.bar = progress_bar(self.total, self.label or "progress")
        self.text = ipywidgets.HTML(value=f"0/{self.total} tasks, 0.0 s")
        self.engine_box = ipywidgets.VBox([])
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.bar, self.text]), self.engine_box])
        self.widget.add_class("jupyter-px-engine-progress")
        bundle = {
            "text/plain": f"{self.label or 'progress'}: 0/{self.total}",
            WIDGET_VIEW: {
                "version_major": 2,
                "version_minor": 0,
                "model_id": self.widget.model_id,
            },
        }
        display(bundle, raw=True, display_id=self._display_id)

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

    def _text_update(self, done: int, elapsed: float) -> None:
        text = f"{done}/{self.total} tasks, {elapsed:.1f} s"
        if text != self._last_text:
            write_text_bar(self.label, done, self.total, text)
            self._last_text = text

    def close(self, done: int, elapsed: float, success: bool) -> None:
        if not self.show:
            return
        self.update(done, elapsed)
        counts, each = self.counts()
        if self.widget is None:
            sys.stdout.write("\n")
            for eid, count in sorted(counts.items()):
                sys.stdout.write(f"  engine {eid}: {describe(count, elapsed)}\n")
            sys.stdout.flush()
            return
        self.bar.bar_style = "success" if success else "danger"
        for eid, count in counts.items():
            bar, _ = self._row(eid)
            if not count.error:
                bar.max = max(count.done, 1)
                bar.value = count.done
                bar.bar_style = "success" if self.ar.done() else "info"
        self._finish_display(counts, each, elapsed, done, success)

    def _finish_display(
        self, counts: dict[int, EngineCount], each: int, elapsed: float, done: int, ok: bool
    ) -> None:
        """The display becomes the bars as HTML, so a saved notebook shows them."""
        from IPython.display import update_display

        status = "done" if ok else "failed"
        head = f"{self.label or 'progress'}: {done}/{self.total} tasks, {elapsed:.1f} s ({status})"
        lines = [
            head,
            *(f"  engine {e}: {describe(c, elapsed)}" for e, c in sorted(counts.items())),
        ]
        bundle = {
            "text/plain": "\n".join(lines),
            "text/html": f"<div><b>{escape(head)}</b></div>"
            + bars_html(counts, each, elapsed, self.ar.done()),
        }
        try:
            update_display(bundle, raw=True, display_id=self._display_id)
        except Exception:
            pass
