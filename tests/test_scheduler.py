"""Tests for the pure-logic load-balancing scheduler (no processes, no clocks)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence

import pytest

from kernel_engine.controller.scheduler import (
    Action,
    Dependency,
    Dispatch,
    Fail,
    Resubmit,
    Scheduler,
    Task,
)


def dep(*ids: str, **kw: bool) -> Dependency:
    return Dependency(frozenset(ids), **kw)


def task(mid: str, client: bytes = b"c", **kw: object) -> Task:
    return Task(mid, client, **kw)  # type: ignore[arg-type]


def dispatched(actions: Iterable[Action]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for a in actions:
        if isinstance(a, Dispatch):
            out[a.eid].extend(a.msg_ids)
    return dict(out)


def fails(actions: Iterable[Action]) -> dict[str, str]:
    return {a.msg_id: a.kind for a in actions if isinstance(a, Fail)}


class Sim:
    """A fake controller: carries out actions, checks every decision, records final outcomes."""

    def __init__(self, sched: Scheduler, engines: Iterable[int] = (0, 1)) -> None:
        self.s = sched
        self.now = 0.0
        self.running: dict[int, list[str]] = {}
        self.where: dict[str, int] = {}
        self.ran_on: dict[str, int] = {}
        self.tasks: dict[str, Task] = {}
        self.finals: dict[str, list[str]] = defaultdict(list)
        self.outcome: dict[str, tuple[int | None, bool]] = {}
        self.refused: dict[str, set[int]] = defaultdict(set)
        self.log: list[tuple[str, str, object]] = []
        for eid in engines:
            self.add(eid)

    # -- events
    def add(self, eid: int) -> None:
        self.s.add_engine(eid)
        self.running.setdefault(eid, [])

    def remove(self, eid: int) -> list[Action]:
        lost = self.running.pop(eid)
        for m in lost:
            del self.where[m]
        acts = self.s.remove_engine(eid, self.now)
        for m in lost:
            verdicts = [a for a in acts if isinstance(a, Fail | Resubmit) and a.msg_id == m]
            assert len(verdicts) == 1, (m, acts)
        self.apply(acts, dict.fromkeys(lost, eid))
        return acts

    def submit(self, t: Task) -> list[Action]:
        self.tasks[t.msg_id] = t
        acts = self.s.submit(t, self.now)
        self.apply(acts)
        return acts

    def submit_many(self, ts: Sequence[Task]) -> list[tuple[str, str]]:
        """A client's batch; returns the tasks refused (which never become tasks)."""
        acts, refused = self.s.submit_many(ts, self.now)
        for t in ts:
            self.tasks.setdefault(t.msg_id, t)
        self.apply(acts)
        return refused

    def schedule(self) -> list[Action]:
        acts = self.s.schedule(self.now)
        assert all(isinstance(a, Dispatch) for a in acts)
        self.apply(acts)
        return acts

    def tick(self, now: float) -> list[Action]:
        self.now = now
        acts = self.s.tick(now)
        self.apply(acts)
        nd = self.s.next_deadline()
        assert nd is None or nd > now
        return acts

    def finish(self, mid: str, status: str = "ok") -> list[Action]:
        eid = self.where.pop(mid)
        self.running[eid].remove(mid)
        acts = self.s.finished(mid, eid, status, self.now)  # type: ignore[arg-type]
        mine = [a for a in acts if isinstance(a, Fail | Resubmit) and a.msg_id == mid]
        assert len(mine) <= 1
        if status == "unmet":
            assert mine, "an unmet reply is never final"
            self.refused[mid].add(eid)
        if not mine:
            self.final(mid, status, (eid, status == "ok"))
        self.apply(acts, {mid: eid})
        return acts

    def direct_done(self, mid: str, eid: int, ok: bool) -> None:
        self.outcome[mid] = (eid, ok)
        self.apply(self.s.record_outcome(mid, eid, ok))

    # -- bookkeeping and checks
    def final(self, mid: str, how: str, outcome: tuple[int | None, bool]) -> None:
        assert not self.finals[mid], f"{mid} got a second outcome {how}: {self.finals[mid]}"
        self.finals[mid].append(how)
        self.outcome[mid] = outcome
        self.log.append(("final", mid, how))

    def apply(self, acts: Sequence[Action], on: dict[str, int] | None = None) -> None:
        """Carry out ``acts``; ``on``: engines the tasks a Fail may name were just running on."""
        for a in acts:
            if isinstance(a, Dispatch):
                assert a.eid in self.running and 1 <= len(a.msg_ids) <= self.s.max_batch
                for m in a.msg_ids:
                    self.check_dispatch(m, a.eid)
                    self.running[a.eid].append(m)
                    self.where[m] = self.ran_on[m] = a.eid
                    self.log.append(("dispatch", m, a.eid))
            elif isinstance(a, Fail):
                self.final(a.msg_id, "Fail:" + a.kind, ((on or {}).get(a.msg_id), False))

    def met(self, d: Dependency | None, eid: int | None = None) -> bool:
        if d is None or not d.msg_ids:
            return True

        def counts(m: str) -> bool:
            o = self.outcome.get(m)
            if o is None or (eid is not None and o[0] != eid):
                return False
            return d.success if o[1] else d.failure

        return (all if d.all else any)(counts(m) for m in d.msg_ids)

    def check_dispatch(self, mid: str, eid: int) -> None:
        t = self.tasks[mid]
        assert not self.finals[mid] and mid not in self.where, mid
        assert t.targets is None or eid in t.targets
        assert eid not in self.refused[mid]
        assert self.met(t.after), (mid, t.after)
        assert self.met(t.follow, eid), (mid, t.follow, eid)

    def run(self, rng: random.Random | None = None, status: str = "ok") -> None:
        """Schedule and finish tasks (oldest first, or at random) until nothing is in flight."""
        while True:
            self.schedule()
            busy = [m for ms in self.running.values() for m in ms]
            if not busy:
                return
            self.finish(rng.choice(busy) if rng else busy[0], status)


