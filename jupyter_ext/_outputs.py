"""Showing what engines print and display: live as it arrives, or after the fact.

One place renders engine output for ``AsyncResult.display_outputs``,
``AsyncResult.stream_output`` and the ``%px`` magics, so they look the same:

- streams are labelled with their engine, ``[stdout:0] text``, as IPython Parallel does,
  for one engine too; text of several lines starts on the line after its label;
- display data is announced by ``[output:0]`` and goes through IPython's display
  machinery when there is one (plain text otherwise);
- an ``execute`` result shows as ``Out[0:3]: ...`` (rich results through the display
  machinery under that label);
- an error shows as its engine's traceback, ``[Engine 0] ZeroDivisionError: ...``.

Groupings after the fact (``groupby``), as IPython Parallel's:

- ``type``: every engine's stdout, then every engine's stderr, then display outputs engine
  by engine, then execute results;
- ``engine``: everything of one engine together, engine by engine;
- ``order``: as ``type``, but display outputs interleaved across engines in the order
  each engine produced them (every engine's first, then every engine's second, ...).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

from ._metadata import Metadata

GROUPINGS = ("type", "engine", "order")


def show_stream(eid: Any, name: str, text: str) -> None:
    """``[stdout:0] text`` (stderr to ``sys.stderr``)."""
    if not text:
        return
    out = sys.stderr if name == "stderr" else sys.stdout
    label = f"[{name}:{eid}] "
    # several lines start below their label, so that they stay aligned
    if text.count("\n") > int(text.endswith("\n")) and not text.startswith("\n"):
        label = label.rstrip() + "\n"
    out.write(label + (text if text.endswith("\n") else text + "\n"))
    out.flush()


def show_display(eid: Any, content: dict[str, Any]) -> None:
    """A ``display_data`` of an engine, under ``[output:0]``."""
    data = content.get("data") or {}
    if _in_ipython():
        from IPython.display import publish_display_data

        print(f"[output:{eid}]", flush=True)
        publish_display_data(data, content.get("metadata") or {})
    elif "text/plain" in data:
        print(f"[output:{eid}] {data['text/plain']}", flush=True)


def show_result(eid: Any, content: dict[str, Any]) -> None:
    """An ``execute_result``: ``Out[0:3]: text``, rich data below its label."""
    data = dict(content.get("data") or {})
    label = f"Out[{eid}:{content.get('execution_count')}]: "
    if set(data) <= {"text/plain"} or not _in_ipython():
        if "text/plain" in data:
            print(label + data["text/plain"], flush=True)
        return
    from IPython.display import publish_display_data

    print(label, flush=True)
    publish_display_data(data, content.get("metadata") or {})


def show_error(eid: Any, content: dict[str, Any]) -> None:
    """An ``error`` an engine published: its traceback, headed by the engine."""
    lines = [f"[Engine {eid}] {content.get('ename')}: {content.get('evalue')}"]
    lines += [str(line) for line in content.get("traceback") or []]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def show_live(eid: Any, msg_type: str, content: dict[str, Any]) -> None:
    """One iopub message of an engine, as it arrives."""
    if msg_type == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        show_stream(eid, name, str(content.get("text", "")))
    elif msg_type == "display_data":
        show_display(eid, content)
    elif msg_type == "execute_result":
        show_result(eid, content)
    elif msg_type == "error":
        show_error(eid, content)
    elif msg_type == "clear_output" and _in_ipython():
        from IPython.display import clear_output

        clear_output(wait=bool(content.get("wait")))


class LiveOutput:
    """Shows engines' output as it arrives, whole lines at a time: a line that reaches us
    in several stream messages (``print(a, b)`` writes several times) is shown once, under
    one label. Call :meth:`flush` at the end for what did not end with a newline."""

    MAX_PARTIAL = 65536
    """A line longer than this is shown without waiting for its end."""

    def __init__(self) -> None:
        self._partial: dict[tuple[Any, str], str] = {}
        self._lock = threading.Lock()  # (shown by an IO thread, flushed by another)

    def show(self, eid: Any, msg_type: str, content: dict[str, Any]) -> None:
        with self._lock:
            self._show(eid, msg_type, content)

    def _show(self, eid: Any, msg_type: str, content: dict[str, Any]) -> None:
        if msg_type != "stream":
            self._flush(eid)  # what an engine printed comes before what it displays next
            show_live(eid, msg_type, content)
            return
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        text = self._partial.pop((eid, name), "") + str(content.get("text", ""))
        whole, newline, rest = text.rpartition("\n")
        if len(rest) > self.MAX_PARTIAL:
            whole, newline, rest = text, "", ""
        if rest:
            self._partial[(eid, name)] = rest
        if whole or newline:
            show_stream(eid, name, whole + newline)

    def flush(self, eid: Any = None) -> None:
        """Show the unfinished lines (of engine ``eid``, or of all)."""
        with self._lock:
            self._flush(eid)

    def _flush(self, eid: Any) -> None:
        for key in [k for k in self._partial if eid is None or k[0] == eid]:
            show_stream(key[0], key[1], self._partial.pop(key))


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    return get_ipython() is not None


def _streams(md: Metadata) -> None:
    show_stream(md.get("engine_id"), "stdout", md.get("stdout") or "")
    show_stream(md.get("engine_id"), "stderr", md.get("stderr") or "")


def _outputs(md: Metadata) -> None:
    for content in md.get("outputs") or []:
        show_display(md.get("engine_id"), content)


def _result(md: Metadata) -> None:
    if md.get("execute_result"):
        show_result(md.get("engine_id"), md["execute_result"])


def display_outputs(
    mds: Sequence[Metadata], groupby: str = "type", result_only: bool = False
) -> None:
    """Show the outputs of tasks, grouped by ``type``, ``engine`` or ``order`` (see the
    module's docstring); ``result_only`` shows only execute results."""
    if groupby not in GROUPINGS:
        raise ValueError(f"groupby must be one of {GROUPINGS}, not {groupby!r}")
    if result_only:
        for md in mds:
            _result(md)
        return
    if groupby == "engine":
        for md in sorted(mds, key=lambda m: (m.get("engine_id") is None, m.get("engine_id") or 0)):
            _streams(md)
            _outputs(md)
            _result(md)
        return
    for name in ("stdout", "stderr"):
        for md in mds:
            show_stream(md.get("engine_id"), name, md.get(name) or "")
    if groupby == "type":
        for md in mds:
            _outputs(md)
    else:
        lists = [(md.get("engine_id"), md.get("outputs") or []) for md in mds]
        for i in range(max((len(outs) for _, outs in lists), default=0)):
            for eid, outs in lists:
                if i < len(outs):
                    show_display(eid, outs[i])
    for md in mds:
        _result(md)
