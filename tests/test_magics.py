"""%px magics in a real notebook kernel (nbclient): outputs, labels, flags, interrupts."""

from __future__ import annotations

import time

import nbformat
import psutil
import pytest
from conftest import kill_pids
from jupyter_client import KernelManager
from nbclient import NotebookClient

SETUP = """\
import time
import jupyter_ext as jx
cluster = jx.Cluster(n=2)
rc = cluster.start_and_connect_sync()
%load_ext jupyter_ext"""

CELLS = {
    "setup": SETUP,
    "line": "%px a = 5",
    "stream": "%%px\nprint('hello', a)",
    "result": "%%px --targets 0\na * 2",
    "noblock": "%%px --noblock --save-name saved\nimport time\ntime.sleep(0.5)\nprint('later')",
    "after_noblock": "saved.get(10)\n%pxresult",
    "grouped": "%%px --no-stream --group-outputs engine\nimport sys\nprint('o')\n"
    "print('e', file=sys.stderr)",
    "local": "%%px --local\nboth = 41 + 1",
    "local_check": "print('local', both)",
    "rich": "%%px --targets 1\nfrom IPython.display import HTML, display\n"
    "display(HTML('<b>rich output</b>'))",
    "error": "%%px\nprint('before the error')\n1/0",
    "after_error": "%px print('still alive')",
    "timeout": "%%px --timeout 1\nimport time\ntime.sleep(30)",
    "after_timeout": "%px print('alive after timeout')",
    "config": "%pxconfig --no-stream --verbose --targets 1\n%px print('configured')",
    "config_reset": "%pxconfig --stream --no-verbose --targets all",
    "autopx_on": "%autopx",
    "autopx_cell": "x_auto = 3",
    "autopx_off": "%autopx",
    "autopx_check": "print(rc[:]['x_auto'])",
    "activate": "rc[0].activate('_a')\n%px_a print('only engine zero')",
    "progress": "%%px --progress-after 0\nimport time\ntime.sleep(0.5)",
    "wait_interactive": "ar = rc.load_balanced_view().map(lambda x: (time.sleep(0.02), x)[1], "
    "range(40), chunksize=5)\nar.wait_interactive()",
    "stop": "cluster.stop_cluster_sync()\nprint('stopped')",
}


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
            parts.append(out.data.get("text/html", ""))
        elif out.output_type == "error":
            parts.append(f"ERROR {out.ename}: {out.evalue}\n" + "\n".join(out.traceback))
    return "".join(parts)


def errors_of(cell) -> list:
    return [o for o in cell.outputs if o.output_type == "error"]


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell(src, metadata={"name": key}) for key, src in CELLS.items()
    ]
    client = NotebookClient(
        nb, timeout=60, kernel_name="python3", allow_errors=True, store_widget_state=True
    )
    with client.setup_kernel():
        kernel_pid = client.km.provisioner.process.pid
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        finally:
            leftovers = [p.pid for p in psutil.Process(kernel_pid).children(recursive=True)]
        client.set_widgets_metadata()
    time.sleep(0.5)
    kill_pids(leftovers)
    return {c.metadata["name"]: c for c in nb.cells}, nb


def test_setup_and_stop(executed):
    cells, _ = executed
    assert not errors_of(cells["setup"])
    assert "stopped" in text_of(cells["stop"])


def test_line_and_cell_magics_label_output_by_engine(executed):
    cells, _ = executed
    assert cells["line"].outputs == []
    text = text_of(cells["stream"])
    assert "[stdout:0] hello 5" in text and "[stdout:1] hello 5" in text
    assert "Out[0:" in text_of(cells["result"]) and "]: 10" in text_of(cells["result"])
    assert "[stdout:1]" not in text_of(cells["result"])


def test_noblock_output_never_lands_in_another_cell(executed):
    cells, _ = executed
    assert "later" not in text_of(cells["noblock"])
    assert "[stdout:0] later" in text_of(cells["after_noblock"])
    for key, cell in cells.items():
        if key not in ("noblock", "after_noblock"):
            assert "later" not in text_of(cell), key


def test_group_outputs_by_engine_without_streaming(executed):
    cells, _ = executed
    streams = [(o.name, o.text) for o in cells["grouped"].outputs if o.output_type == "stream"]
    labels = [t.split("]")[0] + "]" for _, t in streams]
    assert labels == ["[stdout:0]", "[stderr:0]", "[stdout:1]", "[stderr:1]"]


