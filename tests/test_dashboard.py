"""The dashboard, per-engine progress and ``jupyter px top``, where people look at them.

Pure: the HTML renderers, the per-engine tally and text, and when a dashboard counts as
seen (no processes). Real: ``jupyter px top --once`` (through the ``jupyter px`` entry
point) and live against a running cluster; the dashboard's error panel and every engine's
CPU and memory; a notebook kernel whose front end the test plays (subscribed from its
display while cells run, not once no view was counted for a while, nor after its output
is cleared, its widget closed, or the lease lapsed; ``%%px --progress-after``
interrupted ends as its HTML); a notebook executed by nbclient (never viewed: it stops
following, its outputs' HTML up to date); terminal
IPython (text renderings); ``notebooks/dashboard.ipynb`` executed by nbclient with its
widget state saved; JupyterLab in headless Chromium: the dashboard and the per-engine
bars during a map (screenshots in ``tests/artifacts/``), and the dashboard stopping when
its output is cleared.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
import zmq
from browser_support import chromium_page, require_browser, running_lab, write_notebook
from conftest import kill_pids, wait_gone
from jupyter_client import KernelManager
from nbclient import NotebookClient
from test_notebooks import WIDGET_STATE, WIDGET_VIEW, by_id, errors, execute, text

from jupyter_ext._dashboard import (
    Attention,
    Dashboard,
    Dashboards,
    engines_html,
    errors_html,
    sparkline_svg,
    status_html,
)
from jupyter_ext._engine_progress import (
    EngineCount,
    bars_html,
    describe,
    engine_lines,
    engine_state,
    share,
    tally,
)
from kernel_engine import protocol
from kernel_engine.top import render_text

ARTIFACTS = Path(__file__).parent / "artifacts"
STATUS: dict[str, Any] = {
    "cluster_id": "c1",
    "cluster": {"engines": 2, "busy": 1, "submitted": 9, "done": 7, "failed": 1},
    "engines": [
        {
            "id": 0,
            "state": "busy",
            "task": {"msg_id": "0123abcdef01", "name": "f<x>", "since": 100.0},
            "queue": 3,
            "done": 4,
            "failed": 0,
            "cpu": 97.5,
            "rss": 50 << 20,
            "host": "h",
        },
        {"id": 1, "state": "dead", "reason": "engine 1 (pid 9) was killed by signal SIGKILL"},
    ],
    "errors": [
        {
            "msg_id": "m",
            "engine_id": 1,
            "ename": "ValueError",
            "evalue": "<bad>",
            "traceback": ["\x1b[31mTraceback\x1b[0m", "ValueError: <bad>"],
        }
    ],
}


# ----- pure


def test_text_never_carries_control_characters() -> None:
    """A task's name or error (chosen by whoever wrote it) must not drive the terminal
    ``jupyter px top`` and terminal IPython print to: clipboard writes (OSC 52), the
    window's title, clearing the screen."""
    hostile = "\x1b]52;c;ZXZpbA==\x07\x1b]0;pwned\x07\x1b[2J\x9b1A"
    status = json.loads(json.dumps(STATUS))
    status["engines"][0]["task"]["name"] = hostile
    status["engines"][0]["host"] = hostile
    status["engines"][1]["reason"] = hostile
    status["errors"][0].update(ename=hostile, evalue=hostile)
    text = render_text(status, width=400, now=102.5)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), repr(text)
    assert "?]52;c;ZXZpbA==?" in text


class _Unanswering:
    """A client's transport whose controller never answers a status request (a stand-in:
    what is tested is the dashboard's waiting, not the transport)."""

    cluster_id = "c1"
    closed = False

    def __init__(self) -> None:
        self.asked = 0

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        self.asked += 1
        raise TimeoutError(f"no answer within {timeout} s")

    def add_status_handler(self, handler: Any) -> None:
        pass

    def remove_status_handler(self, handler: Any) -> None:
        pass


