"""JupyterLab in a real process, and the processes it starts, for browser tests.

JupyterLab runs on 127.0.0.1 with a token and every Jupyter folder in a temporary
directory. Processes it starts (kernels, and what they start) are tracked by PID, so that
stopping the server can check each of them is gone; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kernel_engine import ports

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def require_browser() -> None:
    """Fail (not skip) with a clear message when Chromium or playwright is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's Chromium "
            "(apt-get install -y --no-install-recommends chromium)",
            pytrace=False,
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "playwright is not installed: pip install playwright "
            "(never `playwright install`: the test uses /usr/bin/chromium)",
            pytrace=False,
        )
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        pytest.fail("jupyterlab is not installed: pip install jupyterlab", pytrace=False)


def free_port() -> int:
    """A free port outside the ephemeral range, where an outgoing connection cannot take
    it before the server binds it (see kernel_engine.ports)."""
    return ports.PICKER.take("127.0.0.1")


def write_notebook(path: Path, sources: list[str]) -> None:
    cells = [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": f"cell-{i}",
            "metadata": {},
            "outputs": [],
            "source": source,
        }
        for i, source in enumerate(sources)
    ]
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {
                "name": "python3",
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
            },
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1))


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:160]
    except psutil.Error:
        return "?"


class JupyterLab:
    """A JupyterLab server process; ``stop()`` checks all it started has exited."""

    def __init__(self, root: Path, start_timeout: float = 30.0):
        self.root = root
        self.notebooks = root / "notebooks"
        self.config_dir = root / "config"
        self.runtime_dir = root / "runtime"
        for folder in (self.notebooks, self.config_dir / "labconfig", self.runtime_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # no "would you like to receive Jupyter news?" pop-up over the notebook
        (self.config_dir / "labconfig" / "page_config.json").write_text(
            json.dumps(
                {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
            )
        )
        self.log_path = root / "jupyterlab.log"
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: dict[int, str] = {}  # every descendant of the server ever seen
        try:
            self._start(start_timeout)
        except BaseException:
            self.stop()  # (whatever went wrong: nothing it started stays)
            raise

    def _start(self, timeout: float) -> None:
        env = dict(os.environ)
        env["JUPYTER_CONFIG_DIR"] = str(self.config_dir)
        env["JUPYTER_RUNTIME_DIR"] = str(self.runtime_dir)
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.notebooks}",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.notebooks, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"JupyterLab exited:\n{self.log()}", pytrace=False)
            try:
                if "started" in self.api("status", timeout=2):
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass  # (not answering yet; or not JupyterLab: the port's holder then)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"JupyterLab not answering /api/status after {timeout} s:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def api(self, path: str, timeout: float = 5.0) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}", headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}?token={self.token}"

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def track(self) -> dict[int, str]:
        """Record the server's current descendants (kernel, controller, engines...)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.pids
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return self.pids
        for child in children:
            if child.pid not in self.pids:
                self.pids[child.pid] = _describe(child.pid)
        return self.pids

    def stop(self, timeout: float = 15.0) -> dict[int, str]:
        """Stop the server by PID, wait for everything it started to exit.

        Returns the processes (PID: command line) that were still running after
        ``timeout`` seconds; those have then been killed by PID.
        """
        if self.proc is None:
            return {}
        self.track()
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        deadline = time.monotonic() + timeout
        left = [pid for pid in self.pids if _running(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in left if _running(pid)]
        survivors = {pid: self.pids[pid] for pid in left}
        for pid in survivors:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        return survivors


@contextlib.contextmanager
def running_lab(root: Path) -> Iterator[JupyterLab]:
    """A JupyterLab in ``root``; on exit stops it and fails if anything it started is left
    running (those are killed by PID)."""
    lab = JupyterLab(root)
    try:
        yield lab
    finally:
        left = lab.stop()  # a no-op if the test stopped it already
        if left:
            pytest.fail(f"processes left running after JupyterLab stopped (killed): {left}")


def disable_lab_extensions(lab: JupyterLab, *names: str) -> None:
    """Turn off these JupyterLab front-end extensions (or plugins) for pages loaded from
    now on: Lab reads ``page_config.json`` on every page load."""
    path = lab.config_dir / "labconfig" / "page_config.json"
    config = json.loads(path.read_text())
    config.setdefault("disabledExtensions", {}).update(dict.fromkeys(names, True))
    path.write_text(json.dumps(config))


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 720, timeout: float = 30.0) -> Iterator[Any]:
    """A playwright page in headless Chromium (/usr/bin/chromium), closed on exit; every
    wait on it is bounded by ``timeout`` seconds unless told otherwise."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout * 1000)
            yield page
        finally:
            browser.close()
