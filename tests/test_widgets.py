"""Widgets made on engines live in the notebook that drives them (real kernels, no mocks).

Engine -> frontend: the engines' comm messages are published again by the notebook kernel,
so a headless frontend (nbclient) saves both engines' slider models (and an image's
bytes), and the cell shows their views. Frontend -> engine: a comm message sent to the
notebook kernel, as a browser sends it, moves the slider on its engine; in JupyterLab and
Chromium, typing into a slider does. A keyed peer's garbled comm messages are dropped (or
refused) at the controller's edge and hurt nobody.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import psutil
import zmq
from browser_support import CHROMIUM, CHROMIUM_ARGS, JupyterLab, require_browser, write_notebook
from conftest import kill_pids, wait_gone
from fuzz_support import Peer, Signer, cluster_pids, cluster_ports, dead_processes, port_of
from jupyter_client import KernelManager
from nbclient import NotebookClient

from kernel_engine import protocol

KERNEL_STATUS = "#jp-main-statusbar .jp-StatusBar-TextItem[title^='Change kernel']"
PROMPTS = ".jp-Notebook .jp-Cell .jp-InputPrompt"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SETUP = """\
import jupyter_ext as jx
cluster = jx.Cluster(n=2)
rc = cluster.start_and_connect_sync()
%load_ext jupyter_ext"""
SLIDER = """\
%%px
import ipywidgets as widgets
from IPython import get_ipython
from IPython.display import display
s = widgets.IntSlider(value=10 + get_ipython().kernel.engine_id)
s.observe(lambda change: print('moved to', change['new']), 'value')
display(s)"""


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _stop(pids: list[int]) -> None:
    left = wait_gone(pids, timeout=10)
    kill_pids(left)


def test_engine_widgets_are_saved_and_shown_by_a_headless_frontend():
    """nbclient (store_widget_state) runs a notebook whose %%px cell makes a slider on each
    engine, and a later %px cell moves them: the saved widget state holds both engines'
    slider models at their last values, and the cell's outputs hold their views. A widget
    with binary state (an image on engine 1) keeps its bytes on the way."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": ""}
    image = "%%px --targets 1\ndisplay(widgets.Image(value=b'\\x89PNG engine bytes'))"
    move = "%px s.value = s.value + 50"
    sources = [SETUP, SLIDER, move, image, "cluster.stop_cluster_sync()"]
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    client = NotebookClient(
        nb, timeout=60, kernel_name="python3", allow_errors=True, store_widget_state=True
    )
    pids: list[int] = []
    with client.setup_kernel():
        kernel_pid = client.km.provisioner.process.pid
        pids.append(kernel_pid)
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
                pids += _descendants(kernel_pid)
        finally:
            pids += _descendants(kernel_pid)
        client.set_widgets_metadata()
    _stop(pids)
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    sliders = {k: m["state"] for k, m in state.items() if m["model_name"] == "IntSliderModel"}
    assert sorted(s["value"] for s in sliders.values()) == [60, 61], sliders
    views = [
        o.data[WIDGET_VIEW]["model_id"]
        for o in nb.cells[1].outputs
        if o.output_type == "display_data" and WIDGET_VIEW in o.data
    ]
    assert sorted(views) == sorted(sliders), (views, list(sliders))
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "[output:0]" in text and "[output:1]" in text
    (image,) = [m for m in state.values() if m["model_name"] == "ImageModel"]
    (buffer,) = image["buffers"]
    assert buffer["path"] == ["value"]
    assert base64.b64decode(buffer["data"]) == b"\x89PNG engine bytes"


