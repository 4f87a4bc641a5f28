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

SEVERAL = """\
import sys
from IPython.display import display
print('o1')
print('e1', file=sys.stderr)
display('d1')
print('o2')
display('d2')"""

CELLS = {
    "setup": SETUP,
    "line": "%px a = 5",
    "stream": "%%px\nprint('hello', a)",
    "result": "%%px --targets 0\na * 2",
    "last_engine": "%%px --targets -1\nprint('on the last engine')",
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
    "error_nostream": "%%px --no-stream\nprint('shown first')\n1/0",
    "timeout": "%%px --timeout 1\nimport time\ntime.sleep(30)",
    "after_timeout": "%px print('alive after timeout')",
    "config_timeout": "%pxconfig --timeout 1\n%px import time; time.sleep(30)",
    "config_timeout_off": "%pxconfig --timeout 0\n%px print('no limit again')",
    "config": "%pxconfig --no-stream --verbose --targets 1\n%px print('configured')",
    "config_reset": "%pxconfig --stream --no-verbose --targets all",
    "autopx_on": "%autopx",
    "autopx_cell": "x_auto = 3",
    "autopx_error": "1/0",
    "autopx_after_error": "y_auto = x_auto + 1",
    "autopx_off": "%autopx",
    "autopx_check": "print(rc[:]['x_auto'], rc[:]['y_auto'])",
    "expand_setup": "x_eng = 'LOCAL'\n%px x_eng = 'ENGINE'",
    "expand_shell": "%px !echo $x_eng",
    "expand_literal": "%px print('$x_eng', '{x_eng}')",
    "targets_expr": "%%px --targets rc.ids[-1:]\nprint('expression targets')",
    "group_type": "%%px --no-stream --group-outputs type\n" + SEVERAL,
    "group_engine": "%%px --no-stream -e\n" + SEVERAL,
    "group_order": "%%px --no-stream -r\n" + SEVERAL,
    "group_streamed": "%%px\n" + SEVERAL,
    "noblock_line": "%pxconfig --noblock\nr = %px 6 * 7\n%pxconfig --block\n"
    "print(type(r).__name__, r.wait(10))\n%pxresult",
    "bad_signal": "%%px --signal-on-interrupt SIGNOPE\n1",
    "activate": "rc[0].activate('_a')\n%px_a print('only engine zero')",
    "progress": "%%px --progress-after 0\nimport time\ntime.sleep(0.5)",
    "wait_interactive": "ar = rc.load_balanced_view().map(lambda x: (time.sleep(0.02), x)[1], "
    "range(40), chunksize=5)\nar.wait_interactive()",
    "stop": "cluster.stop_cluster_sync()\nprint('stopped')",
}


def tokens(cell) -> list[str]:
    """The cell's outputs in order: stream lines, and display data as ``D:<text>``."""
    out: list[str] = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out += [f"{o.name}|{line}" for line in o.text.splitlines()]
        elif o.output_type == "display_data":
            out.append("D:" + o.data.get("text/plain", ""))
    return out


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
    # the tracebacks were streamed as they happened; the cell ends with a one-line summary
    for eid in (0, 1):
        assert f"[Engine {eid}] ZeroDivisionError: division by zero" in text
    assert text.index("before the error") < text.index("ZeroDivisionError")
    (error,) = errors_of(cell)
    assert error.ename == "AlreadyDisplayedError"
    assert error.traceback == ["2 errors (shown above)"]
    assert "still alive" in text_of(cells["after_error"])


def test_errors_not_streamed_are_raised_with_their_tracebacks(executed):
    cells, _ = executed
    cell = cells["error_nostream"]
    assert "[stdout:0] shown first" in text_of(cell)
    (error,) = errors_of(cell)
    tb = "\n".join(error.traceback)
    assert "[Engine 0] ZeroDivisionError" in tb and "[Engine 1] ZeroDivisionError" in tb
    assert "ZeroDivisionError" not in "".join(o.text for o in cell.outputs if "text" in o)


def test_timeout_interrupts_engines(executed):
    cells, _ = executed
    (error,) = errors_of(cells["timeout"])
    assert error.ename == "TimeoutError" and "interrupted engines" in error.evalue
    assert "alive after timeout" in text_of(cells["after_timeout"])


