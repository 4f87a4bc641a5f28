"""Whether a cluster's start has succeeded, failed or still waits: pure logic.

The controller reports its start once (a status line on stdout, which
:func:`kernel_engine.clusters.wait_ready` turns into a return or a ``ClusterError``).
:class:`Startup` decides when, from events:

- engines it waits for (:meth:`Startup.expect`: those started here, the ids a launcher
  announced, the engines a restarted controller adopts);
- each becoming ready or dying; a launcher failing (with its own message); time passing.

Ready once every awaited engine is ready, or once ``minimum`` of them are (a Slurm job's
engines that start late then join when they start); failed at the first awaited engine
that dies or launcher that fails before that, or when ``timeout`` s pass (engines that
register by themselves have no other deadline). After the report, events change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Report:
    """The start's outcome: ``ready`` with the ids ready, or an error ``message``."""

    ready: bool
    ids: tuple[int, ...] = ()
    message: str = ""


class Startup:
    """Events in, at most one :class:`Report` out.

    Parameters
    ----------
    minimum
        Report ready once this many awaited engines are ready (None: all of them).
    timeout
        Seconds from the first :meth:`expect` within which the report must be ready
        (None: no deadline here).
    """

    def __init__(self, minimum: int | None = None, timeout: float | None = None):
        self.minimum = minimum
        self.timeout = timeout
        self.awaited: set[int] = set()
        self.ready_ids: set[int] = set()
        self.reported = False
        self._since: float | None = None

    @property
    def waiting(self) -> set[int]:
        """Awaited engines not ready yet."""
        return self.awaited - self.ready_ids

    def expect(self, ids: list[int], now: float) -> None:
        """Wait for these engines too."""
        if self._since is None:
            self._since = now
        self.awaited.update(ids)

    def engine_ready(self, eid: int, held: bool = False) -> Report | None:
        """An engine is ready; the report if that was the last one awaited (``held``:
        something else must end first)."""
        if eid in self.awaited:
            self.ready_ids.add(eid)
        return self.check(held)

    def engine_dead(self, eid: int, reason: str) -> Report | None:
        """An engine died; an error if it was awaited and the start is not reported."""
        self.ready_ids.discard(eid)
        if eid not in self.awaited or self.reported:
            return None
        return self._report(False, f"engine failed to start: {reason}")

    def forget(self, eid: int) -> Report | None:
        """Stop waiting for ``eid`` (an adopted engine that did not come back)."""
        self.awaited.discard(eid)
        self.ready_ids.discard(eid)
        return self.check()

    def launcher_failed(self, message: str) -> Report | None:
        """A launcher failed; an error unless the start is reported already."""
        if self.reported:
            return None
        return self._report(False, message)

    def check(self, held: bool = False) -> Report | None:
        """The report, if it is due (``held``: something else must end first)."""
        if self.reported or held:
            return None
        waiting = self.waiting
        enough = self.minimum is not None and len(self.ready_ids) >= self.minimum
        if waiting and not enough:
            return None
        return self._report(True)

    def tick(self, now: float) -> Report | None:
        """Time passed: an error once the deadline is past with the start unreported."""
        if self.reported or self.timeout is None or self._since is None:
            return None
        if now - self._since < self.timeout:
            return None
        have, want = len(self.ready_ids), len(self.awaited)
        need = want if self.minimum is None else min(self.minimum, want)
        waiting = sorted(self.waiting)
        shown = ", ".join(map(str, waiting[:20])) + (" ..." if len(waiting) > 20 else "")
        return self._report(
            False,
            f"{have} of {need} engines ready within {self.timeout:.0f} s "
            f"(still waiting for {shown})",
        )

    def _report(self, ready: bool, message: str = "") -> Report:
        self.reported = True
        return Report(ready, tuple(sorted(self.ready_ids)), message)