def _iopub_until(kc: Any, done: Any, timeout: float) -> list[dict[str, Any]]:
    """The notebook kernel's iopub messages until ``done(messages)`` (or ``timeout``)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(kc.get_iopub_msg(timeout=min(left, 0.5)))
        except Exception:  # queue.Empty
            continue
    return got


def _run(kc: Any, code: str, timeout: float = 30) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok", (reply["content"], outputs)
    return reply, outputs


def _stdout(outputs: list[dict[str, Any]]) -> str:
    return "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")


def test_a_frontends_comm_message_moves_the_slider_on_its_engine():
    """As a browser would: the comm_open of each engine's slider reaches the notebook
    kernel's iopub; an ``update`` comm_msg for it, sent to the notebook kernel's shell,
    sets the slider's value on its engine (its observer runs there, and what it prints
    comes back under the frontend's message, as does the widget's echo); a comm_close
    closes the comm on its engine."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pids = [km.provisioner.process.pid]
    try:
        kc.wait_for_ready(timeout=30)
        _run(kc, SETUP, timeout=60)
        pids += _descendants(pids[0])
        _, outputs = _run(kc, SLIDER)
        opens = [
            m
            for m in outputs
            if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
        ]
        assert len(opens) == 2, [m["msg_type"] for m in outputs]
        by_value = {m["content"]["data"]["state"]["value"]: m["content"]["comm_id"] for m in opens}
        assert sorted(by_value) == [10, 11]
        views = [m for m in outputs if m["msg_type"] == "display_data"]
        assert {m["content"]["data"][WIDGET_VIEW]["model_id"] for m in views} == set(
            by_value.values()
        )
        for view in views:  # a frontend learns of a model before it is asked to show it
            model_id = view["content"]["data"][WIDGET_VIEW]["model_id"]
            (opened,) = [m for m in opens if m["content"]["comm_id"] == model_id]
            assert outputs.index(opened) < outputs.index(view)

        # engine 0's slider (opened at 10) to 7, engine 1's (at 11) to 8
        sent = {}
        for start, value in ((10, 7), (11, 8)):
            data = {"method": "update", "state": {"value": value}, "buffer_paths": []}
            msg = kc.session.msg("comm_msg", {"comm_id": by_value[start], "data": data})
            kc.shell_channel.send(msg)
            sent[msg["header"]["msg_id"]] = value

        def answered(got: list[dict[str, Any]]) -> bool:
            echoes = {
                m["parent_header"].get("msg_id")
                for m in got
                if m["msg_type"] == "comm_msg"
                and m["content"]["data"].get("method") == "echo_update"
            }
            printed = {m["parent_header"].get("msg_id") for m in got if m["msg_type"] == "stream"}
            return set(sent) <= echoes and set(sent) <= printed

        got = _iopub_until(kc, answered, timeout=15)
        assert answered(got), [(m["msg_type"], m["content"]) for m in got]
        printed = {
            m["parent_header"]["msg_id"]: m["content"]["text"]
            for m in got
            if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") in sent
        }
        for msg_id, value in sent.items():
            assert re.fullmatch(rf"\[stdout:[01]\] moved to {value}\n", printed[msg_id])
        _, outputs = _run(kc, "%px print('value', s.value)")
        text = _stdout(outputs)
        assert "[stdout:0] value 7" in text and "[stdout:1] value 8" in text, text

        # binary state from the frontend: an image's new bytes, as a buffer
        _, outputs = _run(kc, "%%px --targets 0\nimg = widgets.Image(value=b'old')\nimg")
        (image_id,) = [
            m["content"]["comm_id"]
            for m in outputs
            if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "ImageModel"
        ]
        data = {"method": "update", "state": {}, "buffer_paths": [["value"]]}
        msg = kc.session.msg("comm_msg", {"comm_id": image_id, "data": data})
        msg["buffers"] = [b"new \x00 bytes"]
        kc.shell_channel.send(msg)
        _, outputs = _run(kc, "%%px --targets 0\nprint(bytes(img.value))")  # (after it, in order)
        assert "[stdout:0] b'new \\x00 bytes'" in _stdout(outputs), _stdout(outputs)

        # a comm_close from the frontend closes engine 0's slider comm there
        close = kc.session.msg("comm_close", {"comm_id": by_value[10], "data": {}})
        kc.shell_channel.send(close)
        _, outputs = _run(
            kc, "%px print('open', s.model_id in get_ipython().kernel.comm_manager.comms)"
        )
        text = _stdout(outputs)
        assert "[stdout:0] open False" in text and "[stdout:1] open True" in text, text
        _, outputs = _run(kc, f"print(sorted(rc._widgets.comms).count({by_value[10]!r}))")
        assert _stdout(outputs).strip() == "0"
        _run(kc, "cluster.stop_cluster_sync()", timeout=30)
    finally:
        pids += _descendants(pids[0])
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        _stop(pids)