def test_a_controller_that_does_not_answer_is_not_asked_after_every_cell() -> None:
    transport = _Unanswering()
    dash = Dashboard(transport)  # type: ignore[arg-type]
    assert dash._fetch()["engines"] == [] and transport.asked == 1
    dash._static_bundle()
    dash._snapshot_display()
    assert transport.asked == 1, "not asked again within FETCH_BACKOFF"
    dash.status = {"cluster_id": "c1", "engines": [{"id": 0, "state": "idle"}]}
    dash._unanswered_until = 0.0
    assert dash._fetch() is dash.status, "the last status stands"
    # closing a client's dashboards: one request for all of them
    dashboards = Dashboards(transport)  # type: ignore[arg-type]
    shown = [dashboards.new() for _ in range(3)]
    for each in shown:
        each._displayed = True
    transport.asked = 0
    dashboards.close()
    assert transport.asked == 1 and all(each.closed for each in shown)


def test_html_renders_every_engine_escaped() -> None:
    html = engines_html(STATUS, now=102.5)
    assert html.count("class='px-engine'") == 2
    assert "data-engine='0' data-state='busy'" in html and "data-state='dead'" in html
    assert "f&lt;x&gt; (abcdef01)" in html and "2.5s" in html and "50.0 MiB" in html
    assert "98%" in html and "SIGKILL" in html
    errs = errors_html(STATUS)
    assert "<details" in errs and "ValueError: &lt;bad&gt;" in errs
    assert "\x1b" not in errs, "ANSI colours are stripped from tracebacks"
    assert "no errors" in errors_html({"errors": []})
    svg = sparkline_svg([0, 1, 2, 4])
    assert svg.startswith("<svg") and "points='0.0,34.0 80.0,26.0 160.0,18.0 240.0,2.0'" in svg
    whole = status_html(STATUS, "title<")
    assert "title&lt;" in whole and "7 done, 1 failed" in whole


def test_per_engine_tally() -> None:
    rows = [
        (0, 5, True, None),
        (0, 5, False, None),
        (1, 5, True, "KeyError"),
        (None, 10, False, None),
    ]
    counts, unplaced = tally(rows, engines=[0, 1, 2])
    assert unplaced == 10 and set(counts) == {0, 1, 2}
    assert (counts[0].done, counts[0].assigned) == (5, 10)
    assert counts[1].error == "KeyError" and counts[2] == EngineCount()
    each = share(unplaced, 3)
    assert each == 4 and counts[0].total(each) == 14 and counts[2].total(each) == 4
    assert describe(counts[1], 2.0) == "KeyError · 5 items · 2.5/s · 2.0 s"
    html = bars_html(counts, each, 2.0, ended=True)
    assert html.count("px-engine-bar") == 3 and "#c62828" in html  # (engine 1 in red)
    assert "data-state='failed'" in html and "KeyError" in html
    assert [engine_state(counts[e], 0) for e in (0, 1, 2)] == ["running", "failed", "done"]
    assert engine_state(counts[0], 0, interrupted=True) == "interrupted"
    assert engine_state(EngineCount(3, 3), 2) == "running"  # (its share of the unplaced)
    assert (
        engine_lines(counts, 0, 2.0)[1] == "engine 1: KeyError · 5 items · 2.5/s · 2.0 s · failed"
    )


def test_attention_follows_views_cells_and_the_lease() -> None:
    seen = Attention(lease=10.0)
    assert seen.lapsed(0.0) and not seen.seen, "never shown: nobody looks"
    seen.shown(1, now=100.0)
    assert seen.seen and not seen.lapsed(109.9) and seen.lapsed(110.0)
    seen.cell(True, now=105.0)  # a cell runs: a front end waits for it, however long
    assert not seen.lapsed(1000.0)
    seen.cell(False, now=1000.0)
    assert not seen.lapsed(1009.0) and seen.lapsed(1010.0)
    seen.shown(0, now=1011.0)
    assert seen.views == 0 and seen.seen
    seen.touch(2000.0)
    assert not seen.lapsed(2005.0)
    # followed before any view is counted (a widget front end is connected): the count
    # may wait behind queued cells, but not past a few seconds without one running
    early = Attention(lease=600.0, first_view=5.0)
    early.expect_view = True
    early.touch(0.0)
    early.cell(True, now=1.0)
    assert not early.lapsed(100.0)
    early.cell(False, now=100.0)
    assert not early.lapsed(104.0) and early.lapsed(105.0)
    early.shown(1, now=105.0)
    assert not early.lapsed(110.0), "once seen, the lease counts"


