"""``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig`` (``%load_ext jupyter_ext``).

The magics act on a DirectView: the most recently connected client's ``rc[:]`` after
``%load_ext jupyter_ext``, or a chosen view after ``view.activate(suffix)``, which
registers ``%px<suffix>`` and friends beside the others.

Engine output is rendered by the notebook kernel's main thread, while it waits, from
messages the client's IO thread queues for it: so output appears live in the cell that
ran the code (labelled ``[stdout:0]``, ``Out[0:3]``), never under another cell, and
everything already printed is shown before an error is raised.
"""

from __future__ import annotations

import argparse
import queue
import shlex
import signal
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

from ._client import current_client

if TYPE_CHECKING:
    from ._asyncresult import AsyncResult
    from ._views import DirectView

GROUPINGS = ("type", "engine", "order")


def parse_targets(text: str) -> Any:
    """``all``, ``3``, ``0,2``, ``::2`` or ``1:3`` as view targets."""
    text = text.strip()
    if text in ("", "all"):
        return "all"
    if ":" in text:
        parts = [int(p) if p else None for p in text.split(":")]
        return slice(*parts)
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    return int(text)


def _signum(text: str) -> int:
    """A signal by number or name (``SIGINT``, ``INT``, ``2``); 0 sends nothing."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    name = text.strip().upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        raise ValueError(f"no signal {text!r}") from None


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"%{name}", add_help=False, exit_on_error=False)
    p.add_argument("-t", "--targets", type=str, default=None)
    p.add_argument("-b", "--block", dest="block", action="store_true", default=None)
    p.add_argument("-a", "--noblock", dest="block", action="store_false")
    p.add_argument("--local", action="store_true", default=False)
    p.add_argument("--group-outputs", choices=GROUPINGS, default=None)
    p.add_argument("-r", dest="group_outputs", action="store_const", const="order")
    p.add_argument("-e", dest="group_outputs", action="store_const", const="engine")
    p.add_argument("--signal-on-interrupt", type=_signum, default=None)
    p.add_argument("--stream", dest="stream", action="store_true", default=None)
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--verbose", dest="verbose", action="store_true", default=None)
    p.add_argument("--no-verbose", dest="verbose", action="store_false")
    p.add_argument("-o", "--out", "--save-name", dest="save_name", type=str, default=None)
    p.add_argument("--progress-after", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None)
    return p


class Renderer:
    """Shows engine output in the running cell, labelled by engine."""

    def __init__(self, group: str = "type"):
        self.group = group

    def stream(self, eid: int, name: str, text: str) -> None:
        import sys

        out = sys.stderr if name == "stderr" else sys.stdout
        label = f"[{name}:{eid}] "
        body = text if text.endswith("\n") else text + "\n"
        out.write(label + body)
        out.flush()

    def display(self, eid: int, content: dict[str, Any]) -> None:
        from IPython.display import publish_display_data

        print(f"[output:{eid}]")
        publish_display_data(content.get("data", {}), content.get("metadata", {}))

    def result(self, eid: int, content: dict[str, Any]) -> None:
        from IPython.display import publish_display_data

        data = dict(content.get("data", {}))
        label = f"Out[{eid}:{content.get('execution_count')}]: "
        plain = data.get("text/plain", "")
        if set(data) <= {"text/plain"}:
            print(label + plain)
            return
        print(label)
        publish_display_data(data, content.get("metadata", {}))

    def live(self, eid: int, msg_type: str, content: dict[str, Any]) -> None:
        """One iopub message as it arrives (streaming)."""
        if msg_type == "stream":
            self.stream(eid, content.get("name", "stdout"), content.get("text", ""))
        elif msg_type == "display_data":
            self.display(eid, content)
        elif msg_type == "execute_result":
            self.result(eid, content)
        elif msg_type == "clear_output":
            from IPython.display import clear_output

            clear_output(wait=bool(content.get("wait")))

    def final(self, ar: AsyncResult) -> None:
        """Every engine's output after the fact, grouped as configured."""
        mds = ar._metadata_list()
        items: list[tuple[int, int, str, Any]] = []  # (engine, index, kind, payload)
        for md in mds:
            eid = md["engine_id"]
            seq = [("stdout", md["stdout"]), ("stderr", md["stderr"])]
            seq += [("display", c) for c in md["outputs"]]
            if md["execute_result"]:
                seq.append(("result", md["execute_result"]))
            items += [(eid, i, kind, payload) for i, (kind, payload) in enumerate(seq) if payload]
        order = {"stdout": 0, "stderr": 1, "display": 2, "result": 3}
        if self.group == "engine":
            items.sort(key=lambda t: (t[0], t[1]))
        elif self.group == "order":
            items.sort(key=lambda t: (t[1], t[0]))
        else:
            items.sort(key=lambda t: (order[t[2]], t[0], t[1]))
        for eid, _, kind, payload in items:
            if kind in ("stdout", "stderr"):
                self.stream(eid, kind, payload)
            elif kind == "display":
                self.display(eid, payload)
            else:
                self.result(eid, payload)


