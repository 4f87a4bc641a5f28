"""``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig`` (``%load_ext jupyter_ext``).

The magics act on a DirectView: the most recently connected client's ``rc[:]`` after
``%load_ext jupyter_ext``, or a chosen view after ``view.activate(suffix)``, which
registers ``%px<suffix>`` and friends beside the others.

Engine output is rendered by the notebook kernel's main thread, while it waits, from
messages the client's IO thread queues for it: so output appears live in the cell that
ran the code (labelled ``[stdout:0]``, ``Out[0:3]``), never under another cell, and
everything already printed is shown before an error is raised. Errors streamed that way
end the cell with :class:`AlreadyDisplayedError` (a one-line summary, not the tracebacks
again).

As IPython Parallel's, ``%px`` takes no flags and its code is not expanded here: ``$x``
and ``{x}`` reach the engines as written, where IPython expands them in shell commands
and magics (``%px !echo $x`` echoes each engine's ``x``). Ctrl-C while a blocking ``%px``
waits sends ``--signal-on-interrupt`` (SIGINT by default) to the engines and ends the
cell quietly; with ``--signal-on-interrupt 0`` it raises KeyboardInterrupt as usual.
"""

from __future__ import annotations

import argparse
import functools
import queue
import shlex
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import no_var_expand

from kernel_engine import protocol
from kernel_engine.errors import AlreadyDisplayedError, CompositeError, RemoteError

from ._client import current_client
from ._outputs import LiveOutput, display_outputs

if TYPE_CHECKING:
    from ._asyncresult import AsyncResult
    from ._views import DirectView

GROUPINGS = ("type", "engine", "order")


def parse_targets(text: str, namespace: dict[str, Any] | None = None) -> Any:
    """``all``, ``3``, ``0,2``, ``::2``, ``1:3`` or a Python expression evaluated in
    ``namespace`` (the user's), as view targets."""
    text = text.strip()
    if text in ("", "all"):
        return "all"
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] == 0):
                raise UsageError(f"--targets {text!r}: not a slice (start:stop:step, step not 0)")
            return slice(*parts)
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        pass
    try:
        value = eval(text, dict(namespace or {}))  # the user's own expression, as IPP does
    except Exception as exc:
        raise UsageError(f"--targets {text!r}: {type(exc).__name__}: {exc}") from None
    return list(value) if isinstance(value, (tuple, range)) else value


def _signum(text: str) -> int:
    """A signal by number or name (``SIGINT``, ``INT``, ``2``); 0 sends nothing."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    name = text.strip().upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        raise ValueError(f"no signal {text!r}") from None


def _seconds(text: str) -> float:
    """A number of seconds: finite, at least 0 (argparse names the option if not)."""
    try:
        seconds = protocol.check_seconds("seconds", float(text))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds at least 0, not {text!r}"
        ) from None
    assert seconds is not None
    return seconds


def _progress_seconds(text: str) -> float:
    """``--progress-after``: seconds, or a negative number for never (IPython Parallel's
    ``-1``), read as -1."""
    try:
        if float(text) < 0:
            return -1.0
    except ValueError:
        pass
    return _seconds(text)


def _parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"%{name}", add_help=False, exit_on_error=False)
    p.add_argument("-t", "--targets", type=str, default=None)
    p.add_argument("-b", "--block", dest="block", action="store_true", default=None)
    p.add_argument("-a", "--noblock", dest="block", action="store_false")
    p.add_argument("--local", action="store_true", default=False)
    p.add_argument("--group-outputs", choices=GROUPINGS, default=None)
    p.add_argument("-r", dest="group_outputs", action="store_const", const="order")
    p.add_argument("-e", dest="group_outputs", action="store_const", const="engine")
    p.add_argument("--signal-on-interrupt", type=str, default=None)
    p.add_argument("--stream", dest="stream", action="store_true", default=None)
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--verbose", dest="verbose", action="store_true", default=None)
    p.add_argument("--no-verbose", dest="verbose", action="store_false")
    p.add_argument("-o", "--out", "--save-name", dest="save_name", type=str, default=None)
    p.add_argument("--progress-after", type=_progress_seconds, default=None)
    p.add_argument("--timeout", type=_seconds, default=None)
    return p


class _Live:
    """Engine output of one ``%px`` run, queued by the client's IO thread and shown by
    the kernel's main thread (so it lands in the running cell)."""

    def __init__(self, view: DirectView, stream: bool):
        self.view = view
        self.stream = stream
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.msg_ids: set[str] = set()
        self.errors_shown: set[str] = set()
        self.output = LiveOutput()
        view.transport.add_iopub_handler(self._handler)

    def _handler(self, eid: int, msg: Any) -> None:
        self.inbox.put((eid, msg.parent_header.get("msg_id"), msg.msg_type, msg.content))

    def close(self) -> None:
        self.view.transport.remove_iopub_handler(self._handler)

    def finish(self) -> None:
        """Show what came, unfinished lines too."""
        self.drain()
        self.output.flush()

    def drain(self) -> None:
        while True:
            try:
                eid, parent, msg_type, content = self.inbox.get_nowait()
            except queue.Empty:
                return
            if self.stream and parent in self.msg_ids:
                self.output.show(eid, msg_type, content)
                if msg_type == "error":
                    self.errors_shown.add(parent)