# ----- jupyter px top


JUPYTER = Path(sys.executable).with_name("jupyter")


def test_top_once_and_live(rc: Any) -> None:
    rc.load_balanced_view().map_sync(lambda x: x, range(10))
    cmd = [str(JUPYTER), "px", "top", "--cluster-id", rc.cluster_id]  # (the entry point)
    once = subprocess.run([*cmd, "--once"], capture_output=True, text=True, timeout=30)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[0].startswith(f"cluster {rc.cluster_id} · 2 engines")
    rows = [line.split() for line in lines if re.match(r"\d+\s+(idle|busy)", line)]
    assert [r[0] for r in rows] == ["0", "1"], once.stdout
    assert all(re.search(r"\d%", line) and "MiB" in line for line in lines[-2:]), once.stdout
    # live: a snapshot every --interval, until stopped (here by its PID)
    with subprocess.Popen(
        [*cmd, "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as live:
        try:
            assert live.stdout is not None
            seen: list[str] = []
            deadline = time.monotonic() + 20
            while len([s for s in seen if s.startswith("cluster ")]) < 2:
                assert time.monotonic() < deadline, seen
                seen.append(live.stdout.readline())
            assert any(s.startswith("engine  state") for s in seen)
        finally:
            live.terminate()
            try:
                live.wait(10)
            except subprocess.TimeoutExpired:
                kill_pids([live.pid])


# ----- the dashboard with a real cluster, in this process


def _row_html(html: str, eid: int) -> str:
    match = re.search(rf"<tr class='px-engine' data-engine='{eid}'.*?</tr>", html)
    assert match, html
    return match.group(0)


def test_the_dashboard_shows_errors_and_every_engines_cpu_and_memory(rc: Any) -> None:
    """Followed (a front end counts a view: the update it sends sets ``_view_count``),
    the dashboard's error panel names a failed task's engine and error, its traceback
    a click away, and every engine's CPU and memory cells are filled."""
    dash = Dashboard(rc.transport)
    box = dash.widget()
    try:
        assert not dash.active, "not shown yet: not following the stream"
        box.set_state({"_view_count": 1})
        assert dash.active
        with pytest.raises(Exception, match="ZeroDivisionError"):
            rc.load_balanced_view().apply_sync(lambda: 1 / 0)

        def complete(status: dict[str, Any] | None) -> bool:
            rows = (status or {}).get("engines") or []
            return (
                len(rows) == 2
                and all(isinstance(r["cpu"], float) and isinstance(r["rss"], int) for r in rows)
                and any(e["ename"] == "ZeroDivisionError" for e in status.get("errors", []))
            )

        deadline = time.monotonic() + 15
        while not complete(dash.status) and time.monotonic() < deadline:
            dash.wait_update(dash.updates, timeout=max(0.0, deadline - time.monotonic()))
        assert complete(dash.status), dash.status
        _, engines, errors = (child.value for child in box.children)
        for eid in (0, 1):
            cells = re.findall(r"<td[^>]*>(.*?)</td>", _row_html(engines, eid))
            cpu, memory = re.sub(r"<[^>]+>", " ", cells[7]), cells[8]
            assert re.search(r"\d+%", cpu) and re.fullmatch(r"\d+\.\d [KMG]iB", memory), cells
        error = next(e for e in dash.status["errors"] if e["ename"] == "ZeroDivisionError")
        eid = error["engine_id"]
        assert eid in (0, 1)
        panel = re.search(
            rf"<details class='px-error' data-engine='{eid}'>.*?</details>", errors, re.S
        )
        assert panel, errors
        assert f"engine {eid} · ZeroDivisionError: division by zero</summary>" in panel.group(0)
        traceback = re.search(r"<pre[^>]*>(.*)</pre>", panel.group(0), re.S)
        assert traceback and "ZeroDivisionError: division by zero" in traceback.group(1)
        box.set_state({"_view_count": 0})  # (its output cleared)
        assert not dash.active
    finally:
        dash.close()
    assert not dash.active and dash.closed


# ----- a notebook kernel, its front end played by the test


class Spy:
    """Counts the status messages the controller publishes (a SUB on every topic)."""

    def __init__(self, info: dict[str, Any]):
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"tcp://{info['ip']}:{info['iopub_port']}")

    def count(self, seconds: float, stop_at: int | None = None) -> int:
        """Statuses within ``seconds`` (or until ``stop_at`` of them)."""
        n = 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and (stop_at is None or n < stop_at):
            if self.sock.poll(int(left * 1000) + 1):
                n += self.sock.recv_multipart()[0] == protocol.STATUS_TOPIC
        return n

    def quiet(self) -> bool:
        """None published for a while after what was on its way (four periods)."""
        self.count(0.3)
        return self.count(4 * protocol.STATUS_EVERY) == 0

    def close(self) -> None:
        self.context.destroy(linger=0)


KERNEL_SETUP = """\
import jupyter_ext as jx
cluster = jx.Cluster(n=2)
rc = cluster.start_and_connect_sync()
%load_ext jupyter_ext
print(rc.connection_file)"""


def _run(kc: Any, code: str, timeout: float = 30) -> tuple[str, list[dict[str, Any]]]:
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok", (reply["content"], outputs)
    printed = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    return printed, outputs


def _iopub_until(kc: Any, done: Any, timeout: float) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(got) and (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(Exception):  # (queue.Empty)
            got.append(kc.get_iopub_msg(timeout=min(left, 0.5)))
    return got


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[Any, Any, dict[str, Any]]]:
    """A notebook kernel with a 2-engine cluster and a client in it; (manager, client,
    the cluster's connection info). Everything it started is stopped by PID."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    provisioner: Any = km.provisioner
    pids = [provisioner.process.pid]
    try:
        kc.wait_for_ready(timeout=30)
        printed, _ = _run(kc, KERNEL_SETUP, timeout=60)
        pids += [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
        info = json.loads(Path(printed.strip().splitlines()[-1]).read_text())
        yield km, kc, info
        _run(kc, "cluster.stop_cluster_sync()", timeout=30)
    finally:
        with contextlib.suppress(psutil.Error):
            pids += [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        kill_pids(wait_gone(pids, timeout=10))


SETTLED = (
    "import time as _t\n_end = _t.monotonic() + 5\n"
    "while rc.transport._status_subscribed != bool(rc.transport._status_handlers)"
    " and _t.monotonic() < _end:\n    _t.sleep(0.01)\n"
)
"""A cell's start that waits (5 s at most) for the client's subscription to follow its
handlers: the IO thread (un)subscribes a moment after a dashboard starts or stops."""


def _front_end(kc: Any, msg_type: str, comm_id: str, state: dict[str, Any] | None = None) -> None:
    """What a front end sends a widget: an update of its state, or its close."""
    data = {} if state is None else {"method": "update", "state": state, "buffer_paths": []}
    kc.shell_channel.send(kc.session.msg(msg_type, {"comm_id": comm_id, "data": data}))


def test_a_dashboard_follows_the_stream_only_while_a_front_end_shows_it(kernel: Any) -> None:
    _, kc, info = kernel
    spy = Spy(info)
    try:
        _, outputs = _run(kc, "dash = rc.dashboard()\ndash.attention.first_view = 2.0\ndash")
        [shown] = [m for m in outputs if m["msg_type"] == "display_data"]
        model_id = shown["content"]["data"][WIDGET_VIEW]["model_id"]
        assert "px-dashboard" in shown["content"]["data"]["text/html"]
        # followed from its display (a front end counts its view only after the cells
        # queued behind: a notebook run at once sees it live), while cells run
        _run(kc, "rc.load_balanced_view().map_sync(lambda x: x, range(20))")
        printed, _ = _run(kc, "print(dash.active, rc.transport._status_subscribed)")
        assert printed == "True True\n"
        # no view counted and no cell running for first_view seconds: nobody looks
        time.sleep(3.0)
        assert spy.quiet(), "the controller publishes for nobody"
        printed, _ = _run(
            kc, SETTLED + "print(dash.active, dash.paused, rc.transport._status_subscribed)"
        )
        assert printed == "False True False\n", "a cell run alone does not start it again"
        assert spy.quiet()

        _front_end(kc, "comm_msg", model_id, {"_view_count": 1})  # a front end shows it
        assert spy.count(5.0, stop_at=2) == 2
        printed, _ = _run(kc, "print(dash.active, dash.paused)")
        assert printed == "True False\n"

        _front_end(kc, "comm_msg", model_id, {"_view_count": 0})  # its output cleared
        printed, _ = _run(kc, SETTLED + "print(dash.active, rc.transport._status_subscribed)")
        assert printed == "False False\n"
        assert spy.quiet(), "publishing stops once the output is cleared"

        # shown again, then no sign of a front end for the lease (a tab closed)
        _run(kc, "dash.lease = 0.5")
        _front_end(kc, "comm_msg", model_id, {"_view_count": 1})

        def paused(got: list[dict[str, Any]]) -> bool:
            return any(
                m["msg_type"] == "comm_msg"
                and "updates paused" in str(m["content"]["data"].get("state", {}).get("value"))
                for m in got
            )

        assert paused(_iopub_until(kc, paused, timeout=15))
        assert spy.quiet(), "publishing stops once the lease lapsed"
        printed, _ = _run(kc, "print(dash.active, dash.paused)")
        assert printed == "True False\n", "a cell run is a sign of a front end: it resumes"
        _run(kc, "dash.lease = 600")

        _front_end(kc, "comm_close", model_id)  # the front end closes the widget
        printed, outputs = _run(
            kc, SETTLED + "print(dash.closed, dash.active, rc.transport._status_subscribed)"
        )
        assert printed == "True False False\n"
        assert spy.quiet()
    finally:
        spy.close()


def test_an_interrupted_px_progress_ends_as_its_html(kernel: Any) -> None:
    """``%%px --progress-after`` interrupted: its display is replaced by the bars' final
    (interrupted) state as HTML and text, no widget left to miss its state."""
    km, kc, _ = kernel
    msg_id = kc.execute("%%px --progress-after 0\nimport time\ntime.sleep(30)")

    def shown(got: list[dict[str, Any]]) -> bool:
        return any(
            m["msg_type"] == "display_data" and WIDGET_VIEW in m["content"]["data"] for m in got
        )

    got = _iopub_until(kc, shown, timeout=15)
    [first] = [m for m in got if m["msg_type"] == "display_data"]
    assert "px-engine-progress" in first["content"]["data"]["text/html"]  # (from the start)
    display_id = first["content"]["transient"]["display_id"]
    km.interrupt_kernel()

    def idle(got: list[dict[str, Any]]) -> bool:
        return any(
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == msg_id
            and m["content"]["execution_state"] == "idle"
            for m in got
        )

    got += _iopub_until(kc, idle, timeout=15)
    assert idle(got)
    updates = [
        m
        for m in got
        if m["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == display_id
    ]
    assert updates, [m["msg_type"] for m in got]
    final = updates[-1]["content"]["data"]
    assert WIDGET_VIEW not in final
    assert "(interrupted)" in final["text/html"] and "data-engine='1'" in final["text/html"]
    assert re.search(r"engine 0: .* · interrupted$", final["text/plain"], re.M), final

    printed, _ = _run(kc, "print(rc[:].apply_sync(lambda: 'free'))", timeout=20)
    assert printed == "['free', 'free']\n"


# ----- a notebook executed headless (nbclient): never viewed


NOTEBOOK_CELLS = [
    "import jupyter_ext as jx\ncluster = jx.Cluster(n=2)\nrc = cluster.start_and_connect_sync()",
    "dash = rc.dashboard()\ndash.attention.first_view = 0.5\ndash",
    "ar = rc.load_balanced_view().map(lambda x: x, range(30), chunksize=1)\nar.wait_interactive()",
    "print('following:', dash.active, rc.transport._status_subscribed)",
    "cluster.stop_cluster_sync()",
]


def test_a_headless_notebook_saves_the_latest_state_and_stops_following() -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": ""}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    client = NotebookClient(
        nb, timeout=60, kernel_name="python3", allow_errors=True, store_widget_state=True
    )
    pids: list[int] = []
    with client.setup_kernel():
        manager: Any = client.km
        pids.append(manager.provisioner.process.pid)
        try:
            for index, cell in enumerate(nb.cells[:4]):
                if index == 3:  # (no cell running for a while: nothing views it)
                    time.sleep(2.0)
                client.execute_cell(cell, index)
                pids += [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
            assert errors(nb) == {}
            assert text(nb.cells[3]) == "following: False False\n"
            # the dashboard's output: its widget beside the latest state as HTML and text
            [shown] = nb.cells[1].outputs
            assert WIDGET_VIEW in shown.data
            assert sum(_done_counts(shown.data["text/html"]).values()) == 30
            assert "30 done, 0 failed" in shown.data["text/plain"]
            # the progress bar's display carries its final state as HTML and text
            [bar] = [o for o in nb.cells[2].outputs if o.output_type == "display_data"]
            assert "30/30 tasks" in bar.data["text/html"] and "(done)" in bar.data["text/plain"]
            client.execute_cell(nb.cells[4], 4)
        finally:
            with contextlib.suppress(psutil.Error):
                pids += [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
    kill_pids(wait_gone(pids, timeout=10))


# ----- terminal IPython (no widget front end)


def test_terminal_ipython_prints_engine_bars_and_the_dashboard(rc: Any) -> None:
    code = (
        "import jupyter_ext as jx\n"
        f"rc = jx.Client({rc.connection_file!r})\n"
        "ar = rc.load_balanced_view().map(lambda x: x, range(20), chunksize=1)\n"
        "ar.wait_interactive(per_engine=True)\n"
        "dash = rc.dashboard()\n"
        "dash"
    )
    ipython = Path(sys.executable).with_name("ipython")
    run = subprocess.run(
        [
            str(ipython),
            "--no-banner",
            "--colors=NoColor",
            "--HistoryManager.enabled=False",
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    lines = re.findall(r"^  engine (\d): (\d+) items · .* · (\w+)$", out, re.M)
    assert {e for e, _, _ in lines} == {"0", "1"}, out
    assert all(state == "done" for *_, state in lines) and sum(int(n) for _, n, _ in lines) == 20
    assert "20/20 tasks" in out and "(done)" in out
    # the dashboard: its text rendering, a line per engine with its state and counts
    assert "engine  state" in out, out
    rows = re.findall(r"^(\d+)\s+(idle|busy)\s", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"], out


# ----- the notebook, headless


def _models(nb: Any) -> dict[str, Any]:
    state: dict[str, Any] = nb.metadata["widgets"][WIDGET_STATE]["state"]
    return state


def _done_counts(html: str) -> dict[int, int]:
    rows = re.findall(r"data-engine='(\d+)'.*?class='px-done'>(\d+)<", html)
    return {int(e): int(n) for e, n in rows}


def test_dashboard_notebook() -> None:
    nb = execute("dashboard.ipynb")
    assert errors(nb) == {}
    cells = by_id(nb)
    assert text(cells["start"]) == "2 engines ready: [0, 1]\n"
    assert (
        text(cells["per-engine"], results=False)
        == f"sum of squares: {sum(x * x for x in range(40))}\n"
    )
    assert text(cells["failing"], results=False) == "all succeeded: False\n"
    status_lines = text(cells["status"]).splitlines()
    printed = {
        int(m[1]): int(m[2])
        for m in (re.match(r"engine (\d+): idle, (\d+) done", s) for s in status_lines)
        if m
    }
    assert set(printed) == {0, 1} and sum(printed.values()) == 40 + 5 + 2, status_lines
    assert status_lines[-1] == "errors: ['ZeroDivisionError']"
    assert text(cells["top"]) == "tasks: 48 submitted, 0 queued, 0 on engines, 47 done, 1 failed\n"
    assert text(cells["stop"]) == "cluster stopped: True\n"

    # the dashboard's widgets hold its final state: every engine, its done count
    models = _models(nb)
    tables = [
        m["state"]["value"]
        for m in models.values()
        if m["model_name"] == "HTMLModel" and "px-engines" in m["state"].get("value", "")
    ]
    assert len(tables) == 2  # (rc.dashboard()'s, and the one rc's display shows)
    assert all(_done_counts(table) == printed for table in tables)
    # ... and its output became the static snapshot of that state (no empty widget box)
    [shown] = [o for o in cells["dashboard"].outputs if o.output_type == "display_data"]
    assert WIDGET_VIEW not in shown.data
    assert _done_counts(shown.data["text/html"]) == printed
    assert "ZeroDivisionError" in shown.data["text/html"]
    assert "engine  state" in shown.data["text/plain"]

    # the client's rich display: the live view under its summary while the client is
    # open; once it closed, the static snapshot of the final state under that summary
    [client] = cells["client"].outputs
    assert WIDGET_VIEW not in client.data and "jupyter_ext.Client" in client.data["text/html"]
    assert "px-dashboard" in client.data["text/html"] and client.data["text/plain"].startswith(
        "<Client cluster="
    )
    assert _done_counts(client.data["text/html"]) == printed

    # per-engine bars: one per engine, full; red with the error's name where one failed
    bars = {
        (m["state"]["description"], m["state"]["value"], m["state"]["max"], m["state"]["bar_style"])
        for m in models.values()
        if m["model_name"] == "IntProgressModel"
    }
    per_engine = [b for b in bars if b[0].startswith("engine ")]
    assert ("slow_square", 40, 40, "success") in bars and ("px", 2, 2, "success") in bars
    assert ("inverse", 6, 6, "danger") in bars
    assert sum(1 for b in per_engine if b[3] == "danger") == 1
    assert all(b[1] == b[2] for b in per_engine if b[3] == "success")
    failing = cells["failing"].outputs[0].data
    assert "ZeroDivisionError" in failing["text/html"] and "#c62828" in failing["text/html"]
    for cell_id in ("per-engine", "failing", "px"):
        [out] = [o for o in cells[cell_id].outputs if o.output_type == "display_data"]
        assert WIDGET_VIEW not in out.data and "engine 0" in out.data["text/plain"]


# ----- JupyterLab in headless Chromium

KERNEL_STATUS = "#jp-main-statusbar .jp-StatusBar-TextItem[title^='Change kernel']"
PROMPTS = ".jp-Notebook .jp-Cell .jp-InputPrompt"
CELLS = [
    "import time, jupyter_ext as jx\n"
    "cluster = jx.Cluster(n=2)\n"
    "rc = cluster.start_and_connect_sync()\n"
    "lview = rc.load_balanced_view()",
    "dash = rc.dashboard()\ndash",
    "amr = lview.map(lambda x: (time.sleep(0.3), x)[1], range(16), chunksize=1)\n"
    "amr.wait_interactive(per_engine=True)",
    "print('dashboard active:', dash.active)",
    # (the words apart in the source: the editor shows it too, and the wait below must
    # find the output alone)
    "cluster.stop_cluster_sync()\nprint('cluster', 'stopped')",
]
BARS_JS = """() => [...document.querySelectorAll('.jupyter-px-engine-bar')].map(box => ({
    label: box.querySelector('.widget-label')?.textContent,
    width: box.querySelector('.progress-bar')?.style.width,
}))"""


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"))


def _done_total(page: Any) -> int:
    return sum(int(t) for t in page.locator(".jupyter-px-dashboard .px-done").all_inner_texts())


def test_dashboard_and_engine_bars_in_jupyterlab(tmp_path: Path) -> None:
    require_browser()
    t0 = time.monotonic()
    with running_lab(tmp_path) as lab, chromium_page(width=1280, height=900) as page:
        write_notebook(lab.notebooks / "dashboard.ipynb", CELLS)
        try:
            _drive(page, lab)
        except Exception:
            with contextlib.suppress(Exception):
                _shot(page, "failed")
            print(f"screenshot: {ARTIFACTS / 'dashboard-failed.png'}; log:\n{lab.log()}")
            raise
        pids = lab.track()
        cmdlines = list(pids.values())
        assert sum("-m kernel_engine.controller" in c for c in cmdlines) == 1, pids
    print(f"dashboard browser test: {time.monotonic() - t0:.1f} s")


def _drive(page: Any, lab: Any) -> None:
    page.goto(lab.url("lab/tree/dashboard.ipynb"), timeout=30_000)
    page.locator(KERNEL_STATUS, has_text="| Idle").wait_for(timeout=30_000)
    lab.track()
    prompts = page.locator(PROMPTS)
    prompts.first.click()
    for _ in range(2):
        page.keyboard.press("Shift+Enter")
    dashboard = page.locator(".jupyter-px-dashboard")
    dashboard.wait_for(timeout=30_000)
    lab.track()  # the controller and the engines
    # (the count of its view reaches the kernel once no cell queued before it runs)
    page.locator(KERNEL_STATUS, has_text="| Idle").wait_for(timeout=30_000)
    page.keyboard.press("Shift+Enter")
    # during the map: both engines busy on the dashboard, one bar per engine moving
    dashboard.locator(".px-engine[data-state='busy']").nth(1).wait_for(timeout=20_000)
    page.locator(".jupyter-px-engine-bar").nth(1).wait_for(timeout=20_000)
    deadline = time.monotonic() + 20
    bars: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        bars = page.evaluate(BARS_JS)
        if len(bars) == 2 and all(0 < float(b["width"].rstrip("%") or 0) < 100 for b in bars):
            break
        time.sleep(0.05)
    assert [b["label"] for b in bars] == ["engine 0", "engine 1"], bars
    assert all(0 < float(b["width"].rstrip("%")) < 100 for b in bars), bars
    assert dashboard.locator(".px-engine").count() == 2
    _shot(page, "during-map")
    # after: the bars become a static snapshot, full; the dashboard counts every item
    finished = page.locator(".px-engine-progress")
    finished.wait_for(timeout=30_000)
    assert "engine 0" in finished.inner_text() and "engine 1" in finished.inner_text()
    deadline = time.monotonic() + 10
    while _done_total(page) < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _done_total(page) == 16
    assert dashboard.locator(".px-engine[data-state='idle']").count() == 2
    assert dashboard.locator(".px-sparkline").count() == 1
    _shot(page, "after-map")
    # clearing the dashboard's output stops its updates
    prompts.nth(1).click()
    page.keyboard.press("Control+Shift+C")
    page.locator("#command-palette .lm-CommandPalette-input").fill("Clear Cell Output")
    page.keyboard.press("Enter")
    dashboard.wait_for(state="detached", timeout=10_000)
    prompts.nth(3).click()
    page.keyboard.press("Shift+Enter")
    page.get_by_text("dashboard active: False").wait_for(timeout=20_000)
    page.keyboard.press("Shift+Enter")
    page.get_by_text("cluster stopped", exact=True).wait_for(timeout=30_000)
