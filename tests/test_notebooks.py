"""The example notebooks, executed headless in a real kernel (nbclient), checked cell by cell.

Each notebook runs in a ``python3`` kernel started in ``notebooks/`` (a child of this test
process); the notebook starts its own cluster (the controller is a child of the kernel)
and stops it in its last cell. Whatever happens, every process a test caused is gone
when it ends: stopped by the notebook, or killed here by PID.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import threading
import time
from collections.abc import Collection
from functools import reduce
from math import sqrt
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import psutil
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 60  # seconds any one cell may run
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


# ----- processes


class ProcessWatcher:
    """Remembers every process descended from this one while active, and ends them after.

    A thread samples the descendants every ``interval`` s, keeping each one's PID and
    start time: processes orphaned later (a controller whose kernel was shut down is
    re-parented) are still known. On exit, waits up to ``grace`` s for them to end, then
    kills the survivors by PID (only if the PID is still the same process) and records
    them in ``left``.
    """

    def __init__(self, interval: float = 0.1, grace: float = 15.0):
        self.interval = interval
        self.grace = grace
        self.seen: dict[int, float] = {}
        self.left: dict[int, str] = {}
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watcher", daemon=True)

    def sample(self) -> None:
        for proc in psutil.Process().children(recursive=True):
            if proc.pid not in self._before and proc.pid not in self.seen:
                try:
                    self.seen[proc.pid] = proc.create_time()
                except psutil.Error:
                    continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessWatcher:
        self.sample()
        self._thread.start()
        return self

    def _alive(self) -> list[psutil.Process]:
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()
        deadline = time.monotonic() + self.grace
        alive = self._alive()
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = self._alive()
        for proc in alive:
            try:
                self.left[proc.pid] = " ".join(proc.cmdline())[:160]
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=10)


# ----- running notebooks


def execute(name: str, env: dict[str, str] | None = None) -> Any:
    """Execute ``notebooks/<name>``; returns the executed notebook.

    Processes it leaves behind (kernel, controller, engines, pool workers) are killed by
    PID; if it ran to the end and still left some, that is a failure.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        store_widget_state=True,
    )
    with ProcessWatcher() as watcher:
        if env is None:
            client.execute()
        else:
            client.execute(env=env)
    if watcher.left:
        pytest.fail(f"{name} ran to the end but left processes behind: {watcher.left}")
    return nb


def by_id(nb: Any) -> dict[str, Any]:
    return {cell.id: cell for cell in nb.cells}


def text(cell: Any, streams: tuple[str, ...] = ("stdout",), results: bool = True) -> str:
    """The cell's stream output (stdout by default) and text/plain results, in order."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name in streams:
            parts.append(out.text)
        elif (
            results
            and out.output_type in ("execute_result", "display_data")
            and WIDGET_VIEW not in out.data
        ):
            parts.append(out.data.get("text/plain", "") + "\n")
    return "".join(parts)


def result(cell: Any) -> str:
    """The text/plain of the cell's execute_result."""
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert len(results) == 1, f"cell {cell.id}: expected one result, got {cell.outputs}"
    return str(results[0].data["text/plain"])


def lines(cell: Any) -> list[str]:
    return text(cell).splitlines()


def errors(nb: Any) -> dict[str, list[str]]:
    """Error outputs by cell id: ``{cell_id: ['ename: evalue', ...]}``."""
    found: dict[str, list[str]] = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.setdefault(cell.id, []).append(f"{out.ename}: {out.evalue}")
    return found


def stderr_of(nb: Any) -> dict[str, str]:
    """Text printed to stderr, by cell id."""
    found = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            err = text(cell, ("stderr",), results=False)
            if err:
                found[cell.id] = err
    return found


