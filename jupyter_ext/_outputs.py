"""Showing what tasks printed and displayed, after the fact (``AsyncResult.display_outputs``).

Every stream line is labelled with its engine, ``[stdout:0]``, as IPython Parallel does,
for one engine too; display data goes through IPython's display machinery when there is
one (plain text otherwise); an ``execute`` result shows as ``Out[0:3]: ...``. Failed
tasks' outputs are shown as well: they are often what explains the failure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from ._metadata import Metadata

GROUPINGS = ("type", "engine", "order")


def _stream(md: Metadata, name: str) -> None:
    text = md.get(name) or ""
    if text:
        out = sys.stderr if name == "stderr" else sys.stdout
        print(
            f"[{name}:{md.get('engine_id')}] {text}",
            end="" if text.endswith("\n") else "\n",
            file=out,
        )


def _display(content: dict[str, Any]) -> None:
    data = content.get("data") or {}
    if _in_ipython():
        from IPython.display import publish_display_data

        publish_display_data(data, content.get("metadata") or {})
    elif "text/plain" in data:
        print(data["text/plain"])


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    return get_ipython() is not None


def _outputs(md: Metadata) -> None:
    for content in md.get("outputs") or []:
        _display(content)


def _result(md: Metadata) -> None:
    result = md.get("execute_result") or {}
    text = (result.get("data") or {}).get("text/plain")
    if text is not None:
        count = result.get("execution_count")
        print(f"Out[{md.get('engine_id')}:{count}]: {text}")


def display_outputs(
    mds: Sequence[Metadata], groupby: str = "type", result_only: bool = False
) -> None:
    """Show the outputs of tasks, grouped by ``type`` (all stdout, then all stderr, ...),
    by ``engine`` (everything of one engine together) or in the ``order`` the tasks were
    submitted; ``result_only`` shows only execute results."""
    if groupby not in GROUPINGS:
        raise ValueError(f"groupby must be one of {GROUPINGS}, not {groupby!r}")
    if result_only:
        for md in mds:
            _result(md)
        return
    if groupby == "type":
        for show in (
            lambda m: _stream(m, "stdout"),
            lambda m: _stream(m, "stderr"),
            _outputs,
            _result,
        ):
            for md in mds:
                show(md)
        return
    ordered = list(mds)
    if groupby == "engine":
        ordered.sort(key=lambda m: (m.get("engine_id") is None, m.get("engine_id") or 0))
    for md in ordered:
        _stream(md, "stdout")
        _stream(md, "stderr")
        _outputs(md)
        _result(md)