class PXMagics:
    """The parallel magics of one view (or of the newest client's ``rc[:]``)."""

    def __init__(self, shell: Any, view: DirectView | None = None, suffix: str = ""):
        self.shell = shell
        self._view = view
        self.suffix = suffix
        self.block = True
        self.stream = True
        self.verbose = False
        self.group = "type"
        self.progress_after: float | None = None
        self.signal_on_interrupt = int(signal.SIGINT)
        self.targets: Any = None
        self.last_result: AsyncResult | None = None
        self.autopx = False

    @property
    def view(self) -> DirectView:
        if self._view is not None:
            return self._view
        client = current_client()
        if client is None:
            raise UsageError(
                "no jupyter_ext client: connect one first, e.g. "
                "rc = jupyter_ext.Cluster(n=4).start_and_connect_sync()"
            )
        view: DirectView = client.direct_view("all")
        return view

    def register(self) -> None:
        sx = self.suffix
        reg = self.shell.register_magic_function
        reg(self.px_line, "line", f"px{sx}")
        reg(self.px_cell, "cell", f"px{sx}")
        reg(self.autopx_line, "line", f"autopx{sx}")
        reg(self.pxresult_line, "line", f"pxresult{sx}")
        reg(self.pxresult_line, "line", f"result{sx}")  # (IPython Parallel's older name)
        reg(self.pxconfig_line, "line", f"pxconfig{sx}")

    # ----- the magics

    def pxconfig_line(self, line: str) -> None:
        """Set the defaults of %px: --targets, --[no]block, --[no-]stream, --verbose, ..."""
        args = self._parse(f"pxconfig{self.suffix}", line)
        if args.targets is not None:
            self.targets = parse_targets(args.targets)
        for name in ("block", "stream", "verbose"):
            if getattr(args, name) is not None:
                setattr(self, name, getattr(args, name))
        if args.group_outputs:
            self.group = args.group_outputs
        if args.progress_after is not None:
            self.progress_after = args.progress_after
        if args.signal_on_interrupt is not None:
            self.signal_on_interrupt = args.signal_on_interrupt

    def px_line(self, line: str) -> Any:
        """Run one line of code on the engines."""
        return self._run(line, argparse.Namespace(**vars(self._parse("px", ""))))

    def px_cell(self, line: str, cell: str) -> Any:
        """Run a cell on the engines: ``%%px --targets 0,1 --noblock ...``."""
        return self._run(cell, self._parse(f"px{self.suffix}", line))

    def pxresult_line(self, line: str = "") -> None:
        """Show the output of the last %px run (``--group-outputs`` applies)."""
        __tracebackhide__ = True
        args = self._parse(f"pxresult{self.suffix}", line)
        if self.last_result is None:
            raise UsageError("no %px result yet")
        ar = self.last_result
        if args.save_name:
            self.shell.user_ns[args.save_name] = ar
        ar.wait()
        Renderer(args.group_outputs or self.group).final(ar)
        self._raise_errors(ar)

    def autopx_line(self, line: str = "") -> None:
        """Toggle running every cell on the engines (as if each began with %%px)."""
        self.autopx = not self.autopx
        transformers = self.shell.input_transformers_cleanup
        if self.autopx:
            transformers.append(self._autopx_transform)
            print("%autopx enabled: cells run on the engines")
        else:
            if self._autopx_transform in transformers:
                transformers.remove(self._autopx_transform)
            print("%autopx disabled")

    def _autopx_transform(self, lines: list[str]) -> list[str]:
        source = "".join(lines)
        if source.strip().startswith(f"%autopx{self.suffix}") or not source.strip():
            return lines
        return [f"get_ipython().run_cell_magic('px{self.suffix}', '', {source!r})\n"]

    # ----- running

    def _parse(self, name: str, line: str) -> argparse.Namespace:
        try:
            return _parser(name).parse_args(shlex.split(line))
        except (argparse.ArgumentError, SystemExit, ValueError) as exc:
            raise UsageError(f"%{name}: {exc}") from None

    def _run(self, code: str, args: argparse.Namespace) -> Any:
        __tracebackhide__ = True  # IPython hides this frame in tracebacks
        view = self.view
        targets = parse_targets(args.targets) if args.targets is not None else self.targets
        if targets is None:
            targets = view.targets
        block = self.block if args.block is None else args.block
        stream = self.stream if args.stream is None else args.stream
        verbose = self.verbose if args.verbose is None else args.verbose
        group = args.group_outputs or self.group
        progress_after = (
            args.progress_after if args.progress_after is not None else self.progress_after
        )
        signum = getattr(args, "signal_on_interrupt", None)
        signum = self.signal_on_interrupt if signum is None else signum
        ids = view.transport.targets(targets)
        if verbose:
            print(f"[px] running on engines {ids}{' (no block)' if not block else ''}")
        handler, inbox = self._listen(view)
        ar: AsyncResult | None = None
        try:
            ar = view.execute(code, silent=False, targets=ids, block=False)
            self.last_result = ar
            if args.save_name:
                self.shell.user_ns[args.save_name] = ar
            if args.local:
                self.shell.run_cell(code, store_history=False)
            if not block:
                return ar
            self._wait(
                ar, inbox, set(ar.msg_ids), stream, group, progress_after, args.timeout, signum
            )
        except KeyboardInterrupt:
            # also when Ctrl-C lands between submitting and waiting
            if ar is not None and not ar.done():
                self._interrupt(ar, signum)
            raise
        finally:
            view.transport.remove_iopub_handler(handler)
        self._raise_errors(ar)
        return None

    @staticmethod
    def _listen(view: DirectView) -> tuple[Any, queue.Queue[Any]]:
        inbox: queue.Queue[Any] = queue.Queue()

        def handler(eid: int, msg: Any) -> None:
            inbox.put((eid, msg.parent_header.get("msg_id"), msg.msg_type, msg.content))

        view.transport.add_iopub_handler(handler)
        return handler, inbox

    def _wait(
        self,
        ar: AsyncResult,
        inbox: queue.Queue[Any],
        msg_ids: set[str],
        stream: bool,
        group: str,
        progress_after: float | None,
        timeout: float | None,
        signum: int = int(signal.SIGINT),
    ) -> None:
        __tracebackhide__ = True
        renderer = Renderer(group)
        start = time.monotonic()
        progress = None

        def drain() -> None:
            while True:
                try:
                    eid, parent, msg_type, content = inbox.get_nowait()
                except queue.Empty:
                    return
                if stream and parent in msg_ids:
                    renderer.live(eid, msg_type, content)

        try:
            while not ar.wait(0.05):
                drain()
                elapsed = time.monotonic() - start
                if progress_after is not None and progress is None and elapsed >= progress_after:
                    from ._progress import ProgressDisplay

                    progress = ProgressDisplay(len(ar), "px")
                if progress is not None:
                    progress.update(ar.progress, elapsed)
                if timeout is not None and elapsed >= timeout:
                    engines = self._interrupt(ar, signum)
                    drain()
                    raise TimeoutError(
                        f"%px: no result within {timeout} s; interrupted engines {engines}"
                    )
        except KeyboardInterrupt:
            self._interrupt(ar, signum)
            drain()
            raise
        drain()
        if progress is not None:
            progress.close(ar.progress, time.monotonic() - start, ar.exception() is None)
        if not stream:
            renderer.final(ar)

    @staticmethod
    def _interrupt(ar: AsyncResult, signum: int = int(signal.SIGINT)) -> list[int]:
        """Send ``signum`` (0: nothing) to the engines still running ``ar``; returns them."""
        if not signum:
            return []
        return ar._interrupt_running(signum=signum)

    @staticmethod
    def _raise_errors(ar: AsyncResult) -> None:
        __tracebackhide__ = True
        exc = ar.exception() if ar.done() and not ar.cancelled() else None
        if exc is not None:
            raise exc


def activate(view: DirectView, suffix: str = "") -> PXMagics:
    """Register ``%px<suffix>`` (and friends) acting on ``view``."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("view.activate() needs IPython")
    magics = PXMagics(shell, view, suffix)
    magics.register()
    return magics


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext jupyter_ext``: the magics on the newest client's engines."""
    PXMagics(shell).register()