def test_pxconfig_timeout_is_the_default_of_px(executed):
    """%pxconfig --timeout was taken and ignored: the %px after it waited out its sleep."""
    cells, _ = executed
    (error,) = errors_of(cells["config_timeout"])
    assert error.ename == "TimeoutError" and "no result within 1.0 s" in error.evalue
    assert "[stdout:0] no limit again" in text_of(cells["config_timeout_off"])


def test_pxconfig_sets_defaults(executed):
    cells, _ = executed
    text = text_of(cells["config"])
    assert "Parallel execution on engine(s): [1]" in text and "[stdout:1] configured" in text
    assert "[stdout:0]" not in text


def test_autopx_runs_cells_on_the_engines(executed):
    cells, _ = executed
    assert "enabled" in text_of(cells["autopx_on"]) and "disabled" in text_of(cells["autopx_off"])
    assert "[3, 3] [4, 4]" in text_of(cells["autopx_check"])
    # an error in %autopx mode is shown, and the mode goes on
    text = text_of(cells["autopx_error"])
    assert "[Engine 0] ZeroDivisionError" in text and "[Engine 1] ZeroDivisionError" in text
    assert [e.ename for e in errors_of(cells["autopx_error"])] == ["AlreadyDisplayedError"]
    assert not errors_of(cells["autopx_after_error"])


def test_px_code_is_expanded_on_the_engines_not_here(executed):
    cells, _ = executed
    shell = text_of(cells["expand_shell"])
    assert "[stdout:0] ENGINE" in shell and "[stdout:1] ENGINE" in shell
    assert "LOCAL" not in shell
    assert "[stdout:0] $x_eng {x_eng}" in text_of(cells["expand_literal"])


def test_targets_may_be_a_python_expression(executed):
    cells, _ = executed
    text = text_of(cells["targets_expr"])
    assert "[stdout:1] expression targets" in text and "[stdout:0]" not in text


def test_several_prints_are_grouped_as_asked(executed):
    cells, _ = executed
    both = ["stdout|o1", "stdout|o2"]
    streams = [f"stdout|[stdout:{e}]" for e in (0, 1)]
    assert tokens(cells["group_type"]) == [
        streams[0], *both, streams[1], *both,
        "stderr|[stderr:0] e1", "stderr|[stderr:1] e1",
        "stdout|[output:0]", "D:'d1'", "stdout|[output:0]", "D:'d2'",
        "stdout|[output:1]", "D:'d1'", "stdout|[output:1]", "D:'d2'",
    ]  # fmt: skip
    assert tokens(cells["group_engine"]) == [
        streams[0], *both, "stderr|[stderr:0] e1",
        "stdout|[output:0]", "D:'d1'", "stdout|[output:0]", "D:'d2'",
        streams[1], *both, "stderr|[stderr:1] e1",
        "stdout|[output:1]", "D:'d1'", "stdout|[output:1]", "D:'d2'",
    ]  # fmt: skip
    assert tokens(cells["group_order"]) == [
        streams[0], *both, streams[1], *both,
        "stderr|[stderr:0] e1", "stderr|[stderr:1] e1",
        "stdout|[output:0]", "D:'d1'", "stdout|[output:1]", "D:'d1'",
        "stdout|[output:0]", "D:'d2'", "stdout|[output:1]", "D:'d2'",
    ]  # fmt: skip
    # streamed: each engine's prints in the order it made them, each labelled
    streamed = tokens(cells["group_streamed"])
    for eid in (0, 1):
        mine = [t for t in streamed if f":{eid}]" in t]
        assert mine == [
            f"stdout|[stdout:{eid}] o1", f"stderr|[stderr:{eid}] e1",
            f"stdout|[output:{eid}]", f"stdout|[stdout:{eid}] o2", f"stdout|[output:{eid}]",
        ], streamed  # fmt: skip


def test_non_blocking_line_px_returns_its_result(executed):
    cells, _ = executed
    text = text_of(cells["noblock_line"])
    assert "AsyncResult True" in text
    assert "Out[0:" in text and "Out[1:" in text and "]: 42" in text


def test_a_bad_signal_name_is_a_usage_error(executed):
    cells, _ = executed
    text = text_of(cells["bad_signal"])  # (IPython prints usage errors, no traceback)
    assert "UsageError: --signal-on-interrupt: no signal 'SIGNOPE'" in text, text


