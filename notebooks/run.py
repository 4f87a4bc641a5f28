"""Run a notebook headless and print it as it goes.

    python notebooks/run.py NOTEBOOK.ipynb [--timeout SECONDS] [--output EXECUTED.ipynb]

Executes the notebook with nbclient in a ``python3`` kernel started in the notebook's own
folder, printing each code cell's source and then its text outputs (streams, ``text/plain``
results and errors) as they arrive. Progress-bar widgets are summarized as ``[progress
done/total]`` once their cell has finished. Exits with status 1 when a cell raises (or
times out, or the kernel dies), 0 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class PrintingClient(NotebookClient):
    """A NotebookClient that prints sources and text outputs while it executes."""

    def __init__(self, nb: Any, **kwargs: Any):
        super().__init__(
            nb,
            on_cell_start=self._cell_start,
            on_cell_executed=self._cell_executed,
            **kwargs,
        )
        self._last_char = "\n"

    def _write(self, text: str) -> None:
        if text:
            _out(text)
            self._last_char = text[-1]

    def _cell_start(self, cell: Any, cell_index: int) -> None:
        if cell.cell_type != "code":
            return
        self._started = time.monotonic()
        self._write(f"\n--- cell {cell_index} ({cell.get('id', '?')}) ---\n")
        self._write("".join(f">>> {line}\n" for line in cell.source.splitlines()))

    def _cell_executed(self, cell: Any, cell_index: int, execute_reply: Any) -> None:
        for output in cell.outputs:
            model_id = output.get("data", {}).get(WIDGET_VIEW, {}).get("model_id")
            if model_id:
                self._write_progress(model_id)
        if self._last_char != "\n":
            self._write("\n")
        status = execute_reply.get("content", {}).get("status", "?")
        self._write(f"(cell {cell_index}: {status}, {time.monotonic() - self._started:.2f} s)\n")

    def _write_progress(self, model_id: str) -> None:
        """``[progress 40/40]`` for each progress bar inside the widget ``model_id``."""
        state = getattr(self, "widget_state", {}) or {}
        todo, seen = [model_id], set()
        while todo:
            mid = todo.pop(0)
            if mid in seen or mid not in state:
                continue
            seen.add(mid)
            model = state[mid]
            if "value" in model and "max" in model and "Progress" in model.get("_model_name", ""):
                self._write(f"[progress {model['value']}/{model['max']}]\n")
            for child in model.get("children", []) or []:
                todo.append(str(child).removeprefix("IPY_MODEL_"))

    def output(self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int):
        out = super().output(outs, msg, display_id, cell_index)
        self._print_output(msg)
        return out

    def _print_output(self, msg: dict[str, Any]) -> None:
        kind = msg["header"]["msg_type"]
        content = msg["content"]
        if kind == "stream":
            self._write(content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            if WIDGET_VIEW in data:
                return  # summarized when the cell ends, from the widget's final state
            text = data.get("text/plain")
            if text:
                if self._last_char != "\n":
                    self._write("\n")
                self._write(text + "\n")
        elif kind == "error":
            if self._last_char != "\n":
                self._write("\n")
            traceback = "\n".join(content.get("traceback", []))
            self._write(ANSI.sub("", traceback) + "\n")


def run(path: Path, timeout: float, output: Path | None) -> int:
    nb = nbformat.read(path, as_version=4)
    client = PrintingClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
        store_widget_state=True,
    )
    t0 = time.monotonic()
    status = 0
    try:
        client.execute()
    except CellExecutionError:
        status = 1  # the traceback was printed with the cell's outputs
    except CellTimeoutError as exc:
        _out(f"\n{exc}\n")
        status = 1
    except DeadKernelError as exc:
        _out(f"\nthe kernel died: {exc}\n")
        status = 1
    finally:
        if output is not None:
            nbformat.write(nb, output)
    verdict = "failed" if status else "ran"
    _out(f"\n{path.name}: {verdict} in {time.monotonic() - t0:.1f} s\n")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds each cell may run (default 60)"
    )
    parser.add_argument("--output", type=Path, default=None, help="save the executed notebook")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no such notebook: {args.notebook}")
    return run(args.notebook, args.timeout, args.output)


if __name__ == "__main__":
    sys.exit(main())