def progress_bars(nb: Any, cell: Any) -> list[dict[str, Any]]:
    """Saved states of the progress bars displayed by ``cell`` (searched through children)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    bars = []
    todo = [
        out.data[WIDGET_VIEW]["model_id"]
        for out in cell.outputs
        if out.output_type in ("display_data", "execute_result") and WIDGET_VIEW in out.data
    ]
    seen: set[str] = set()
    while todo:
        model_id = todo.pop()
        if model_id in seen:
            continue
        seen.add(model_id)
        assert model_id in state, f"widget {model_id} of cell {cell.id} has no saved state"
        model = state[model_id]
        if model["model_name"] == "IntProgressModel":
            bars.append(model["state"])
        for child in model["state"].get("children", []):
            todo.append(child.removeprefix("IPY_MODEL_"))
    return bars


def cells_with_widgets(nb: Any) -> set[str]:
    return {
        cell.id
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if WIDGET_VIEW in out.get("data", {})
    }


def assert_full_bar(nb: Any, cell_id: str, total: int) -> None:
    bars = progress_bars(nb, by_id(nb)[cell_id])
    assert len(bars) == 1, f"cell {cell_id}: expected one progress bar, got {bars}"
    bar = bars[0]
    assert (bar["value"], bar["max"]) == (total, total), bar
    assert bar["bar_style"] == "success", bar


def assert_common(nb: Any, empty: Collection[str] = ()) -> None:
    """Metadata, the stop cell last, no stray output: what every notebook must satisfy."""
    assert nb.metadata["kernelspec"] == KERNELSPEC
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[-1].id == "stop", "the cluster must be stopped in the last cell"
    assert text(code[-1]) == "cluster stopped: True\n"
    for cell in code:
        if cell.id in empty:
            assert cell.outputs == [], f"cell {cell.id} should print nothing: {cell.outputs}"
        assert cell.execution_count is not None, f"cell {cell.id} did not run"


def only_in(nb: Any, needle: str, cell_id: str) -> None:
    """``needle`` appears in the outputs of cell ``cell_id`` and of no other cell."""
    where = [c.id for c in nb.cells if c.cell_type == "code" and needle in text(c)]
    assert where == [cell_id], f"{needle!r} expected only in {cell_id}, found in {where}"


# ----- quickstart


def test_quickstart():
    nb = execute("quickstart.ipynb")
    assert errors(nb) == {}
    assert stderr_of(nb) == {}
    assert_common(nb)
    cells = by_id(nb)

    assert re.fullmatch(r"2 engines ready in [\d.]+ s: \[0, 1\]\n", text(cells["start"]))

    engines = ast.literal_eval(result(cells["engines"]))
    assert len(engines) == 2 and len({e["pid"] for e in engines}) == 2
    assert all(os.path.basename(e["python"]).startswith("python") for e in engines)

    assert lines(cells["apply"]) == [
        "2 ** 10 on engine 0: 1024",
        "<AsyncResult(pow): finished> -> [9, 9]",
    ]
    assert lines(cells["push-pull"]) == [
        "pull a: [10, 10]",
        "pull [a, name]: [[10, 'jupyter-px'], [10, 'jupyter-px']]",
        "dview['b']: [[1, 2, 3], [1, 2, 3]]",
        "a_times(3) everywhere: [30, 30]",
    ]
    parts, gathered = lines(cells["scatter-gather"])
    assert parts == "parts: [range(0, 8), range(8, 16)]"
    assert gathered == f"gathered: {[i**2 for i in range(16)]}"
    total = float(np.arange(1_000_000, dtype=float).sum())
    assert lines(cells["numpy-sum"])[-1] == f"sum in parallel: {total} - locally: {total}"
    assert lines(cells["execute"]) == [
        "[stdout:0] HELLO FROM THE NOTEBOOK",
        "[stdout:1] HELLO FROM THE NOTEBOOK",
    ]

    squares = [x * x for x in range(40)]
    assert lines(cells["lb-map"]) == [f"squares: {squares[:8]} ... {squares[-1]}"]
    assert_full_bar(nb, "lb-map", 40)
    assert cells_with_widgets(nb) == {"lb-map"}
    done, serial = lines(cells["lb-stats"])
    per_engine = dict(ast.literal_eval(done.split("per engine: ")[1]))
    assert done.startswith("40/40 tasks done")
    assert set(per_engine) == {0, 1} and sum(per_engine.values()) == 40
    serial_s, wall_s = map(
        float, re.fullmatch(r"serial time ([\d.]+) s in wall time ([\d.]+) s", serial).groups()
    )
    assert serial_s >= 40 * 0.05 * 0.9 and wall_s < serial_s

    remote = text(cells["remote-error"])
    assert remote.startswith("RemoteError from engine 0 -> [0:")
    assert "ZeroDivisionError(division by zero) on engine 0" in remote
    assert "in divide" in remote  # the remote traceback
    composite = lines(cells["composite-error"])
    assert composite[:2] == ["True 2 errors", "one or more exceptions from call to divide"]
    assert sorted(line[:3] for line in composite[2:]) == ["[0:", "[1:"]
    assert all(line.endswith("ZeroDivisionError: division by zero") for line in composite[2:])
    only_in(nb, "ZeroDivisionError(division by zero)", "remote-error")
    only_in(nb, "HELLO FROM THE NOTEBOOK", "execute")


# ----- asyncresult


def test_asyncresult():
    nb = execute("asyncresult.ipynb")
    assert errors(nb) == {}
    assert stderr_of(nb) == {}
    assert_common(nb, empty={"iter-define", "rms-setup"})
    cells = by_id(nb)

    assert result(cells["start"]) == "[0, 1]"
    assert lines(cells["mp-interface"]) == [
        "ready right away? False",
        "ready after wait? True - successful? True",
        "results: [None, None]",
    ]

    # get_dict: the pid map has one entry per engine, and every engine holds it
    pids = ast.literal_eval(result(cells["get-dict"]))
    assert set(pids) == {0, 1} and len(set(pids.values())) == 2
    assert ast.literal_eval(result(cells["pid-map-on-engines"])) == [pids, pids]

    md_lines = text(cells["metadata"])
    assert md_lines.startswith("same as rc.metadata[msg_id]: True\n")
    for needle in ("'engine_id': 0", "'status': 'ok'", "'stdout': 'hello from engine 0\\n'"):
        assert needle in md_lines
    for key in ("submitted", "started", "completed", "received"):
        assert re.search(rf"'{key}': datetime\.datetime\(", md_lines), key
    assert lines(cells["metadata-attrs"]) == [
        "engine_id: [0, 1]",
        "stdout: ['hello\\n', 'hello\\n']",
    ]

    # timing while pending, the progress bar, then serial/wall time and the speedup
    pending, fraction = lines(cells["timing-pending"])
    elapsed, progress = re.fullmatch(
        r"pending: ([\d.]+) s elapsed, (\d+)/10 tasks done", pending
    ).groups()
    assert float(elapsed) >= 0.3 and 0 <= int(progress) < 10
    assert fraction == f"fractional progress: {int(progress) / 10:.0%}"
    assert_full_bar(nb, "timing-pending", 10)
    assert cells_with_widgets(nb) == {"timing-pending"}
    serial, wall = (float(line.split()[-2]) for line in lines(cells["timing-done"]))
    assert 1.9 <= serial < 3.0 and 0.9 <= wall < serial
    speedup = float(result(cells["speedup"]))
    assert 1.3 < speedup <= 2.2

    # itermapresult
    ref_lines = lines(cells["iter-reference"])
    assert ref_lines[:2] == ["Engine IDs:  [0, 1]", "sleeping for `id` seconds on each engine"]
    (i0, t0), (i1, t1) = (line.split(": ") for line in ref_lines[2:])
    assert (i0, i1) == ("0", "1") and float(t0) < 0.9 <= float(t1)
    for cell_id, header in (
        ("iter-one", "running with one call per task"),
        ("iter-chunks", "running with four calls per task"),
    ):
        out = lines(cells[cell_id])
        assert out[0] == header
        parsed = [re.fullmatch(r"task (\d+) on engine (\d): [\d.]+", line) for line in out[1:]]
        assert all(parsed), out
        assert [int(m.group(1)) for m in parsed] == list(range(40))  # in order
        assert {int(m.group(2)) for m in parsed} == {0, 1}
    out = lines(cells["iter-unordered"])
    assert out[0] == "running with two calls per task, with unordered results"
    parsed = [re.fullmatch(r"slept ([\d.]+)s on engine (\d): [\d.]+", line) for line in out[1:]]
    assert all(parsed), out
    assert sorted(float(m.group(1)) for m in parsed) == sorted(
        round(0.0025 * t, 4) for t in range(40)
    )
    assert {int(m.group(2)) for m in parsed} == {0, 1}

    # the one-line RMS: locally, in parallel, and here all agree
    X = np.linspace(0, 100)
    expected = sqrt(reduce(lambda a, b: a + b, (x * x for x in X)) / len(X))
    assert float(result(cells["rms-local"])) == expected
    assert float(result(cells["rms-parallel"])) == expected
    assert abs(expected - 58.028845747399714) < 1e-12

    chunks = lines(cells["msg-ids"])
    assert len(chunks) == 3
    for line in chunks:
        m = re.fullmatch(r"[0-9a-f-]{8}: \[\((\d), 0\.01\), \((\d), 0\.01\)\] on engine (\d)", line)
        assert m and m.group(1) == m.group(2) == m.group(3), line
    only_in(nb, "hello from engine 0", "metadata")


# ----- futures


def hide_distributed(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import distributed`` fails, as if dask were missing."""
    stub = tmp_path / "no_dask" / "distributed"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('distributed hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(stub.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


@pytest.mark.parametrize("dask", ["as-installed", "hidden"])
def test_futures(dask, tmp_path):
    env = hide_distributed(tmp_path) if dask == "hidden" else None
    with_dask = dask == "as-installed" and importlib.util.find_spec("distributed") is not None
    nb = execute("futures.ipynb", env=env)
    assert errors(nb) == {}
    assert_common(nb, empty={"task-import"})
    cells = by_id(nb)

    assert result(cells["start"]) == "<DirectView [0, 1]>"
    imported = text(cells["imports"])
    assert imported.startswith("importing on engine(s): ")
    for name in ("os (os)", "numpy (numpy)", "norm (numpy.linalg.norm)"):
        assert name in imported
    assert re.fullmatch(r"<AsyncResult\(random_norm\): (pending|finished)>", result(cells["basic"]))
    norm = float(re.sub(r"^np\.float64\((.*)\)$", r"\1", result(cells["basic-result"])))
    assert 0 < norm <= 10

    # asyncio: four rounds of results, with the background coroutine ticking meanwhile
    rounds = [line.split(" [")[-1] for line in lines(cells["asyncio"])]
    assert len(rounds) == 4 and len(set(rounds)) == 1
    engine_pids = ast.literal_eval("[" + rounds[0])
    assert len(engine_pids) == 2
    assert text(cells["asyncio"]).count(".") >= 4
    assert lines(cells["await-directly"]) == [f"awaited: {engine_pids}"]

    # the callback ran on engine 1's result, and printed in its own cell
    assert lines(cells["callbacks"]) == [f"I got PID: {engine_pids[1]}"]
    only_in(nb, "I got PID", "callbacks")

    assert result(cells["ex-all"]) == "[0, 1]"
    assert lines(cells["ex-even"]) == [str(engine_pids[0])] * 10
    assert result(cells["ex"]) == "<LoadBalancedView None>"
    assert "def task(n):" in text(cells["task-mod"])

    names = ["ProcessPoolExecutor", "ThreadPoolExecutor", "ViewExecutor"]
    if with_dask:
        names.append("ClientExecutor")
    assert ast.literal_eval(result(cells["executors"])) == names
    if not with_dask:
        assert "dask.distributed is not installed" in text(cells["executors"])
    assert lines(cells["same"]) == [f"{n} ['0', '1', '2', '3', '4']" for n in names]
    assert text(cells["local"]).startswith("Local time:\n")
    # the executor comparison: every executor gave the local results (the cell asserts it)
    compared = lines(cells["compare"])
    assert len(compared) == len(names)
    for name, line in zip(names, compared):
        assert re.fullmatch(rf" *{name}: same results; +[\d.]+ ms ± [\d.]+ ms per map", line)
    assert lines(cells["cleanup"]) == ["executors shut down"]
    assert cells_with_widgets(nb) == set()
    if not with_dask:
        assert stderr_of(nb) == {}


# ----- magics


MAGICS = ROOT / "jupyter_ext" / "_magics.py"


def test_magics():
    if not MAGICS.exists():
        pytest.skip("jupyter_ext/_magics.py (the %px magics) does not exist yet")
    nb = execute("magics.ipynb")
    # the two cells tagged raises-exception fail as intended, and only they
    tagged = {c.id for c in nb.cells if "raises-exception" in c.get("metadata", {}).get("tags", [])}
    assert tagged == {"timeout", "error"}
    errs = errors(nb)
    assert set(errs) == tagged
    assert errs["timeout"] == [
        "TimeoutError: %px: no result within 0.5 s; interrupted engines [0, 1]"
    ]
    # the traceback was streamed as it happened; the cell ends with a one-line summary
    assert errs["error"] == ["AlreadyDisplayedError: 1 error (shown above)"]
    assert_common(nb, empty={"load", "px-import", "local"})
    cells = by_id(nb)

    def labelled(cell_id: str) -> list[str]:
        return sorted(lines(cells[cell_id]))

    # streamed output comes in arrival order: compare sorted
    assert [re.sub(r":\d+\]", "]", line) for line in labelled("px-expr")] == [
        "Out[0]: 0",
        "Out[1]: 10",
    ]
    pids = [int(line.split("pid ")[1]) for line in labelled("px-print")]
    assert [line.split(":")[0] for line in labelled("px-print")] == ["[stdout", "[stdout"]
    assert len(set(pids)) == 2
    assert labelled("px-cell") == [
        "[stdout:0] engine 0: sum of its hundred numbers = 4950",
        "[stdout:1] engine 1: sum of its hundred numbers = 14950",
    ]
    assert lines(cells["px-cell-pull"]) == ["pulled: [4950, 14950] total: 19900"]
    assert lines(cells["targets-one"]) == ["[stdout:1] only on engine 1"]
    assert lines(cells["targets-slice"]) == ["[stdout:0] on the even engines: 0"]

    assert re.fullmatch(r"<AsyncResult\(execute\): (pending|finished)>", result(cells["noblock"]))
    shown = lines(cells["pxresult"])
    assert shown[:2] == [
        "[stdout:0] done sleeping on engine 0",
        "[stdout:1] done sleeping on engine 1",
    ]
    assert [re.sub(r":\d+\]", "]", line) for line in shown[2:]] == ["Out[0]: 0", "Out[1]: 1"]
    assert lines(cells["save-name"]) == [
        "saved: AsyncResult - stdout per engine: "
        "['done sleeping on engine 0\\n', 'done sleeping on engine 1\\n']"
    ]
    assert labelled("block") == [
        "[stdout:0] blocking run on engine 0",
        "[stdout:1] blocking run on engine 1",
    ]
    assert lines(cells["local-check"]) == [f"here: {sqrt(2)} - engines: [{sqrt(2)}, {sqrt(2)}]"]

    def grouped(cell_id: str) -> list[str]:
        """Labels in the order shown, stdout and stderr together."""
        out = text(cells[cell_id], ("stdout", "stderr"))
        return [re.sub(r"\[(\d):\d+\]", r"[\1]", line.split(" ")[0]) for line in out.splitlines()]

    assert grouped("group-type") == [
        "[stdout:0]", "[stdout:1]", "[stderr:0]", "[stderr:1]", "Out[0]:", "Out[1]:"
    ]  # fmt: skip
    assert grouped("group-engine") == [
        "[stdout:0]", "[stderr:0]", "Out[0]:", "[stdout:1]", "[stderr:1]", "Out[1]:"
    ]  # fmt: skip
    assert grouped("group-order") == [
        "[stdout:0]", "[stdout:1]", "[stderr:0]", "[stderr:1]", "Out[0]:", "Out[1]:"
    ]  # fmt: skip
    steps = [f"engine {e} step {s}" for e in (0, 1) for s in range(3)]
    for cell_id in ("stream", "no-stream"):
        # (text of several lines starts on the line after its label)
        shown = sorted(
            re.sub(r"^\[stdout:\d\] ", "", line)
            for line in lines(cells[cell_id])
            if not re.fullmatch(r"\[stdout:\d\]", line)
        )
        assert shown == steps, cell_id
    # without streaming, each engine's output comes in one labelled block
    assert text(cells["no-stream"]) == "".join(
        f"[stdout:{e}]\n" + "".join(f"engine {e} step {s}\n" for s in range(3)) for e in (0, 1)
    )
    assert re.fullmatch(
        r"Parallel execution on engine\(s\): \[0\]\nOut\[0:\d+\]: 1\n", text(cells["verbose"])
    )
    progress = labelled("progress")
    assert [line for line in progress if line.startswith("[stdout")] == [
        "[stdout:0] slept on engine 0",
        "[stdout:1] slept on engine 1",
    ]
    # the bars per engine leave their final state as text where widgets are not shown
    for eid in (0, 1):
        assert any(re.match(rf"\s*engine {eid}: 1 items?\b", line) for line in progress), progress
    # the bars (overall and per engine) end as a static snapshot of their final state,
    # which a notebook reopened without its widgets still shows
    assert re.search(r"px: 2/2 tasks, [\d.]+ s \(done\)", text(cells["progress"]))
    assert cells_with_widgets(nb) == set()
    assert labelled("after-timeout") == [
        "[stdout:0] engine 0 is free again",
        "[stdout:1] engine 1 is free again",
    ]
    # output printed before the error is kept, engine 1's result too
    before_error = text(cells["error"])
    assert "[stdout:0] before the error on engine 0" in before_error
    assert "[stdout:1] before the error on engine 1" in before_error
    assert re.search(r"Out\[1:\d+\]: 1\.0", before_error)
    streamed = text(cells["error"], ("stderr",))
    assert "[Engine 0] ZeroDivisionError: division by zero" in streamed

    assert lines(cells["pxconfig"]) == [
        "Parallel execution on engine(s): [1]",
        "[stdout:1] configured run on engine 1",
    ]
    assert labelled("pxconfig-reset") == [
        "[stdout:0] back to every engine: 0",
        "[stdout:1] back to every engine: 1",
    ]
    assert lines(cells["autopx-on"]) == ["%autopx enabled: cells run on the engines"]
    assert labelled("autopx-cell") == [
        "[stdout:0] on engine 0 auto_value = 100",
        "[stdout:1] on engine 1 auto_value = 101",
    ]
    assert lines(cells["autopx-off"]) == ["%autopx disabled"]
    assert lines(cells["autopx-check"]) == ["defined here? False - on the engines: [100, 101]"]
    assert lines(cells["activate"]) == ["[stdout:0] even engine 0"]
    assert re.fullmatch(
        r"<AsyncResult\(execute\): (pending|finished)>", result(cells["activate-cell"])
    )
    assert re.fullmatch(r"Out\[0:\d+\]: -1\n", text(cells["activate-result"]))
    only_in(nb, "only on engine 1", "targets-one")
    only_in(nb, "[stdout:0] done sleeping on engine", "pxresult")  # not under --noblock


# ----- from IPython Parallel


def test_from_ipyparallel():
    """An IPython Parallel 9 session with only the import changed: every call answers."""
    nb = execute("from_ipyparallel.ipynb")
    assert errors(nb) == {}
    assert stderr_of(nb) == {}
    assert nb.metadata["kernelspec"] == KERNELSPEC
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert code[-1].id == "stop" and text(code[-1]) == "cluster stopped\n"
    assert "import jupyter_ext as ipp" in code[0].source
    assert not any(re.search(r"^(import|from) ipyparallel", c.source, re.M) for c in code)
    cells = by_id(nb)

    def engine_lines(cell_id: str) -> list[str]:
        """``[stdout:N] text`` lines, sorted (a label may stand on a line of its own)."""
        joined = re.sub(r"(\[stdout:\d+\])\n", r"\1 ", text(cells[cell_id]))
        return sorted(joined.splitlines())

    assert text(cells["start"]) == "engine ids: [0, 1]\n"
    assert lines(cells["dview"]) == [
        "blocking by default? False",
        "apply_sync: [42, 42]",
        "apply_async(...).get(): [1024, 1024]",
    ]
    assert lines(cells["push-pull"]) == [
        "pull a: [5, 5]",
        "pull ['a', 'b']: [[5, 'five'], [5, 'five']]",
        "dview['c']: [[1, 2, 3], [1, 2, 3]]",
    ]
    assert lines(cells["scatter-gather"]) == [
        "x on each engine: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]",
        f"gathered y: {[i * i for i in range(10)]}",
    ]
    assert lines(cells["decorators"]) == [
        "@remote: one pid per engine: True",
        "@parallel: ['HELLO!', 'PARALLEL!', 'WORLD!', 'AGAIN!']",
    ]

    # magics after rc.activate()
    assert re.fullmatch(r"<DirectView .*>", result(cells["activate"]))
    assert engine_lines("px-line") == [
        "[stdout:0] engine 0 has a = 5",
        "[stdout:1] engine 1 has a = 5",
    ]
    assert engine_lines("px-cell") == ["[stdout:1] only on engine 1 - 5! = 120"]
    assert re.fullmatch(r"<AsyncResult\(.*\): (pending|finished)>", result(cells["px-noblock"]))
    shown = [re.sub(r":\d+\]", "]", line) for line in lines(cells["pxresult"])]
    assert shown == ["Out[0]: 0", "Out[1]: 100"]
    only_in(nb, "only on engine 1", "px-cell")
    assert text(cells["reference"]) == "Reference: [0, 10]\n"

    # load balancing: imap(ordered=False) yields the short tasks before the long one ends
    assert lines(cells["lb-map"]) == [f"map_sync: {[x * x for x in range(10)]}"]
    order, first = lines(cells["imap"])
    finished = ast.literal_eval(order.removeprefix("in completion order: "))
    assert sorted(finished) == [0.05, 0.1, 0.15, 1.0] and finished[0] != 1.0
    first_after = float(re.fullmatch(r"first result after ([\d.]+) s", first).group(1))
    assert first_after < 1.0

    # AsyncResult: wait's bool, the progress bar, metadata, get_dict
    md = lines(cells["metadata"])
    assert md[0] == "done within 0.05 s? False"
    assert re.fullmatch(r"result: 0\.3 - from engine [01]", md[1])
    assert md[2:] == [
        "elapsed >= 0.3 s: True - wall_time >= 0.3 s: True",
        "get_dict: [0, 1] -> True",
    ]
    assert_full_bar(nb, "metadata", 1)
    assert cells_with_widgets(nb) == {"metadata"}

    # dependencies
    assert lines(cells["require-depend"]) == [
        "require('math'): 5.0",
        "depend: ran on engines [1, 1, 1, 1]",
    ]
    assert lines(cells["after-follow"]) == [
        "after: started once the first was done: True",
        "follow: all on the anchor's engine: True",
    ]

    # errors: a CompositeError, its tracebacks in plain text without our frames
    err = text(cells["errors"])
    err_lines = err.splitlines()
    assert err_lines[0] == "CompositeError with 2 errors"
    assert err_lines[-1] == "raise_exception(): ZeroDivisionError division by zero - engine 0"
    assert err.count("Traceback (most recent call last):") == 2
    assert err.count("ZeroDivisionError: division by zero") >= 2
    assert "\x1b[" not in err
    assert "kernel_engine" not in err and "jupyter_ext" not in err

    # joblib, concurrent.futures, the with-block
    assert lines(cells["joblib"]) == [
        f"joblib squares: {[i * i for i in range(8)]}",
        "ran on the engines: True",
    ]
    assert lines(cells["executor"]) == [
        f"submit, as_completed: {[2**i for i in range(8)]}",
        "map: [3, 2, 1]",
    ]
    assert text(cells["with-cluster"]) == "script-style run: [45, 45]\n"

    # an engine that dies: a named EngineError, soon
    death, also_remote = lines(cells["engine-death"])
    m = re.fullmatch(r"EngineError after ([\d.]+) s: (.*)", death)
    assert m and float(m.group(1)) < 10, death
    assert re.search(r"engine 1 \(pid \d+\) exited with code 1", m.group(2)), death
    assert also_remote == "a RemoteError too: True"


# ----- scale out (MPI)


def test_scale_out():
    if shutil.which("mpiexec") is None:
        pytest.skip("no mpiexec (make system-deps installs Open MPI)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (the test extra has it)")
    nb = execute("scale_out.ipynb")
    assert errors(nb) == {}
    assert stderr_of(nb) == {}
    assert_common(nb, empty={"env", "load"})
    cells = by_id(nb)

    assert re.fullmatch(r"4 MPI engines ready in [\d.]+ s: \[0, 1, 2, 3\]\n", text(cells["start"]))
    assert lines(cells["ranks"]) == [f"engine {r}: rank {r} of 4" for r in range(4)]
    assert sorted(lines(cells["allreduce"])) == [
        f"[stdout:{r}] rank {r}: allreduce of rank + 1 = 10" for r in range(4)
    ]
    assert lines(cells["pull-total"]) == ["total on every engine: [10, 10, 10, 10]"]
    assert lines(cells["mpi-scatter"]) == [
        f"[stdout:0] gathered on rank 0: {[x * x for x in range(16)]}"
    ]
    parts, gathered = lines(cells["view-scatter"])
    assert parts == f"parts: {[list(range(r * 4, r * 4 + 4)) for r in range(4)]}"
    assert gathered == f"gathered: {[v * 10 + v // 4 for v in range(16)]}"
    logs, ran, says = lines(cells["logs"])
    assert logs == "logs: [0, 1, 2, 3, 'mpiexec-0']"
    assert ran.startswith("mpiexec ran: $ mpiexec ") and " -n 4 " in ran
    assert re.fullmatch(r"engine 3 says: registered with cluster \S+ as engine 3", says)