# ---- load balancing ---------------------------------------------------------------------------
def test_least_load_distribution_and_round_robin_ties() -> None:
    sim = Sim(Scheduler(hwm=4), engines=(0, 1, 2))
    for i in range(6):
        sim.submit(task(f"t{i}"))
    assert dispatched(sim.schedule()) == {0: ["t0", "t3"], 1: ["t1", "t4"], 2: ["t2", "t5"]}
    sim.finish("t0")
    sim.finish("t3")
    sim.finish("t1")
    for i in range(6, 9):
        sim.submit(task(f"t{i}"))
    # e0 is idle, e1 has one, e2 has two: least load first
    assert dispatched(sim.schedule()) == {0: ["t6", "t8"], 1: ["t7"]}
    # ties are broken round-robin: one task at a time walks over the engines
    sim2 = Sim(Scheduler(), engines=(0, 1, 2))
    order = []
    for i in range(6):
        sim2.submit(task(f"u{i}"))
        (eid,) = dispatched(sim2.schedule())
        order.append(eid)
        sim2.finish(f"u{i}")
    assert order == [0, 1, 2, 0, 1, 2]


def test_hwm_caps_tasks_in_flight() -> None:
    sim = Sim(Scheduler(hwm=2, max_batch=2), engines=(0, 1, 2))
    for i in range(10):
        sim.submit(task(f"t{i}"))
    got = dispatched(sim.schedule())
    assert {e: len(m) for e, m in got.items()} == {0: 2, 1: 2, 2: 2}
    status = sim.s.queue_status()
    assert status["unassigned"] == 4 and status["1"] == {"queue": 2, "tasks": 2}
    assert json.loads(json.dumps(status)) == status
    assert sim.s.schedule(0.0) == []
    sim.finish(got[1][0])
    assert dispatched(sim.schedule()) == {1: ["t6"]}
    assert sim.s.in_flight(1) == (got[1][1], "t6") and sim.s.pending() == 9
    # hwm=0: unlimited
    sim0 = Sim(Scheduler(hwm=0), engines=(0, 1))
    for i in range(50):
        sim0.submit(task(f"t{i}"))
    assert sorted(len(m) for m in dispatched(sim0.schedule()).values()) == [25, 25]


def test_batching_when_queue_is_deep() -> None:
    sim = Sim(Scheduler(hwm=4, max_batch=32))
    for i in range(100):
        sim.submit(task(f"t{i}"))
    acts = sim.schedule()
    # deep queue (100 ready > 8 free slots): cap rises to max_batch, one Dispatch per engine
    assert [(a.eid, len(a.msg_ids)) for a in acts if isinstance(a, Dispatch)] == [(0, 32), (1, 32)]
    assert sim.s.queue_status()["unassigned"] == 36
    for m in list(sim.running[0])[:5]:
        sim.finish(m)
    acts = sim.schedule()
    assert len(acts) == 1 and isinstance(acts[0], Dispatch) and len(acts[0].msg_ids) == 5
    # shallow queue: hwm holds
    sim2 = Sim(Scheduler(hwm=4, max_batch=32))
    for i in range(6):
        sim2.submit(task(f"t{i}"))
    assert sorted(len(m) for m in dispatched(sim2.schedule()).values()) == [3, 3]
    # unlimited hwm: split into max_batch-sized Dispatches
    sim3 = Sim(Scheduler(hwm=0, max_batch=32), engines=(0,))
    for i in range(100):
        sim3.submit(task(f"t{i}"))
    assert [len(a.msg_ids) for a in sim3.schedule() if isinstance(a, Dispatch)] == [32, 32, 32, 4]
    # max_batch <= hwm keeps hwm strict even with a deep queue
    sim4 = Sim(Scheduler(hwm=2, max_batch=2))
    for i in range(20):
        sim4.submit(task(f"t{i}"))
    assert sorted(len(m) for m in dispatched(sim4.schedule()).values()) == [2, 2]


