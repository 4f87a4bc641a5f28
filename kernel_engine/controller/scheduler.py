"""Load-balancing task scheduler of the controller, as pure logic: events in, actions out."""

from __future__ import annotations

import heapq
import itertools
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias

FailKind = Literal["EngineError", "ImpossibleDependency", "DependencyTimeout",
                   "InvalidDependency", "TaskAborted", "TaskTimeout"]  # fmt: skip
Status = Literal["ok", "error", "unmet", "final"]


@dataclass(frozen=True, slots=True)
class Dependency:
    """msg_ids a task depends on: ``all`` of them or any; ``success``/``failure`` count as met."""

    msg_ids: frozenset[str]
    all: bool = True
    success: bool = True
    failure: bool = False


@dataclass(frozen=True, slots=True)
class Task:
    """A task: ``timeout`` bounds the dependency wait, ``time_limit`` the run time (seconds:
    the engine enforces it from the task's start; its error reply is "final")."""

    msg_id: str
    client: bytes
    targets: frozenset[int] | None = None
    after: Dependency | None = None
    follow: Dependency | None = None
    timeout: float | None = None
    retries: int = 0
    time_limit: float | None = None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send these tasks, in this order, to engine ``eid``."""

    eid: int
    msg_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fail:
    """Final outcome: reply to the client with an error of class ``kind`` (``eid``: the
    engine it was on, if it had been dispatched)."""

    msg_id: str
    kind: FailKind
    reason: str
    eid: int | None = None


@dataclass(frozen=True, slots=True)
class Resubmit:
    """``msg_id`` went back to the queue: what ``eid`` replied (if anything) is not final."""

    msg_id: str
    eid: int
    reason: str


Action: TypeAlias = Dispatch | Fail | Resubmit
BLOCKED, READY, PARKED, RUNNING, DONE, NEW = range(6)  # job states; "queued" is <= PARKED
_IMPOSSIBLE: FailKind = "ImpossibleDependency"


class _Deps:  # incremental state of a Dependency; "located" deps count only on an engine
    __slots__ = ("bad", "good", "located", "pending", "spec", "where")

    def __init__(self, spec: Dependency, located: bool, done: dict[str, tuple[int | None, bool]]):
        self.spec, self.located, self.where = spec, located, set[int]()
        self.pending, self.good, self.bad = len(spec.msg_ids), 0, 0
        for m in spec.msg_ids & done.keys():
            self.add(*done[m])

    def void(self) -> None:  # one of its msg_ids will never count
        self.pending -= 1
        self.bad += 1

    def add(self, eid: int | None, success: bool) -> None:
        self.pending -= 1
        counts = self.spec.success if success else self.spec.failure
        if counts and (eid is not None or not self.located):
            self.good += 1
            if eid is not None:
                self.where.add(eid)
        else:
            self.bad += 1


class _Job:
    __slots__ = ("aborting", "after", "avoid", "deadline", "eid", "fixed", "follow", "gen",
                 "mid", "refused", "retries", "state", "task",
                 "unknown", "unknown_until")  # fmt: skip

    def __init__(self, task: Task, after: _Deps | None, follow: _Deps | None) -> None:
        self.task, self.mid, self.after, self.follow = task, task.msg_id, after, follow
        self.state, self.gen, self.eid, self.retries = NEW, 0, -1, task.retries
        self.fixed: set[int] | None = None  # engines allowed by targets/follow (None: any)
        self.refused: set[int] = set()
        self.avoid: int | None = None  # soft: the engine the last attempt failed on
        self.deadline: float | None = None
        self.aborting = False
        self.unknown: set[str] | None = None  # dependencies not known yet (unknown_grace)
        self.unknown_until = 0.0


class Scheduler:
    """Least-load task scheduler with dependencies, retries, time limits and client fairness.

    Pure logic (``now``: monotonic seconds). Only :meth:`schedule` returns :class:`Dispatch`; other
    events return the decisions they force (:class:`Fail`, :class:`Resubmit`).
    A task's final outcome is a ``Fail`` or the reply to :meth:`finished` if that returns no
    ``Fail``/``Resubmit`` for it. Least load wins; ties and clients go round-robin. While more
    tasks are ready than free slots at ``hwm``, the cap is ``max(hwm, max_batch)`` so engines get
    pipelines of ``max_batch`` tasks per Dispatch (``max_batch <= hwm`` keeps ``hwm`` strict).

    Outcomes of finished tasks (what dependencies look up) are a bounded memory of the
    ``max_outcomes`` most recent, evicted oldest first in O(1); the controller's task records
    are the full account, and it re-declares older outcomes (:meth:`record_outcome`) before
    submitting a task that depends on them.

    Parameters
    ----------
    hwm : int
        Tasks in flight per engine (0: unlimited).
    max_batch : int
        Most msg_ids in one :class:`Dispatch`.
    max_outcomes : int
        Most outcomes (and known msg_ids) remembered.
    unknown_grace : float
        Seconds a task may wait on dependencies the scheduler has not heard of, for
        :meth:`heard_of`, :meth:`note_known` or :meth:`record_outcome` to name them (a
        request sent outside load balancing, which the controller hears of a little
        later); then it fails with InvalidDependency. 0: at once. A msg_id submitted as a
        task after another task named it fails that task at once: a task may only
        depend on tasks submitted before it, so dependencies never form a cycle. (A task
        that may run already, an any-of dependency met, is not failed: such an id, or one
        still unknown when its grace ends, counts as a failed dependency of it.)
    """

    def __init__(
        self,
        hwm: int = 4,
        max_batch: int = 32,
        max_outcomes: int = 10_000,
        unknown_grace: float = 0.0,
    ) -> None:
        self.hwm, self.max_batch = max(hwm, 0), max(max_batch, 1)
        self.max_outcomes = max(max_outcomes, 1)
        self.unknown_grace = max(unknown_grace, 0.0)
        self._unknown: dict[str, dict[_Job, None]] = {}  # unknown dep msg_id -> jobs naming it
        self._order: deque[str] = deque()  # outcomes and known ids, oldest first (evicted first)
        self._inflight: dict[int, dict[str, None]] = {}  # live engines: ordered msg_id sets
        self._last: dict[int, int] = {}  # engine -> when it was last given a task
        self._heap: list[tuple[int, int, int]] = []  # (load, last, eid); stale entries dropped
        self._jobs: dict[str, _Job] = {}  # every task without a final outcome
        self._outcomes: dict[str, tuple[int | None, bool]] = {}
        self._known: set[str] = set()
        self._waiting: dict[str, dict[_Job, None]] = {}  # dep msg_id -> jobs depending on it
        self._queues: dict[bytes, deque[tuple[int, _Job]]] = {}  # ready jobs per client
        self._rr: deque[bytes] = deque()  # clients with a queue, round-robin order
        self._parked: dict[int, deque[tuple[int, _Job]]] = {}
        self._placed: dict[str, _Job] = {}  # jobs with targets/follow/refusals
        self._timers: list[tuple[float, int, _Job]] = []  # dependency deadlines, unknown graces
        self._count = itertools.count(1)
        self._backlog = self._load = 0  # ready + parked jobs; dispatched jobs

    def add_engine(self, eid: int) -> None:
        """Register engine ``eid`` (no-op if known); parked tasks go back to their queues."""
        if eid not in self._inflight:
            self._inflight[eid], self._last[eid] = {}, 0
            self._push(eid)
            self._unpark(x for e in list(self._parked) for x in self._parked.pop(e))

    def remove_engine(self, eid: int, now: float, reason: str = "") -> list[Action]:
        """Forget engine ``eid``; its tasks are resubmitted (costing a retry) or fail with
        EngineError saying ``reason`` (how it died). Tasks left with no engine to run on fail
        with ImpossibleDependency; later replies are ignored."""
        out: list[Action] = []
        if eid in self._inflight:
            inflight, _ = self._inflight.pop(eid), self._last.pop(eid)
            self._load -= len(inflight)
            self._push(None)
            self._unpark(self._parked.pop(eid, ()))
            for mid in inflight:
                self._reply(self._jobs[mid], eid, "died", out, reason)
            for job in list(self._placed.values()):
                if job.state <= PARKED:  # (not failed by a cascade meanwhile)
                    self._check(job, out)
            # a task sent to be retried, then failed by a cascade from another of the
            # engine's tasks (the one it follows), gets its Fail alone: one verdict a task
            failed = {a.msg_id for a in out if isinstance(a, Fail)}
            if failed:
                out = [a for a in out if not (isinstance(a, Resubmit) and a.msg_id in failed)]
        return out

    def knows(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is a task here, a remembered outcome or a known msg_id."""
        return msg_id in self._jobs or msg_id in self._outcomes or msg_id in self._known

    def note_known(self, msg_id: str) -> None:
        """Declare ``msg_id`` (e.g. a direct task) a valid dependency target."""
        if msg_id not in self._jobs and msg_id not in self._outcomes:
            self._known.add(msg_id)
            self._remember(msg_id)
            if self._unknown:
                self._now_known(msg_id)

    def heard_of(self, msg_id: str) -> None:
        """A request outside load balancing was made: :meth:`note_known` if a task waits
        on ``msg_id`` as an unknown dependency (a dict lookup otherwise)."""
        if msg_id in self._unknown:
            self.note_known(msg_id)

    def record_outcome(self, msg_id: str, eid: int | None, success: bool) -> list[Action]:
        """Record that ``msg_id`` finished on ``eid``; wakes dependents (may fail some). Ignored
        if the scheduler still owns the task (:meth:`finished` decides) or already knows it."""
        out: list[Action] = []
        if msg_id not in self._jobs and msg_id not in self._outcomes:
            self._finish(msg_id, eid, success, out)
        return out

    def submit(self, task: Task, now: float) -> list[Action]:
        """Accept ``task``; returns a :class:`Fail` if it is invalid or already impossible.
        A msg_id that was submitted or finished before raises ValueError."""
        mid, out = task.msg_id, list[Action]()
        if mid in self._jobs or mid in self._outcomes:
            raise ValueError(f"duplicate msg_id {mid!r}")
        for name in ("timeout", "time_limit"):  # (the controller validated them already)
            value = getattr(task, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
        if not isinstance(task.retries, int) or task.retries < 0:
            raise ValueError(f"retries must be an int at least 0, not {task.retries!r}")
        if mid in self._unknown:  # named before it was submitted: see unknown_grace
            for job in list(self._unknown[mid]):
                if job.state == BLOCKED:
                    why = f"unknown dependencies: {mid} (submitted after this task)"
                    self._fail(job, "InvalidDependency", why, out)
                elif job.state != DONE:  # (an any-of met already: it may run, or runs)
                    self._void(job, (mid,))
            self._unknown.pop(mid, None)
        ids = {m for d in (task.after, task.follow) if d is not None for m in d.msg_ids}
        known = (self._jobs, self._outcomes, self._known)
        bad = sorted(m for m in ids if m == mid or not any(m in k for k in known))
        if bad and (not self.unknown_grace or mid in ids):
            out.append(Fail(mid, "InvalidDependency", f"unknown dependencies: {', '.join(bad)}"))
            self._finish(mid, None, False, out)
            return out
        self._jobs[mid] = job = _Job(task, self._deps(task.after), self._deps(task.follow, True))
        for m in ids.difference(self._outcomes):  # (iterates ids, not all outcomes)
            self._waiting.setdefault(m, {})[job] = None
        if bad:
            job.unknown, job.unknown_until = set(bad), now + self.unknown_grace
            for m in bad:
                self._unknown.setdefault(m, {})[job] = None
            heapq.heappush(self._timers, (job.unknown_until, next(self._count), job))
        if task.targets is not None or job.follow is not None:
            self._placed[mid] = job
        job.deadline = now + task.timeout if task.timeout and ids else None
        self._check(job, out)
        return out

    def submit_many(
        self, tasks: Iterable[Task], now: float
    ) -> tuple[list[Action], list[tuple[str, str]]]:
        """Accept a client's batch of tasks, in order, as :meth:`submit` would one by one
        (a task may depend on one before it in the batch).

        Returns the actions, and ``(msg_id, why)`` for each task refused (a msg_id
        submitted before, also earlier in the batch; a field out of range): a bad task is
        refused alone, the others are taken.
        """
        out: list[Action] = []
        refused: list[tuple[str, str]] = []
        for task in tasks:
            try:
                out.extend(self.submit(task, now))
            except ValueError as exc:
                refused.append((task.msg_id, str(exc)))
        return out, refused

    def finished(self, msg_id: str, eid: int, status: Status, now: float) -> list[Action]:
        """Take ``eid``'s reply to ``msg_id`` (stale ones are ignored). "unmet" (@require) reroutes,
        "error" with retries left resubmits (preferring another engine); "final" (an error not to
        retry: over its time limit, or an interrupt named it) and an error reply after abort
        are final; else "error"."""
        job, out = self._jobs.get(msg_id), list[Action]()
        if job is not None and job.state == RUNNING and job.eid == eid:
            del self._inflight[eid][msg_id]
            self._load -= 1
            self._push(eid)
            self._reply(job, eid, status, out)
        return out

    def abort(self, msg_ids: Iterable[str], now: float) -> list[Action]:
        """Fail queued tasks with TaskAborted; dispatched ones are only marked (no action)."""
        out: list[Action] = []
        for job in filter(None, map(self._jobs.get, msg_ids)):
            job.aborting = job.state == RUNNING  # the controller forwards the abort to the engine
            if not job.aborting:
                self._fail(job, "TaskAborted", "aborted before dispatch", out)
        return out

    def drop_client(self, client: bytes, now: float) -> list[Action]:
        """A client is gone: its tasks not yet dispatched fail with TaskAborted (so they stop
        taking engines from others); returns those Fails. Its dispatched tasks run on, and
        :meth:`running_of` lists them for a controller that aborts them too."""
        out: list[Action] = []
        for job in [j for j in self._jobs.values() if j.task.client == client]:
            if job.state != RUNNING and job.state != DONE:
                self._fail(job, "TaskAborted", "its client disconnected before it ran", out)
        return out

    def running_of(self, client: bytes) -> list[tuple[int, str]]:
        """(engine, msg_id) of a client's dispatched tasks."""
        return [(j.eid, m) for m, j in self._jobs.items()
                if j.task.client == client and j.state == RUNNING]  # fmt: skip

    def tick(self, now: float) -> list[Action]:
        """Fail tasks whose dependency timeout or unknown dependency grace passed."""
        out: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            job = heapq.heappop(self._timers)[2]
            if job.state == DONE:
                continue
            if job.unknown and job.unknown_until <= now:
                if job.state == BLOCKED:
                    why = f"unknown dependencies: {', '.join(sorted(job.unknown))}"
                    self._fail(job, "InvalidDependency", why, out)
                    continue
                # (an any-of met already: those still unknown count as failed for it,
                # so that it never waits on them later, after a retry, say)
                self._void(job, tuple(job.unknown))
            if job.state == BLOCKED and job.deadline is not None and job.deadline <= now:
                self._fail(job, "DependencyTimeout", f"not met within {job.task.timeout}s", out)
        return out

    def schedule(self, now: float) -> list[Action]:
        """Dispatch ready tasks to engines with free slots, in O(tasks dispatched) without
        dependencies/targets. Returns only :class:`Dispatch` actions (<= ``max_batch`` each)."""
        if not self._backlog or not self._inflight:
            return []
        inflight, heap, batches = self._inflight, self._heap, dict[int, list[str]]()
        free = self.hwm * len(inflight) - self._load
        cap = self.hwm if self._backlog <= free else max(self.hwm, self.max_batch)
        cap = cap if self.hwm else sys.maxsize
        for eid in list(self._parked):  # parked tasks first: they already had their turn
            parked = self._parked[eid]
            while parked and len(inflight[eid]) < cap:
                gen, job = parked.popleft()
                if job.state == PARKED and job.gen == gen:
                    self._assign(job, eid, now, batches)
            if not parked:
                del self._parked[eid]
        rr, queues = self._rr, self._queues
        while rr:
            queue = queues[rr[0]]
            gen, job = queue[0]
            target: int | None = None
            if job.state == READY and job.gen == gen:
                if job.fixed is not None or job.refused or job.avoid is not None:
                    target = self._place(job, cap)
                elif len(inflight[heap[0][2]]) < cap:  # common case: the least loaded engine
                    target = heap[0][2]
                else:
                    break  # the least loaded engine is full, so all are
            queue.popleft()
            if queue:
                rr.rotate(-1)
            else:
                del queues[rr.popleft()]
            if target is not None:
                self._assign(job, target, now, batches)
        return [Dispatch(e, tuple(m[i : i + self.max_batch])) for e, m in batches.items()
                for i in range(0, len(m), self.max_batch)]  # fmt: skip

    def next_deadline(self) -> float | None:
        """Earliest time at which :meth:`tick` may have something to do, or None."""
        return self._timers[0][0] if self._timers else None

    def queue_status(self) -> dict[str, dict[str, int] | int]:
        """JSON-ready ``{str(eid): {"queue": n, "tasks": n}, "unassigned": n}``; queue and tasks
        both count tasks dispatched and not finished (the controller may add its direct queue)."""
        status: dict[str, dict[str, int] | int] = {"unassigned": len(self._jobs) - self._load}
        for eid, mids in self._inflight.items():
            status[str(eid)] = {"queue": len(mids), "tasks": len(mids)}
        return status

    def runs_on(self, msg_id: str, eid: int) -> bool:
        """Whether ``msg_id`` was dispatched to ``eid`` and has not finished there."""
        return msg_id in self._inflight.get(eid, ())

    def in_flight(self, eid: int) -> tuple[str, ...]:
        """msg_ids dispatched to ``eid`` and not finished, in dispatch order."""
        return tuple(self._inflight.get(eid, ()))

    def pending(self) -> int:
        """Number of submitted tasks without a final outcome yet (queued or in flight)."""
        return len(self._jobs)

    def forget(self, msg_ids: Iterable[str] | None = None) -> None:
        """Drop recorded outcomes (all of them for None): memory; new tasks may then no
        longer depend on them unless the controller declares them again."""
        if msg_ids is None:
            self._outcomes.clear()
            self._known.clear()
            self._order.clear()
            return
        for mid in msg_ids:
            self._outcomes.pop(mid, None)
            self._known.discard(mid)

    def _remember(self, msg_id: str) -> None:
        """Note an outcome or known id; past ``max_outcomes`` the oldest is forgotten."""
        order = self._order
        order.append(msg_id)
        while len(order) > self.max_outcomes:
            old = order.popleft()
            if old not in self._jobs:
                self._outcomes.pop(old, None)
                self._known.discard(old)

    def _now_known(self, msg_id: str) -> None:
        """Tasks that named ``msg_id`` before it was known now just wait for it."""
        for job in self._unknown.pop(msg_id, ()):
            if job.unknown:
                job.unknown.discard(msg_id)

    def _drop_unknown(self, job: _Job) -> None:
        """A job that ended forgets the dependencies it waited on, unknown (which may
        never come: nothing else would remove its entries)."""
        for m in job.unknown or ():
            self._unlink(job, m)
        job.unknown = None

    def _void(self, job: _Job, msg_ids: tuple[str, ...]) -> None:
        """Count these unknown dependencies of ``job`` as failed: it waits on them no more."""
        for m in msg_ids:
            if job.unknown:
                job.unknown.discard(m)
            self._unlink(job, m)
            for d in (job.after, job.follow):
                if d is not None and m in d.spec.msg_ids:
                    d.void()

    def _unlink(self, job: _Job, msg_id: str) -> None:
        for table in (self._unknown, self._waiting):
            jobs = table.get(msg_id)
            if jobs is not None:
                jobs.pop(job, None)
                if not jobs:
                    del table[msg_id]

    def _deps(self, spec: Dependency | None, located: bool = False) -> _Deps | None:
        return _Deps(spec, located, self._outcomes) if spec and spec.msg_ids else None

    def _move(self, job: _Job, state: int) -> None:  # (a new gen invalidates old queue entries)
        self._backlog += (READY <= state <= PARKED) - (READY <= job.state <= PARKED)
        job.state, job.gen = state, job.gen + 1

    def _enqueue(self, job: _Job, front: bool = False) -> None:
        self._move(job, READY)
        queue = self._queues.setdefault(job.task.client, deque())
        if not queue:  # (empty queues are deleted, so this one is new)
            self._rr.append(job.task.client)
        (queue.appendleft if front else queue.append)((job.gen, job))

    def _unpark(self, entries: Iterable[tuple[int, _Job]]) -> None:
        for gen, job in reversed(list(entries)):
            if job.state == PARKED and job.gen == gen:
                self._enqueue(job, front=True)

    def _allowed(self, fixed: set[int] | None, refused: set[int]) -> set[int]:
        live = self._inflight.keys()
        return (live & fixed if fixed is not None else set(live)) - refused

    def _place(self, job: _Job, cap: int) -> int | None:  # least loaded allowed engine, or park
        allowed, load = self._allowed(job.fixed, job.refused), self._inflight
        ok = [e for e in allowed if len(load[e]) < cap]
        best = min(ok, key=lambda e: (e == job.avoid, len(load[e]), self._last[e]), default=None)
        if best is None:
            self._move(job, PARKED)
            for eid in allowed:
                self._parked.setdefault(eid, deque()).append((job.gen, job))
        return best

    def _key(self, eid: int) -> tuple[int, int, int]:
        return len(self._inflight[eid]), self._last[eid], eid

    def _push(self, eid: int | None) -> None:
        """Record a change of ``eid``'s load; drop stale entries so that the top is valid."""
        heap = self._heap
        if eid is not None:
            heapq.heappush(heap, self._key(eid))
        if len(heap) > 4 * len(self._inflight) + 64:
            heap[:] = sorted(map(self._key, self._inflight))  # (a sorted list is a heap)
        while heap and (heap[0][2] not in self._inflight or heap[0] != self._key(heap[0][2])):
            heapq.heappop(heap)

    def _assign(self, job: _Job, eid: int, now: float, batches: dict[int, list[str]]) -> None:
        self._move(job, RUNNING)
        job.eid, self._inflight[eid][job.mid], self._last[eid] = eid, None, next(self._count)
        self._load += 1
        self._push(eid)
        batches.setdefault(eid, []).append(job.mid)

    def _reply(self, job: _Job, eid: int, status: str, out: list[Action], why: str = "") -> None:
        """Decide about a task that left engine ``eid`` (status "died": the engine was lost,
        ``why`` says how)."""
        if status == "ok" or (job.aborting and status == "error"):
            self._finish(job.mid, eid, status == "ok", out)
        elif status == "final":  # (the engine's reply says so: retries or not)
            self._finish(job.mid, eid, False, out)
        elif job.aborting:
            self._fail(job, "TaskAborted", "aborted", out)
        elif status == "unmet":
            job.refused.add(eid)
            self._placed[job.mid] = job
            self._check(job, out, Resubmit(job.mid, eid, f"unmet requirement on {eid}"))
        elif job.retries > 0:
            job.retries, job.avoid = job.retries - 1, eid
            self._check(job, out, Resubmit(job.mid, eid, f"{status} on engine {eid}; retrying"))
        elif status == "died":
            self._fail(job, "EngineError", why or f"engine {eid} died", out)
        else:
            self._finish(job.mid, eid, False, out)

    def _check(self, job: _Job, out: list[Action], note: Resubmit | None = None) -> None:
        failure = self._evaluate(job, front=note is not None)  # retries go first in line
        if failure:
            self._fail(job, *failure, out)
        elif note:
            out.append(note)

    def _evaluate(self, job: _Job, front: bool = False) -> tuple[FailKind, str] | None:
        """Re-decide a job that is not running: return why it is impossible, or block/queue it."""
        a, f, targets = job.after, job.follow, job.task.targets
        if a is not None and (a.bad if a.spec.all else a.bad == len(a.spec.msg_ids)):
            return _IMPOSSIBLE, f"after-dependency can no longer be met: {self._ids(a)}"
        waiting = a is not None and (a.pending > 0 if a.spec.all else not a.good)
        fixed: set[int] | None = None
        if f is not None:
            here = f.where & self._inflight.keys()
            if f.spec.all and (f.bad or len(f.where) > 1 or (f.where and not here)):
                why = "ran on different engines" if len(f.where) > 1 else "can no longer be met"
                return _IMPOSSIBLE, f"follow-dependency {why}: {self._ids(f)}"
            if here and not (f.spec.all and f.pending):
                fixed = here
            elif f.pending:
                waiting = True
            else:
                return _IMPOSSIBLE, f"follow-dependency engines are gone: {self._ids(f)}"
        if targets is not None:
            fixed = set(targets) if fixed is None else fixed & targets
        if (fixed is not None or job.refused) and not self._allowed(fixed, job.refused):
            refused = f"; refused by {sorted(job.refused)}" if job.refused else ""
            return _IMPOSSIBLE, f"no live engine satisfies targets/follow{refused}"
        if waiting and job.state != BLOCKED:
            self._move(job, BLOCKED)
            if job.deadline is not None:
                heapq.heappush(self._timers, (job.deadline, next(self._count), job))
        elif not waiting:
            job.fixed = fixed
            if job.state != READY:  # a parked job is requeued too: its engines may have changed
                self._enqueue(job, front)
        return None

    def _ids(self, d: _Deps) -> str:
        done, s = self._outcomes, d.spec  # name deps that finished without counting, or all
        bad = [m for m in s.msg_ids & done.keys() if not (s.failure, s.success)[done[m][1]]]
        return ", ".join(sorted(bad or s.msg_ids))

    def _fail(self, job: _Job, kind: FailKind, reason: str, out: list[Action]) -> None:
        eid = job.eid if job.state == RUNNING else None  # a dispatched job failed on its engine
        out.append(Fail(job.mid, kind, reason, eid))
        self._finish(job.mid, eid, False, out)

    def _finish(self, msg_id: str, eid: int | None, success: bool, out: list[Action]) -> None:
        """Record a final outcome and re-evaluate dependents (iteratively: chains may be long)."""
        stack = [(msg_id, eid, success)]
        while stack:
            mid, where, ok = stack.pop()
            if (job := self._jobs.pop(mid, None)) is not None:
                self._move(job, DONE)
                if job.unknown:
                    self._drop_unknown(job)
            if self._unknown:
                self._now_known(mid)
            self._placed.pop(mid, None)
            self._outcomes[mid] = (where, ok)
            self._known.discard(mid)
            self._remember(mid)
            waiting = self._waiting.pop(mid, None)
            if not waiting:  # (most tasks: nothing waits for them)
                continue
            for dep in (j for j in waiting if j.state != DONE):
                for d in (dep.after, dep.follow):
                    if d is not None and mid in d.spec.msg_ids:
                        d.add(where, ok)
                failure = self._evaluate(dep) if dep.state == BLOCKED else None
                if failure:  # DONE at once, so that no other wake fails it twice
                    out.append(Fail(dep.mid, *failure))
                    self._move(dep, DONE)
                    stack.append((dep.mid, None, False))