def _no_var_expand(method: Any) -> Any:
    """``method`` as a magic whose line IPython passes on unexpanded."""

    @functools.wraps(method)
    def magic(*args: Any) -> Any:
        __tracebackhide__ = True
        return method(*args)

    return no_var_expand(magic)


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
        self.timeout: float | None = None  # (a blocking %px's, in seconds; None: no limit)
        self.signal_on_interrupt = "SIGINT"  # as given: a name or a number, 0 for none
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
        reg(_no_var_expand(self.px_line), "line", f"px{sx}")
        reg(_no_var_expand(self.px_cell), "cell", f"px{sx}")
        reg(self.autopx_line, "line", f"autopx{sx}")
        reg(self.pxresult_line, "line", f"pxresult{sx}")
        reg(self.pxresult_line, "line", f"result{sx}")  # (IPython Parallel's older name)
        reg(self.pxconfig_line, "line", f"pxconfig{sx}")

    # ----- the magics

    def pxconfig_line(self, line: str) -> None:
        """Set the defaults of %px: --targets, --[no]block, --[no-]stream, --verbose,
        --timeout (0: none), ..."""
        args = self._parse(f"pxconfig{self.suffix}", line)
        if args.signal_on_interrupt is not None:
            self._signal(args.signal_on_interrupt)  # a bad name fails here, not at Ctrl-C
            self.signal_on_interrupt = args.signal_on_interrupt
        if args.targets is not None:
            self.targets = parse_targets(args.targets, self.shell.user_ns)
        for name in ("block", "stream", "verbose"):
            if getattr(args, name) is not None:
                setattr(self, name, getattr(args, name))
        if args.group_outputs:
            self.group = args.group_outputs
        if args.progress_after is not None:
            self.progress_after = None if args.progress_after < 0 else args.progress_after
        if args.timeout is not None:
            self.timeout = args.timeout or None  # (0: no limit again)

    def px_line(self, line: str) -> Any:
        """Run one line of code on the engines (no flags: ``%pxconfig`` sets them)."""
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
        display_outputs(ar._metadata_list(), args.group_outputs or self.group)
        self._raise_errors(ar, set())

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

    @staticmethod
    def _signal(text: str) -> int:
        try:
            return _signum(text)
        except ValueError as exc:
            raise UsageError(f"--signal-on-interrupt: {exc}") from None

    def _run(self, code: str, args: argparse.Namespace) -> Any:
        __tracebackhide__ = True  # IPython hides this frame in tracebacks
        view = self.view
        if args.targets is not None:
            targets = parse_targets(args.targets, self.shell.user_ns)
        else:
            targets = view.targets if self.targets is None else self.targets
        block = self.block if args.block is None else args.block
        stream = self.stream if args.stream is None else args.stream
        verbose = self.verbose if args.verbose is None else args.verbose
        group = args.group_outputs or self.group
        progress_after = (
            args.progress_after if args.progress_after is not None else self.progress_after
        )
        if progress_after is not None and progress_after < 0:
            progress_after = None  # (-1: never)
        sig_text = getattr(args, "signal_on_interrupt", None) or self.signal_on_interrupt
        signum = self._signal(sig_text)
        ids = view.transport.targets(targets)
        if verbose:
            print(f"{'Parallel' if block else 'Async parallel'} execution on engine(s): {ids}")
        live = _Live(view, stream)
        ar: AsyncResult | None = None
        try:
            ar = view.execute(code, silent=False, targets=ids, block=False)
            live.msg_ids.update(ar.msg_ids)
            self.last_result = ar
            if args.save_name:
                self.shell.user_ns[args.save_name] = ar
            if args.local:
                self.shell.run_cell(code, store_history=False)
            if not block:
                return ar
            timeout = self.timeout if args.timeout is None else args.timeout
            self._wait(ar, live, progress_after, timeout, signum)
        except KeyboardInterrupt:
            # also when Ctrl-C lands between submitting and waiting
            if ar is None or not signum:
                raise
            print(
                f"Received Keyboard Interrupt. Sending signal {sig_text} to engines...",
                file=sys.stderr,
                flush=True,
            )
            self._interrupt(ar, signum)
            live.finish()
            return None
        finally:
            live.close()
        if not stream:
            display_outputs(ar._metadata_list(), group)
        self._raise_errors(ar, live.errors_shown)
        return None

    def _wait(
        self,
        ar: AsyncResult,
        live: _Live,
        progress_after: float | None,
        timeout: float | None,
        signum: int,
    ) -> None:
        __tracebackhide__ = True
        start = time.monotonic()
        progress = None
        try:
            while not ar.wait(0.05):
                live.drain()
                elapsed = time.monotonic() - start
                if progress_after is not None and progress is None and elapsed >= progress_after:
                    from ._engine_progress import EngineProgress

                    progress = EngineProgress(ar, "px")  # (the whole, and a bar per engine)
                if progress is not None:
                    progress.update(ar.progress, elapsed)
                if timeout is not None and elapsed >= timeout:
                    engines = self._interrupt(ar, signum)
                    live.finish()
                    raise TimeoutError(
                        f"%px: no result within {timeout} s; interrupted engines {engines}"
                    )
        except BaseException as exc:
            if progress is not None:  # (its display ends in that state, not as a live box)
                took = time.monotonic() - start
                interrupted = isinstance(exc, KeyboardInterrupt)
                progress.close(ar.progress, took, False, interrupted, ended=False)
            raise
        live.finish()
        if progress is not None:
            progress.close(ar.progress, time.monotonic() - start, ar.exception() is None)

    @staticmethod
    def _interrupt(ar: AsyncResult, signum: int = int(signal.SIGINT)) -> list[int]:
        """Send ``signum`` (0: nothing) to the engines still running ``ar``; returns them."""
        if not signum:
            return []
        return ar._interrupt_running(signum=signum)

    @staticmethod
    def _raise_errors(ar: AsyncResult, shown: set[str]) -> None:
        """Raise what failed: as :class:`AlreadyDisplayedError` when every error's
        traceback was streamed already (``shown``: their msg_ids)."""
        __tracebackhide__ = True
        exc = ar.exception() if ar.done() and not ar.cancelled() else None
        if exc is None:
            return
        errors = exc.elist if isinstance(exc, CompositeError) else [exc]
        if (
            isinstance(exc, RemoteError)
            and shown
            and all(
                isinstance(e, RemoteError) and e.engine_info.get("msg_id") in shown for e in errors
            )
        ):
            raise AlreadyDisplayedError(exc) from None
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