def test_local_runs_here_too(executed):
    cells, _ = executed
    assert "local 42" in text_of(cells["local_check"])


def test_rich_output_reaches_the_cell(executed):
    cells, _ = executed
    html = [o for o in cells["rich"].outputs if o.output_type == "display_data"]
    assert html and "<b>rich output</b>" in html[0].data["text/html"]
    assert "[output:1]" in text_of(cells["rich"])


def test_errors_keep_earlier_output_and_show_one_traceback_per_engine(executed):
    cells, _ = executed
    cell = cells["error"]
    text = text_of(cell)
    assert "[stdout:0] before the error" in text and "[stdout:1] before the error" in text
    (error,) = errors_of(cell)
    tb = "\n".join(error.traceback)
    assert "[Engine 0] ZeroDivisionError" in tb and "[Engine 1] ZeroDivisionError" in tb
    assert "still alive" in text_of(cells["after_error"])


def test_timeout_interrupts_engines(executed):
    cells, _ = executed
    (error,) = errors_of(cells["timeout"])
    assert error.ename == "TimeoutError" and "interrupted engines" in error.evalue
    assert "alive after timeout" in text_of(cells["after_timeout"])


def test_pxconfig_sets_defaults(executed):
    cells, _ = executed
    text = text_of(cells["config"])
    assert "[px] running on engines [1]" in text and "[stdout:1] configured" in text
    assert "[stdout:0]" not in text


def test_autopx_runs_cells_on_the_engines(executed):
    cells, _ = executed
    assert "enabled" in text_of(cells["autopx_on"]) and "disabled" in text_of(cells["autopx_off"])
    assert "[3, 3]" in text_of(cells["autopx_check"])


def test_activate_registers_a_suffixed_set(executed):
    cells, _ = executed
    text = text_of(cells["activate"])
    assert "[stdout:0] only engine zero" in text and "[stdout:1]" not in text


def _progress_models(nb) -> list:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]


def test_progress_bars_reach_100_percent_in_saved_widget_state(executed):
    _, nb = executed
    bars = _progress_models(nb)
    assert any(b["max"] == 40 and b["value"] == 40 for b in bars), bars
    assert any(b["max"] == 2 and b["value"] == 2 for b in bars), bars


def interrupt_after(kc, km, code: str, delay: float) -> tuple[dict, float]:
    """Run ``code``, interrupt the kernel after ``delay`` s; (its reply, seconds to reply)."""
    msg_id = kc.execute(code)
    time.sleep(delay)
    t0 = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=10)
    return reply, time.monotonic() - t0


def test_interrupting_a_blocking_px_cell_interrupts_the_engines():
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pids = [km.provisioner.process.pid]
    try:
        kc.wait_for_ready(timeout=30)
        outputs: list = []
        reply = kc.execute_interactive(SETUP, timeout=60, output_hook=outputs.append)
        assert reply["content"]["status"] == "ok", [o["content"] for o in outputs]
        pids += [p.pid for p in psutil.Process(pids[0]).children(recursive=True)]
        reply, took = interrupt_after(kc, km, "%%px\nimport time\ntime.sleep(60)", 1.5)
        assert took < 5
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        outputs = []
        reply = kc.execute_interactive(
            "%px print('engines usable')", timeout=20, output_hook=outputs.append
        )
        assert reply["content"]["status"] == "ok", (
            reply["content"],
            [o["content"] for o in outputs],
        )
        texts = "".join(m["content"].get("text", "") for m in outputs)
        assert "[stdout:0] engines usable" in texts and "[stdout:1] engines usable" in texts
        for code in (
            "rc.load_balanced_view().apply_async(time.sleep, 60).get()",
            "rc[:].apply_async(time.sleep, 60).wait_interactive()",
        ):
            reply, took = interrupt_after(kc, km, code, 1.0)
            assert took < 5, code
            assert reply["content"]["ename"] == "KeyboardInterrupt", code
            again = kc.execute_interactive("print(rc[:].apply_sync(lambda: 'free'))", timeout=10)
            assert again["content"]["status"] == "ok", code
        kc.execute_interactive("cluster.stop_cluster_sync()", timeout=30)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        kill_pids(pids)