def test_engine_sliders_render_and_move_their_engines_in_jupyterlab(tmp_path: Path) -> None:
    """In JupyterLab and headless Chromium: both engines' sliders render in the %%px cell
    that made them; typing 42 into engine 0's readout sets its value on engine 0."""
    require_browser()
    from playwright.sync_api import sync_playwright

    lab = JupyterLab(tmp_path)
    try:
        stop = "cluster.stop_cluster_sync()\nprint('cluster', 'stopped')"
        cells = [SETUP, SLIDER, "%px print('value', s.value)", stop]
        write_notebook(lab.notebooks / "widgets.ipynb", cells)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            try:
                page.goto(lab.url("lab/tree/widgets.ipynb"))
                page.locator(KERNEL_STATUS, has_text="| Idle").wait_for()
                page.locator(PROMPTS).first.click()
                page.keyboard.press("Shift+Enter")
                page.keyboard.press("Shift+Enter")
                cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
                cell.locator(".widget-slider").nth(1).wait_for(timeout=40_000)
                lab.track()  # the kernel, its controller and engines
                readout = cell.locator(".widget-readout", has_text=re.compile(r"^10$"))
                readout.click()
                page.keyboard.press("Control+A")
                page.keyboard.type("42")
                page.keyboard.press("Enter")
                page.locator(PROMPTS).nth(2).click()
                page.keyboard.press("Shift+Enter")
                page.get_by_text("[stdout:0] value 42").wait_for(timeout=20_000)
                assert page.get_by_text("[stdout:1] value 11").count() == 1
                page.keyboard.press("Shift+Enter")
                page.get_by_text("cluster stopped").wait_for()
            finally:
                browser.close()
    finally:
        left = lab.stop()
    assert not left, f"processes left running after JupyterLab stopped (killed): {left}"


SILENCE = 1.0


def test_garbled_comm_messages_are_dropped_at_the_edge_and_hurt_nobody(cluster_factory):
    """A keyed peer's comm messages with a comm_id that is no string, data or content or
    metadata that is no object, too many buffers, too many bytes, for an engine that does
    not exist, or for a comm nobody has: none is answered (there is nothing to answer),
    none is recorded, and none disturbs a client's work; one on a lane is refused with an
    error naming it. A plain Python client relays nothing."""
    cluster, rc = cluster_factory.start(2)
    assert rc._widgets is None
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    before = rc[:].apply_async(abs, -1)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, signer) as peer:
            shell = b"shell:0"
            good = {"method": "update", "state": {"value": 1}, "buffer_paths": []}
            dropped = [
                peer.request("comm_msg", {"comm_id": 5, "data": good}, route=shell),
                peer.request("comm_msg", {"comm_id": "x" * 300, "data": good}, route=shell),
                peer.request("comm_msg", {"comm_id": "c", "data": [1, 2]}, route=shell),
                peer.request("comm_close", b"[1]", route=shell),
                peer.request("comm_msg", {"comm_id": "c", "data": {}}, b"[1]", route=shell),
                peer.request(
                    "comm_msg",
                    {"comm_id": "c", "data": good},
                    buffers=[b"x"] * (protocol.MAX_COMM_BUFFERS + 1),
                    route=shell,
                ),
                peer.request(
                    "comm_msg",
                    {"comm_id": "c", "data": good},
                    buffers=[b"\0" * (protocol.MAX_COMM_BYTES + 1)],
                    route=shell,
                ),
                peer.request("comm_close", {"comm_id": "c", "data": {}}, route=b"shell:99"),
                peer.request("comm_msg", {"comm_id": "nobody", "data": good}, route=shell),
                peer.request("comm_close", {"comm_id": "nobody"}, route=b"shell:1"),
            ]
            refused = peer.request("comm_msg", {"comm_id": "c", "data": {}}, route=b"lane:0")
            peer.poll(SILENCE)
            assert [r.summary() for r in peer.received if r.parent.get("msg_id") in dropped] == []
            (reply,) = peer.replies_to(refused)
            assert reply.status == "error" and "comm_msg" in reply.error_text
    finally:
        ctx.term()
    assert before.get(10) == [1, 1]
    assert rc[:].apply_sync(abs, -2) == [2, 2]
    rc[:].execute("x = 1", block=False).get(10)
    queues = rc.queue_status()
    assert all(queues[e]["queue"] == 0 for e in rc.ids), queues
    assert not set(dropped) & set(rc.hub_history())
    assert not dead_processes(pids)
    assert rc.transport._submit_hooks == [] and rc.transport._engine_gone_handlers == []
