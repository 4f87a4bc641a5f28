"""The JupyterLab extension: the Clusters sidebar in a real JupyterLab and headless Chromium.

Through the panel only: create a 1-engine cluster and start it, scale it to 2, see an API
error shown, insert client code into a new notebook and run it, stop the cluster and find
its controller gone. The extension is the prebuilt one in ``jupyter_ext/labextension``, as
``jupyter px install`` puts it in the environment (no node involved). Screenshots go to
``tests/artifacts/labextension-*.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from browser_support import (
    JupyterLab,
    chromium_page,
    disable_lab_extensions,
    require_browser,
    running_lab,
)
from conftest import wait_gone

from kernel_engine import kernelspec

ARTIFACTS = Path(__file__).parent / "artifacts"
BUILT = Path(__file__).parent.parent / "jupyter_ext" / "labextension"
SOURCES = Path(__file__).parent.parent / "labextension"

PANEL = "#jupyter-px-clusters"
PANEL_TAB = ".jp-SideBar .lm-TabBar-tab[data-id='jupyter-px-clusters']"
KERNEL_STATUS = "#jp-main-statusbar .jp-StatusBar-TextItem[title^='Change kernel']"
PALETTE_INPUT = "#command-palette .lm-CommandPalette-input"
PYTHON_CARD = ".jp-LauncherCard[data-category='Notebook'][title='Python 3 (ipykernel)']"
# IPython Parallel's own sidebar, installed here for benchmarks: not in these screenshots
IPP_EXTENSION = "ipyparallel-labextension"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[JupyterLab]:
    require_browser()  # fails (does not skip) without /usr/bin/chromium or playwright
    with running_lab(tmp_path) as started:
        yield started


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"labextension-{name}.png"))


def _row_text(row: Any, field: str) -> str:
    return str(row.locator(f".jp-px-Cluster-{field}").inner_text()).strip()


def _wait_row(row: Any, done: Any, timeout: float = 60.0) -> None:
    """Wait until ``done`` (a locator) shows; fail at once with the row's error if it
    shows one instead."""
    failed = row.locator(".jp-px-Error:visible")
    done.or_(failed).first.wait_for(timeout=timeout * 1000)
    if failed.count():
        raise AssertionError(f"the panel shows an error: {failed.inner_text()}")


def _sources_digest() -> str:
    """What labextension/stamp.mjs writes at build time, from the sources as they are."""
    digest = hashlib.sha256()
    paths = []
    for name in ("package.json", "tsconfig.json", "src", "style"):
        top = SOURCES / name
        paths += [p for p in top.rglob("*") if p.is_file()] if top.is_dir() else [top]
    for rel in sorted(p.relative_to(SOURCES).as_posix() for p in paths):
        digest.update(rel.encode() + b"\0" + (SOURCES / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def test_built_extension_matches_its_sources() -> None:
    """The committed build is from the sources as they are (no node needed to check)."""
    stamp = (BUILT / "sources.sha256").read_text().strip()
    assert stamp == _sources_digest(), (
        "jupyter_ext/labextension is older than labextension/: rebuild it "
        "(cd labextension && npm ci && PATH=../.venv/bin:$PATH npm run build)"
    )


def test_built_extension_is_installed() -> None:
    """The committed build is complete, and JupyterLab finds it enabled in this env."""
    meta = json.loads((BUILT / "package.json").read_text())
    assert meta["name"] == kernelspec.LABEXTENSION
    assert (BUILT / meta["jupyterlab"]["_build"]["load"]).is_file()
    listed = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    lines = [line for line in listed.stderr.splitlines() if "jupyter-px" in line]
    assert lines, listed.stderr
    assert "enabled" in lines[0] and "OK" in lines[0], lines


def test_install_links_the_built_extension(tmp_path: Path) -> None:
    """In a source tree ``jupyter px install`` links the build where Lab looks for it."""
    prefix = str(tmp_path / "prefix")
    where = kernelspec.install_labextension(prefix=prefix)
    dest = tmp_path / "prefix/share/jupyter/labextensions/jupyter-px"
    assert where == str(dest)
    assert (dest / "package.json").read_text() == (BUILT / "package.json").read_text()
    assert kernelspec.install_labextension(prefix=prefix) == where  # idempotent
    # whatever was there (an old copy) is replaced
    dest.unlink()
    (dest / "static").mkdir(parents=True)
    (dest / "package.json").write_text("{}")
    kernelspec.install_labextension(prefix=prefix)
    assert dest.is_symlink()
    assert dest.resolve() == BUILT.resolve()


def test_clusters_panel_in_jupyterlab(lab: JupyterLab) -> None:
    disable_lab_extensions(lab, IPP_EXTENSION)
    t0 = time.monotonic()
    with chromium_page(width=1280, height=800) as page:
        try:
            _drive_panel(page, lab)
        except Exception:
            with contextlib.suppress(Exception):
                _shot(page, "failed")
            print(f"screenshot: {ARTIFACTS / 'labextension-failed.png'}; log:\n{lab.log()}")
            raise
    pids = lab.track()
    left = lab.stop()
    assert not left, f"processes left running after JupyterLab stopped (killed): {left}"
    cmdlines = list(pids.values())
    assert sum("-m kernel_engine.controller" in c for c in cmdlines) == 1, pids
    # (engines forked from a template show its command line: one more such process)
    template = any("kernel_engine.engine.template" in c for c in cmdlines)
    assert sum("-m kernel_engine.engine" in c for c in cmdlines) - template == 2, pids
    print(f"clusters panel test: {time.monotonic() - t0:.1f} s")


def _drive_panel(page: Any, lab: JupyterLab) -> None:
    page.goto(lab.url("lab"), timeout=30_000)
    page.locator(PANEL_TAB).click()
    panel = page.locator(PANEL)
    panel.wait_for(state="visible")
    panel.locator(".jp-px-Empty").get_by_text("No clusters").wait_for()

    # a new 1-engine cluster: listed as stopped, then started from its row
    panel.locator(".jp-px-New-count").fill("1")
    panel.get_by_role("button", name="New cluster").click()
    row = panel.locator(".jp-px-Cluster")
    row.and_(page.locator("[data-state='stopped']")).wait_for()
    cluster_id = row.get_attribute("data-cluster-id")
    assert cluster_id, "the row has no cluster id"
    assert _row_text(row, "pid") == "—"
    assert row.locator(".jp-px-Cluster-count").input_value() == "1"
    _shot(page, "stopped")
    row.get_by_role("button", name="Start").click()
    _wait_row(row, row.and_(page.locator("[data-state='running']")))
    assert _row_text(row, "state") == "running"
    assert _row_text(row, "engines") == "1"
    controller_pid = int(_row_text(row, "pid"))
    assert psutil.pid_exists(controller_pid)
    lab.track()  # the controller and its engine
    _shot(page, "running")

    # scale to 2: the row says 2 engines once they are ready
    row.locator(".jp-px-Cluster-count").fill("2")
    row.get_by_role("button", name="Scale").click()
    _wait_row(row, row.locator(".jp-px-Cluster-engines").get_by_text("2", exact=True))
    lab.track()

    # an invalid engine count: the server's message is shown in the row, nothing changes
    row.locator(".jp-px-Cluster-count").fill("-1")
    row.get_by_role("button", name="Scale").click()
    error = row.locator(".jp-px-Error")
    error.wait_for(state="visible")
    assert "n must be between 0 and 4096, not -1" in error.inner_text()
    _shot(page, "error")
    assert _row_text(row, "engines") == "2"

    # no notebook open yet: inserting client code says so
    row.get_by_role("button", name="Insert client code").click()
    error.get_by_text("Open a notebook first").wait_for()

    # a new notebook from the launcher; the client code goes into it and runs
    page.locator(PYTHON_CARD).click()
    page.locator(KERNEL_STATUS, has_text="| Idle").wait_for(timeout=30_000)
    lab.track()  # the notebook's kernel
    row.get_by_role("button", name="Insert client code").click()
    cell = page.locator(".jp-Notebook .jp-Cell").first
    cell.get_by_text(f'jx.Cluster.from_file("{cluster_id}")').wait_for()
    assert "rc.wait_for_engines(2)" in cell.inner_text()
    page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").first.click()
    page.keyboard.press("Shift+Enter")  # runs it; a new cell below, in edit mode
    page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-InputArea-editor").click()
    page.keyboard.type("rc.ids")
    page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea-output")
    output.get_by_text("[0, 1]", exact=True).wait_for(timeout=60_000)
    _shot(page, "notebook")

    # the same from the command palette, into the notebook's next (empty) cell
    page.keyboard.press("Control+Shift+C")
    page.locator(PALETTE_INPUT).fill("Insert Cluster Client Code")
    page.keyboard.press("Enter")
    third = page.locator(".jp-Notebook .jp-Cell").nth(2)
    third.get_by_text(f'jx.Cluster.from_file("{cluster_id}")').wait_for()

    # stop: the row goes away, the controller exits
    row.get_by_role("button", name="Stop").click()
    _wait_row(row, panel.locator(".jp-px-Empty:visible"))
    assert not wait_gone([controller_pid], timeout=15), f"controller {controller_pid} runs"
    panel.locator(".jp-px-Empty").wait_for()