def test_fairness_between_clients() -> None:
    sim = Sim(Scheduler(hwm=1, max_batch=1), engines=(0,))
    for i in range(10):
        sim.submit(task(f"a{i}", b"A"))
    for i in range(3):
        sim.submit(task(f"b{i}", b"B"))
    sim.run()
    order = [m for kind, m, _ in sim.log if kind == "dispatch"]
    assert order[:7] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3"]
    # a batch interleaves clients too
    sim2 = Sim(Scheduler(hwm=8, max_batch=8), engines=(0,))
    for i in range(20):
        sim2.submit(task(f"a{i}", b"A"))
    for i in range(3):
        sim2.submit(task(f"b{i}", b"B"))
    assert dispatched(sim2.schedule()) == {0: ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4"]}


def test_targets_restrict_engines_without_blocking_others() -> None:
    sim = Sim(Scheduler(hwm=1, max_batch=1), engines=(0, 1, 2))
    for i in range(3):
        sim.submit(task(f"pin{i}", targets=frozenset({2})))
    for i in range(4):
        sim.submit(task(f"free{i}"))
    got = dispatched(sim.schedule())
    assert got == {2: ["pin0"], 0: ["free0"], 1: ["free1"]}
    sim.finish("pin0")
    assert dispatched(sim.schedule()) == {2: ["pin1"]}  # parked task served first on engine 2
    sim.run()
    assert all(sim.ran_on[f"pin{i}"] == 2 for i in range(3))
    acts = sim.submit(task("nowhere", targets=frozenset({7})))
    assert fails(acts) == {"nowhere": "ImpossibleDependency"}
    # a target engine that registers later takes its parked tasks
    sim2 = Sim(Scheduler(hwm=1, max_batch=1), engines=(0,))
    sim2.submit(task("x"))
    sim2.submit(task("y", targets=frozenset({0, 5})))
    assert dispatched(sim2.schedule()) == {0: ["x"]}
    assert sim2.schedule() == []
    sim2.add(5)
    assert dispatched(sim2.schedule()) == {5: ["y"]}


def test_tasks_wait_for_engines() -> None:
    sim = Sim(Scheduler(), engines=())
    sim.submit(task("t"))
    assert sim.schedule() == [] and sim.s.pending() == 1
    sim.add(3)
    assert dispatched(sim.schedule()) == {3: ["t"]}


# ---- dependencies -----------------------------------------------------------------------------
def _ok_and_failed(sim: Sim) -> None:
    sim.submit(task("ok", targets=frozenset({0})))
    sim.submit(task("bad", targets=frozenset({1})))
    sim.schedule()
    sim.finish("ok")
    sim.finish("bad", "error")


@pytest.mark.parametrize(
    ("kw", "ids", "runs"),
    [
        ({}, ("ok",), True),
        ({}, ("ok", "bad"), False),
        ({"all": False}, ("ok", "bad"), True),
        ({"all": False}, ("bad",), False),
        ({"failure": True}, ("ok", "bad"), True),
        ({"success": False, "failure": True}, ("bad",), True),
        ({"success": False, "failure": True}, ("ok", "bad"), False),
        ({"success": False, "failure": True, "all": False}, ("ok", "bad"), True),
        ({"success": False}, ("ok",), False),
    ],
)
def test_after_flags(kw: dict[str, bool], ids: tuple[str, ...], runs: bool) -> None:
    sim = Sim(Scheduler())
    _ok_and_failed(sim)
    acts = sim.submit(task("t", after=dep(*ids, **kw)))
    if runs:
        assert not acts and dispatched(sim.schedule()) != {}
    else:
        (f,) = acts
        assert isinstance(f, Fail) and f.kind == "ImpossibleDependency"
        assert ("bad" in f.reason) == ("bad" in ids and not kw.get("failure"))


def test_after_waits_and_wakes() -> None:
    sim = Sim(Scheduler())
    sim.submit(task("a"))
    sim.submit(task("b"))
    sim.submit(task("all", after=dep("a", "b")))
    sim.submit(task("any", after=dep("a", "b", all=False)))
    sim.submit(task("fail_ok", after=dep("a", success=False, failure=True)))
    assert dispatched(sim.schedule()) == {0: ["a"], 1: ["b"]}
    acts = sim.finish("a")
    assert fails(acts) == {"fail_ok": "ImpossibleDependency"}
    assert dispatched(sim.schedule()) == {0: ["any"]}
    sim.finish("b")
    assert dispatched(sim.schedule()) == {1: ["all"]}


def test_follow_location_dependencies() -> None:
    sim = Sim(Scheduler(hwm=0), engines=(0, 1, 2))
    sim.submit(task("on1", targets=frozenset({1})))
    sim.submit(task("on2", targets=frozenset({2})))
    sim.run()
    for i in range(4):
        sim.submit(task(f"f{i}", follow=dep("on1")))
    sim.submit(task("any", follow=dep("on1", "on2", all=False)))
    got = dispatched(sim.schedule())
    assert got[1] == ["f0", "f1", "f2", "f3"] and sum(map(len, got.values())) == 5
    acts = sim.submit(task("split", follow=dep("on1", "on2")))
    assert fails(acts) == {"split": "ImpossibleDependency"}
    assert "on1" in acts[0].reason and "on2" in acts[0].reason  # type: ignore[union-attr]
    # after=all with failure=True on different engines is fine; follow is not
    sim.submit(task("after_ok", after=dep("on1", "on2", failure=True)))
    assert dispatched(sim.schedule())
    # a follow on a direct (non load-balanced) task
    sim.s.note_known("direct")
    sim.submit(task("fd", follow=dep("direct")))
    assert sim.schedule() == []
    sim.direct_done("direct", 2, True)
    assert dispatched(sim.schedule()) == {2: ["fd"]}


def test_follow_engine_removed_is_impossible() -> None:
    sim = Sim(Scheduler(hwm=1, max_batch=1), engines=(0, 1))
    sim.submit(task("a", targets=frozenset({1})))
    sim.run()
    sim.submit(task("busy", targets=frozenset({1})))
    sim.schedule()
    sim.submit(task("f", follow=dep("a")))
    sim.submit(task("g", after=dep("f")))
    assert sim.schedule() == []  # engine 1 is full: f is parked there
    acts = sim.remove(1)
    assert fails(acts) == {"busy": "EngineError", "f": "ImpossibleDependency",
                           "g": "ImpossibleDependency"}  # fmt: skip
    # and a waiting follow whose dep engine vanishes
    sim.submit(task("p", targets=frozenset({0})))
    sim.submit(task("q", targets=frozenset({0})))
    sim.schedule()
    sim.submit(task("w", follow=dep("p", "q")))
    sim.finish("p")
    sim.add(2)
    # q (still queued, targets={0}) and w (p ran on the removed engine) can no longer run
    assert fails(sim.remove(0)) == {"q": "ImpossibleDependency", "w": "ImpossibleDependency"}


def test_dependency_timeout() -> None:
    sim = Sim(Scheduler(hwm=1, max_batch=1), engines=(0,))
    sim.submit(task("slow"))
    sim.schedule()
    sim.now = 10.0
    sim.submit(task("t", after=dep("slow"), timeout=5.0))
    sim.submit(task("child", after=dep("t")))
    sim.submit(task("no_timeout", after=dep("slow")))
    assert sim.s.next_deadline() == 15.0
    assert sim.tick(14.9) == []
    assert fails(sim.tick(15.0)) == {"t": "DependencyTimeout", "child": "ImpossibleDependency"}
    assert sim.s.next_deadline() is None
    sim.finish("slow")
    assert dispatched(sim.schedule()) == {0: ["no_timeout"]}


def test_invalid_dependency() -> None:
    sim = Sim(Scheduler())
    acts = sim.submit(task("t", after=dep("ghost")))
    assert fails(acts) == {"t": "InvalidDependency"} and "ghost" in acts[0].reason  # type: ignore[union-attr]
    assert fails(sim.submit(task("self", follow=dep("self")))) == {"self": "InvalidDependency"}
    # the failed invalid task is itself a known (failed) dependency now
    assert fails(sim.submit(task("u", after=dep("t")))) == {"u": "ImpossibleDependency"}
    sim.s.note_known("direct")
    sim.s.record_outcome("other_direct", 0, True)
    assert sim.submit(task("v", after=dep("direct", "other_direct"))) == []
    assert sim.s.pending() == 1
    with pytest.raises(ValueError, match="duplicate"):
        sim.s.submit(task("v"), 0.0)
    sim.s.forget(["other_direct"])  # outcomes can be dropped to bound memory
    assert fails(sim.submit(task("w", after=dep("other_direct")))) == {"w": "InvalidDependency"}


def test_unknown_dependency_waits_for_the_grace() -> None:
    # the controller hears of a request sent outside load balancing a little after it
    # was sent: a task that names it meanwhile waits for it, not fails
    sim = Sim(Scheduler(unknown_grace=2.0))
    assert sim.submit(task("t", after=dep("direct"))) == []
    assert sim.s.next_deadline() == 2.0
    sim.s.heard_of("direct")
    assert sim.tick(2.0) == [] and sim.schedule() == []  # known now: waits for its outcome
    sim.direct_done("direct", 0, True)
    assert dispatched(sim.schedule()) == {0: ["t"]}

    sim.now = 10.0
    assert sim.submit(task("u", after=dep("ghost", "direct2"), retries=1)) == []
    assert sim.submit(task("child", after=dep("u"))) == []
    sim.direct_done("direct2", 1, True)  # an outcome is news enough
    assert sim.tick(11.9) == []
    acts = sim.tick(12.0)
    assert fails(acts) == {"u": "InvalidDependency", "child": "ImpossibleDependency"}
    reason = next(a.reason for a in acts if isinstance(a, Fail) and a.msg_id == "u")
    assert "ghost" in reason and "direct2" not in reason
    assert sim.s.knows("u")  # (a failed task is a known, failed, dependency)


def test_unknown_dependency_never_makes_a_cycle_or_a_leak() -> None:
    sim = Sim(Scheduler(unknown_grace=2.0))
    # a task naming itself, or one submitted after it, fails at once, grace or not: so
    # a task only ever waits for tasks submitted before it (no cycle can form)
    assert fails(sim.submit(task("self", after=dep("self", "x")))) == {"self": "InvalidDependency"}
    assert sim.submit(task("early", after=dep("late"))) == []
    assert sim.submit(task("early2", after=dep("late", "a"), follow=dep("late"))) == []
    acts = sim.submit(task("late", after=dep("early")))
    expected = {"early": "InvalidDependency", "early2": "InvalidDependency"}
    assert fails(acts) == {**expected, "late": "ImpossibleDependency"}  # (late named early)
    assert "submitted after" in acts[0].reason  # type: ignore[union-attr]
    assert fails(sim.submit(task("on_time"))) == {}
    assert fails(sim.submit(task("after_it", after=dep("on_time")))) == {}
    sim.run()
    assert sim.finals["after_it"] == ["ok"]
    # a task that ends otherwise while it waits drops what it waited on, unknown
    sim.submit(task("timed", after=dep("ghost1"), timeout=0.5))
    sim.submit(task("aborted", after=dep("ghost2", "ghost3")))
    sim.submit(task("gone", b"other", after=dep("ghost3")))
    assert fails(sim.tick(0.5)) == {"timed": "DependencyTimeout"}
    assert fails(sim.s.abort(["aborted"], 0.5)) == {"aborted": "TaskAborted"}
    assert fails(sim.s.drop_client(b"other", 0.5)) == {"gone": "TaskAborted"}
    assert sim.tick(10.0) == [] and sim.s.pending() == 0
    assert sim.s._unknown == {} and sim.s._waiting == {}
    # many tasks naming many unknown ids: each ends in time linear in what it names
    for i in range(200):
        sim.submit(task(f"m{i}", after=dep(*(f"g{j}" for j in range(2000)))))
    assert len(fails(sim.tick(20.0))) == 200
    assert sim.s._unknown == {} and sim.s._waiting == {}


def test_a_task_that_may_run_counts_an_unknown_dependency_as_failed() -> None:
    # (an any-of dependency met: it is not failed, nor interrupted, by what it named)
    sim = Sim(Scheduler(unknown_grace=2.0, hwm=4), engines=(0,))
    sim.submit(task("t", after=dep("x")))  # its grace timer: no time limit to interrupt
    sim.now = 0.3
    sim.s.heard_of("x")
    sim.direct_done("x", 0, True)
    assert dispatched(sim.schedule()) == {0: ["t"]}
    assert sim.tick(2.0) == []
    sim.finish("t")
    # a task submitted under an id that a running task named: the running one runs on
    sim.submit(task("a"))
    sim.run()
    sim.submit(task("j", after=dep("a", "y", all=False), retries=1))
    sim.submit(task("k", retries=1))
    assert dispatched(sim.schedule()) == {0: ["j", "k"]}
    assert fails(sim.submit(task("y"))) == {}
    assert sorted(sim.s.in_flight(0)) == ["j", "k"]
    assert sim.remove(0) and sim.s.pending() == 3  # (retried: no KeyError, none lost)
    sim.add(1)
    sim.run()
    assert [sim.finals[m] for m in ("j", "k", "y")] == [["ok"]] * 3
    # one still unknown at its grace's end counts as failed for a task that could run:
    # it never waits on it later (here its follow's engine dies, and it has none left)
    sim.submit(task("b"))
    sim.run()
    sim.submit(task("f", follow=dep("b", "ghost", all=False)))
    sim.tick(sim.now + 5.0)
    sim.remove(1)
    assert fails(sim.tick(sim.now + 1.0)) == {} and sim.finals["f"] == ["Fail:ImpossibleDependency"]
    assert sim.s.pending() == 0 and not sim.s._unknown and not sim.s._waiting


def test_empty_dependency_is_met() -> None:
    sim = Sim(Scheduler())
    sim.submit(task("t", after=dep(), follow=dep(all=False)))
    assert dispatched(sim.schedule())


def test_failure_cascades_down_long_chains() -> None:
    sim = Sim(Scheduler(), engines=(0,))
    sim.submit(task("t0"))
    for i in range(1, 5000):
        sim.submit(task(f"t{i}", after=dep(f"t{i - 1}")))
    sim.schedule()
    acts = sim.finish("t0", "error")
    assert len(fails(acts)) == 4999 and sim.s.pending() == 0


# ---- retries, rerouting, engine loss ----------------------------------------------------------
def test_retry_on_error_prefers_another_engine() -> None:
    sim = Sim(Scheduler())
    sim.submit(task("t", retries=1))
    assert dispatched(sim.schedule()) == {0: ["t"]}
    acts = sim.finish("t", "error")
    assert acts == [Resubmit("t", 0, acts[0].reason)]  # type: ignore[union-attr]
    assert dispatched(sim.schedule()) == {1: ["t"]}
    assert sim.finish("t", "error") == []  # no retries left: the error reply is final
    assert sim.finals["t"] == ["error"]


def test_retry_falls_back_to_same_engine_when_alone() -> None:
    sim = Sim(Scheduler(), engines=(0,))
    sim.submit(task("t", retries=2))
    sim.schedule()
    sim.finish("t", "error")
    assert dispatched(sim.schedule()) == {0: ["t"]}


def test_a_lost_task_retried_then_failed_by_the_cascade_gets_one_verdict() -> None:
    """A follows B or C: C ran on engine 0, A runs there, B is retried there behind it.
    Engine 0 dies: A is retried (B may still run), then B fails for good, and with it A's
    follow-dependency. A's only verdict is that Fail (it used to get a Resubmit too)."""
    sim = Sim(Scheduler())
    sim.submit(task("C", targets=frozenset({0})))
    sim.schedule()
    sim.finish("C")
    sim.submit(task("B", retries=1, targets=frozenset({0})))
    sim.schedule()
    sim.submit(task("A", follow=dep("B", "C", all=False), retries=1))
    assert dispatched(sim.schedule()) == {0: ["A"]}
    sim.finish("B", "error")  # (retried on 0, behind A)
    assert dispatched(sim.schedule()) == {0: ["B"]}
    acts = sim.remove(0)  # (asserts one verdict for each of A and B)
    assert fails(acts) == {"B": "EngineError", "A": "ImpossibleDependency"}
    assert not [a for a in acts if isinstance(a, Resubmit)]
    assert sim.s.pending() == 0


@pytest.mark.parametrize("retries", [0, 1])
def test_engine_removed_mid_workload(retries: int) -> None:
    rng = random.Random(7)
    sim = Sim(Scheduler(hwm=4), engines=(0, 1, 2))
    for i in range(60):
        sim.submit(task(f"t{i}", (b"a", b"b")[i % 2], retries=retries))
    for _ in range(25):
        sim.schedule()
        sim.finish(rng.choice([m for ms in sim.running.values() for m in ms]))
    lost = list(sim.running[1])
    assert lost
    acts = sim.remove(1)
    sim.run(rng)
    assert sim.s.pending() == 0
    assert all(len(sim.finals[f"t{i}"]) == 1 for i in range(60))
    if retries:
        assert all(isinstance(a, Resubmit) for a in acts)
        assert all(sim.finals[f"t{i}"] == ["ok"] for i in range(60))
    else:
        assert fails(acts) == dict.fromkeys(lost, "EngineError")
        assert sum(f == ["ok"] for f in sim.finals.values()) == 60 - len(lost)
    # late replies from the removed engine are ignored
    assert sim.s.finished(lost[0], 1, "ok", 0.0) == []


def test_unmet_reroutes_then_fails() -> None:
    sim = Sim(Scheduler(), engines=(0, 1, 2))
    sim.submit(task("t"))
    seen = []
    for _ in range(3):
        (eid,) = dispatched(sim.schedule())
        seen.append(eid)
        acts = sim.finish("t", "unmet")
    assert sorted(seen) == [0, 1, 2]
    assert fails(acts) == {"t": "ImpossibleDependency"}
    # rerouting never costs retries and respects targets
    sim.submit(task("u", targets=frozenset({0, 1}), retries=0))
    for _ in range(2):
        sim.schedule()
        acts = sim.finish("u", "unmet")
    assert fails(acts) == {"u": "ImpossibleDependency"} and "refused" in acts[0].reason  # type: ignore[union-attr]


# ---- time limits, abort -----------------------------------------------------------------------
def test_a_timeout_reply_is_final() -> None:
    # (the engine counts a task's time limit from its start and replies TaskTimeout: the
    # scheduler neither times tasks, which would count their wait behind others on an
    # engine, nor retries one that ran out of time)
    sim = Sim(Scheduler(hwm=4), engines=(0,))
    for name in ("t", "u"):
        sim.submit(task(name, time_limit=1.0, retries=3))
    assert dispatched(sim.schedule()) == {0: ["t", "u"]}
    assert sim.s.next_deadline() is None and sim.tick(100.0) == []
    assert sim.finish("t", "final") == []
    assert sim.finals["t"] == ["final"]
    assert fails(sim.submit(task("after_t", after=dep("t")))) == {"after_t": "ImpossibleDependency"}
    sim.finish("u")
    assert sim.finals["u"] == ["ok"] and sim.s.pending() == 0


def test_abort() -> None:
    sim = Sim(Scheduler(hwm=1, max_batch=1), engines=(0,))
    sim.submit(task("run", retries=2))
    sim.schedule()
    sim.submit(task("queued"))
    sim.submit(task("waiting", after=dep("run")))
    acts = sim.s.abort(["queued", "waiting", "run", "unknown"], 0.0)
    sim.apply(acts)
    assert fails(acts) == {"queued": "TaskAborted", "waiting": "TaskAborted"}
    assert sim.finish("run", "error") == []  # aborted on the engine: final, no retry
    assert sim.s.pending() == 0 and sim.schedule() == []


# ---- DAG --------------------------------------------------------------------------------------
def test_dag_runs_in_topological_order() -> None:
    rng = random.Random(2024)
    sim = Sim(Scheduler(hwm=2), engines=(0, 1, 2))
    parents: dict[str, list[str]] = {}
    for i in range(80):
        names = [f"n{j}" for j in rng.sample(range(i), min(i, rng.randint(0, 3)))]
        parents[f"n{i}"] = names
        sim.submit(task(f"n{i}", after=dep(*names) if names else None))
    sim.run(rng)
    pos = {(kind, m): i for i, (kind, m, _) in enumerate(sim.log)}
    assert all(sim.finals[n] == ["ok"] for n in parents)
    for n, ps in parents.items():
        assert all(pos[("final", p)] < pos[("dispatch", n)] for p in ps)


# ---- property-style random test ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_random_events_every_task_has_exactly_one_outcome(seed: int) -> None:
    rng = random.Random(seed)
    grace = 0.0 if seed % 2 else 6.0
    sim = Sim(
        Scheduler(
            hwm=rng.choice([0, 1, 2, 4]), max_batch=rng.choice([1, 3, 32]), unknown_grace=grace
        )
    )
    next_eid = 2
    direct: list[str] = []
    ids: list[str] = []
    upcoming: list[str] = []  # direct requests named before the scheduler hears of them

    def random_dep() -> Dependency | None:
        pool = ids + direct + list(sim.outcome)
        if not pool or rng.random() < 0.5:
            return None
        names = set(rng.sample(pool, min(len(pool), rng.randint(1, 3))))
        if rng.random() < 0.03:
            names.add("ghost")
        if rng.random() < 0.05:
            upcoming.append(f"u{seed}-{len(ids)}-{len(upcoming)}")
            names.add(upcoming[-1])
        return Dependency(frozenset(names), rng.random() < 0.7, rng.random() < 0.9,
                          rng.random() < 0.3)  # fmt: skip

    for step in range(400):
        r = rng.random()
        busy = [m for ms in sim.running.values() for m in ms]
        if r < 0.3:
            mid = f"s{seed}-{step}"
            targets = None
            if rng.random() < 0.2:
                targets = frozenset(rng.sample(range(next_eid + 1), rng.randint(1, 2)))
            sim.submit(task(
                mid, rng.choice([b"a", b"b", b"c"]), targets=targets, after=random_dep(),
                follow=random_dep() if rng.random() < 0.3 else None,
                timeout=rng.choice([None, 1.0, 5.0]), retries=rng.randint(0, 2),
                time_limit=rng.choice([None, None, 2.0]),
            ))  # fmt: skip
            ids.append(mid)
        elif r < 0.5:
            sim.schedule()
        elif r < 0.75 and busy:
            status = rng.choices(["ok", "error", "unmet", "final"], [7, 2, 1, 1])[0]
            sim.finish(rng.choice(busy), status)
        elif r < 0.83:
            sim.tick(sim.now + rng.uniform(0, 2))
        elif r < 0.87:
            sim.add(next_eid)
            next_eid += 1
        elif r < 0.91 and sim.running:
            sim.remove(rng.choice(sorted(sim.running)))
        elif r < 0.94 and ids:
            sim.apply(sim.s.abort(rng.sample(ids, min(len(ids), 3)), sim.now))
        elif r < 0.97:
            if upcoming and rng.random() < 0.9:
                direct.append(upcoming.pop(0))
                sim.s.heard_of(direct[-1])
            else:
                direct.append(f"d{seed}-{step}")
                sim.s.note_known(direct[-1])
        elif direct:
            sim.direct_done(direct.pop(0), rng.randrange(next_eid), rng.random() < 0.8)
        for eid, ms in sim.running.items():
            assert sorted(sim.s.in_flight(eid)) == sorted(ms)
        assert sim.s.pending() == sum(1 for m in ids if not sim.finals[m])
    # drain: every task must reach an outcome
    if not sim.running:
        sim.add(next_eid)
    for m in direct:
        sim.direct_done(m, 0, True)
    for _ in range(50):
        sim.run(rng)
        sim.tick(sim.now + 100.0)
        if sim.s.pending() == 0:
            break
    assert sim.s.pending() == 0
    assert all(len(sim.finals[m]) == 1 for m in ids), [m for m in ids if len(sim.finals[m]) != 1]
    assert not sim.s._unknown and not sim.s._waiting


# ---- batches of tasks (a client's map in one message) ---------------------------------------
def test_a_batch_is_taken_as_its_tasks_one_by_one() -> None:
    """Dependencies inside the batch (on an earlier task: waits; on a later one: invalid,
    as one by one), targets, retries: the same decisions as submitting in order."""
    rng = random.Random(11)
    batch = []
    for i in range(60):
        kw: dict[str, object] = {}
        if i and rng.random() < 0.3:
            kw["after"] = dep(f"t{rng.randrange(i)}")
        if rng.random() < 0.1:
            kw["targets"] = frozenset({rng.randrange(3)})
        if rng.random() < 0.1:
            kw["retries"] = 1
        batch.append(task(f"t{i}", **kw))
    batch.append(task("early", after=dep("late")))
    batch.append(task("late"))
    one_by_one, together = Sim(Scheduler(hwm=4), (0, 1, 2)), Sim(Scheduler(hwm=4), (0, 1, 2))
    for t in batch:
        one_by_one.submit(t)
    assert together.submit_many(batch) == []
    for sim in (one_by_one, together):
        sim.run(random.Random(5), "error")
        sim.run(random.Random(5))
    assert together.log == one_by_one.log
    assert together.finals["early"] == ["Fail:InvalidDependency"]
    assert all(len(together.finals[t.msg_id]) == 1 for t in batch)


def test_a_bad_task_in_a_batch_is_refused_alone() -> None:
    sim = Sim(Scheduler(hwm=8))
    sim.submit(task("old"))
    refused = sim.submit_many(
        [
            task("a"),
            task("old"),  # submitted before
            task("b", retries=-1),
            task("a"),  # twice in the batch
            task("c", after=dep("a")),
            task("d", time_limit=float("nan")),
        ]
    )
    assert [m for m, _ in refused] == ["old", "b", "a", "d"]
    assert "duplicate" in refused[0][1] and "retries" in refused[1][1]
    assert "time_limit" in refused[3][1]
    sim.run()
    assert {m: sim.finals[m] for m in ("old", "a", "c")} == {m: ["ok"] for m in ("old", "a", "c")}
    assert sim.s.pending() == 0 and not sim.finals["b"] and not sim.finals["d"]
