"""The dashboard, per-engine progress and ``jupyter px top``, where people look at them.

Pure: the HTML renderers and the per-engine tally (no processes). Real: ``jupyter px top
--once`` (and live) against a running cluster; ``notebooks/dashboard.ipynb`` executed by
nbclient with its widget state saved (the dashboard's final state, every engine and its
done count, in the widget models; the static snapshot in the outputs); JupyterLab in
headless Chromium: the dashboard and the per-engine bars during a map (screenshots in
``tests/artifacts/``), and the dashboard stopping when its output is cleared.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from browser_support import chromium_page, require_browser, running_lab, write_notebook
from conftest import kill_pids
from test_notebooks import WIDGET_STATE, WIDGET_VIEW, by_id, errors, execute, text

from jupyter_ext._dashboard import engines_html, errors_html, sparkline_svg, status_html
from jupyter_ext._engine_progress import EngineCount, bars_html, describe, share, tally

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


# ----- jupyter px top


def test_top_once_and_live(rc: Any) -> None:
    rc.load_balanced_view().map_sync(lambda x: x, range(10))
    cmd = [sys.executable, "-m", "kernel_engine.cli", "top", "--cluster-id", rc.cluster_id]
    once = subprocess.run([*cmd, "--once"], capture_output=True, text=True, timeout=30)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[0].startswith(f"cluster {rc.cluster_id} · 2 engines")
    rows = [line.split() for line in lines if re.match(r"\d+\s+(idle|busy)", line)]
    assert [r[0] for r in rows] == ["0", "1"], once.stdout
    # live: a snapshot every --interval, until stopped (here by its PID)
    with subprocess.Popen(
        [*cmd, "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as live:
        try:
            assert live.stdout is not None
            seen = []
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
    for _ in range(3):
        page.keyboard.press("Shift+Enter")
    dashboard = page.locator(".jupyter-px-dashboard")
    dashboard.wait_for(timeout=30_000)
    lab.track()  # the controller and the engines
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
