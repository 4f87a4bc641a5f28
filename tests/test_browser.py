"""End to end in a real browser: JupyterLab, a notebook kernel, a cluster, a progress bar.

JupyterLab and headless Chromium (Debian's /usr/bin/chromium, driven by playwright) run
as real processes. The notebook starts a 2-engine cluster, maps 20 tasks of 0.4 s and
calls ``wait_interactive()``: the ipywidgets bar must render, advance while the cell
blocks, never go back, end at 100% with "20/20" beside it. Afterwards the kernel, the
controller and the engines must all have exited.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, JupyterLab, require_browser, write_notebook

ARTIFACTS = Path(__file__).parent / "artifacts"

CELLS = [
    "import time, jupyter_ext as jx\n"
    "cluster = jx.Cluster(n=2)\n"
    "rc = cluster.start_and_connect_sync()\n"
    "v = rc.load_balanced_view()",
    "ar = v.map(lambda x: (time.sleep(0.4), x)[1], range(20))\nar.wait_interactive()",
    "cluster.stop_cluster_sync()\nprint('cluster stopped', sum(ar.get()))",
]

KERNEL_STATUS = "#jp-main-statusbar .jp-StatusBar-TextItem[title^='Change kernel']"
PROMPTS = ".jp-Notebook .jp-Cell .jp-InputPrompt"

# The bar's width and the text of the HTML widget beside it (the HBox's other child).
SAMPLE_JS = """() => {
    const bar = document.querySelector('.widget-hprogress .progress-bar');
    if (!bar) return null;
    const box = bar.closest('.widget-hbox');
    const html = box && box.querySelector('.widget-html');
    return {width: bar.style.width, text: html ? html.textContent : ''};
}"""


@pytest.fixture
def start_lab(tmp_path: Path) -> Iterator[Callable[[], JupyterLab]]:
    """Starts JupyterLab; at the end stops it and checks all it started is gone."""
    labs: list[JupyterLab] = []

    def start() -> JupyterLab:
        labs.append(JupyterLab(tmp_path))
        return labs[-1]

    yield start
    for lab in labs:
        left = lab.stop()  # a no-op if the test stopped it already
        if left:
            pytest.fail(f"processes left running after JupyterLab stopped (killed): {left}")


def _percent(width: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)%\s*", width)
    assert match, f"unexpected progress bar width {width!r}"
    return float(match.group(1))


def _wait_all_cells_queued(page: Any, n: int, timeout: float = 10.0) -> None:
    """Every cell shows [*] or [k]: none of the runs was dropped by the frontend."""
    prompts: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prompts = page.locator(PROMPTS).all_text_contents()[:n]
        if len(prompts) == n and not any("[ ]" in p for p in prompts):
            return
        time.sleep(0.05)
    raise AssertionError(f"not every cell was run (input prompts: {prompts})")


def test_wait_interactive_progress_bar_in_jupyterlab(
    start_lab: Callable[[], JupyterLab],
) -> None:
    require_browser()  # fails (does not skip) without /usr/bin/chromium or playwright
    from playwright.sync_api import sync_playwright

    lab = start_lab()
    write_notebook(lab.notebooks / "progress.ipynb", CELLS)
    t0 = time.monotonic()
    widths: list[float] = []
    texts: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(30_000)
        try:
            page.goto(lab.url("lab/tree/progress.ipynb"), timeout=30_000)
            # The toolbar's indicator says 'idle' from the start, before the notebook has a
            # kernel (then 'initializing', 'connecting', 'unknown', 'idle'): a cell run that
            # early is silently dropped. The status bar says "| Idle" only once connected.
            page.locator(KERNEL_STATUS, has_text="| Idle").wait_for(timeout=30_000)
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000
            )
            lab.track()  # the notebook's kernel
            # command mode on the first cell, then run the three cells one after another
            page.locator(PROMPTS).first.click()
            for _ in CELLS:
                page.keyboard.press("Shift+Enter")
            _wait_all_cells_queued(page, len(CELLS))
            page.wait_for_selector(".widget-hprogress .progress-bar", timeout=30_000)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sample = page.evaluate(SAMPLE_JS)
                lab.track()  # the controller and engines, while the cluster runs
                if sample is not None:
                    percent = _percent(sample["width"])
                    if not widths or percent != widths[-1] or sample["text"] != texts[-1]:
                        widths.append(percent)
                        texts.append(sample["text"])
                    if percent >= 100 and "20/20" in sample["text"]:
                        break
                time.sleep(0.05)
            page.get_by_text("cluster stopped 190").wait_for(timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "progress.png"))
        except Exception:
            failed = ARTIFACTS / "progress-failed.png"
            with contextlib.suppress(Exception):
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(failed), timeout=5_000)
            print(f"screenshot: {failed}; JupyterLab log:\n{lab.log()}")
            raise
        finally:
            browser.close()

    history = list(zip(widths, texts))
    print(f"progress bar samples after {time.monotonic() - t0:.1f} s: {history}")
    assert widths, "the progress bar never showed a width"
    assert any(0 < w < 100 for w in widths), f"the bar did not advance gradually: {history}"
    assert all(a <= b for a, b in itertools.pairwise(widths)), f"the bar went back: {history}"
    assert widths[-1] == 100, f"the bar did not reach 100%: {history}"
    assert re.match(r"20/20 tasks", texts[-1]), f"done/total text is not 20/20: {history}"

    # what the server started: its kernel, the kernel's controller, the controller's engines
    cmdlines = list(lab.pids.values())
    assert sum("-m ipykernel_launcher" in c for c in cmdlines) == 1, f"kernel? {lab.pids}"
    assert sum("-m kernel_engine.controller" in c for c in cmdlines) == 1, f"ctl? {lab.pids}"
    # (engines forked from a template show its command line: one more such process)
    template = any("kernel_engine.engine.template" in c for c in cmdlines)
    engines = sum("-m kernel_engine.engine" in c for c in cmdlines) - template
    assert engines == 2, f"engines? {lab.pids}"
    left = lab.stop()
    assert not left, f"processes left running after JupyterLab stopped (killed): {left}"
    assert time.monotonic() - t0 < 60