def test_bad_seconds_options_are_usage_errors_naming_them():
    """--progress-after nan was taken; so was --timeout nan (or -1)."""
    from IPython.core.error import UsageError

    from jupyter_ext._magics import PXMagics

    magics = PXMagics(shell=None)
    for option, bads in (("--progress-after", "nan inf x"), ("--timeout", "nan -1 inf x")):
        for bad in bads.split():
            with pytest.raises(UsageError, match=f"argument {option}: must be a finite"):
                magics._parse("px", f"{option} {bad}")
    args = magics._parse("px", "--progress-after 0.5 --timeout 2")
    assert (args.progress_after, args.timeout) == (0.5, 2.0)


def test_progress_after_minus_one_means_never_as_in_ipython_parallel():
    """IPython Parallel documents ``--progress-after -1`` as "no progress"; it was a
    UsageError here, in %%px and %pxconfig alike."""
    from jupyter_ext._magics import PXMagics

    magics = PXMagics(shell=None)
    assert magics._parse("px", "--progress-after -1").progress_after == -1.0
    magics.pxconfig_line("--progress-after 3")
    assert magics.progress_after == 3.0
    magics.pxconfig_line("--progress-after -1")
    assert magics.progress_after is None


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


def interrupt_after(kc, km, code: str, delay: float) -> tuple[dict, float, dict[str, str]]:
    """Run ``code``, interrupt the kernel after ``delay`` s; (its reply, seconds to reply,
    what it printed by stream name)."""
    msg_id = kc.execute(code)
    time.sleep(delay)
    t0 = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=10)
    took = time.monotonic() - t0
    printed = {"stdout": "", "stderr": ""}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=10)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            printed[msg["content"]["name"]] += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return reply, took, printed


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
        # as IPython Parallel: the signal goes to the engines, the cell ends quietly
        cell = "%%px\nimport time\nprint('entering')\ntime.sleep(60)\nprint('exiting')"
        reply, took, printed = interrupt_after(kc, km, cell, 1.5)
        assert took < 5
        assert reply["content"]["status"] == "ok", reply["content"]
        assert (
            "Received Keyboard Interrupt. Sending signal SIGINT to engines..."
            in (printed["stderr"])
        )
        assert "[stdout:0] entering" in printed["stdout"] and "exiting" not in printed["stdout"]
        # the signal named as the user named it; 0 sends nothing and interrupts here only
        reply, took, printed = interrupt_after(
            kc, km, "%%px --signal-on-interrupt 2\nimport time\ntime.sleep(60)", 1.5
        )
        assert reply["content"]["status"] == "ok" and took < 5
        assert "Sending signal 2 to engines..." in printed["stderr"]
        reply, took, printed = interrupt_after(
            kc, km, "%%px --signal-on-interrupt 0\nimport time\ntime.sleep(3)", 1.0
        )
        assert reply["content"]["ename"] == "KeyboardInterrupt" and took < 5
        assert "Sending signal" not in printed["stderr"]
        reply = kc.execute_interactive("rc[:].wait(timeout=10)", timeout=20)
        assert reply["content"]["status"] == "ok"
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
            reply, took, _ = interrupt_after(kc, km, code, 1.0)
            assert took < 5, code
            assert reply["content"]["ename"] == "KeyboardInterrupt", code
            again = kc.execute_interactive("print(rc[:].apply_sync(lambda: 'free'))", timeout=10)
            assert again["content"]["status"] == "ok", code
        kc.execute_interactive("cluster.stop_cluster_sync()", timeout=30)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        kill_pids(pids)


def test_a_bad_slice_of_targets_is_a_usage_error_naming_it():
    """``-t 0:2:1:3`` raised a TypeError from slice() and ``-t ::0`` a ValueError from
    the view, neither naming --targets."""
    from IPython.core.error import UsageError

    from jupyter_ext._magics import parse_targets

    for bad in ("0:2:1:3", "::0", "1:3:0"):
        with pytest.raises(UsageError, match=f"--targets '{bad}': not a slice"):
            parse_targets(bad)
    assert parse_targets("1:3") == slice(1, 3) and parse_targets("::2") == slice(None, None, 2)


def test_a_negative_target_counts_from_the_last_engine(executed):
    """IPython Parallel's ``%%px -t -1`` runs on the last engine (as ``rc[-1]``); here it
    was InvalidTarget: no engine with id -1."""
    cells, _ = executed
    assert not errors_of(cells["last_engine"])
    text = text_of(cells["last_engine"])
    assert "[stdout:1] on the last engine" in text and "[stdout:0]" not in text
