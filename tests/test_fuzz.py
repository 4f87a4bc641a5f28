"""Fuzz: hostile input at every port of a cluster hurts nobody and fools nobody.

DESIGN.md ("Trust, liveness and state"): every socket is reachable by every local user, so
nothing a user, a peer or a fault does may kill, stall or fool the cluster. These tests
play a local user without the key (garbage, unsigned, wrongly signed or forged messages,
lying batches, huge frames, imposter socket identities, raw TCP) and a peer with the key
(replays, duplicate submissions, fields of the wrong type or range, messages only the
controller may send) against every port the controller and the engines open. They check
that every process lives, that a legitimate client's work finishes with correct results,
that invalid requests get error replies naming the bad field, and that the logs count
dropped input instead of growing a line per message.

Random choices come from one seed, printed in every failure; ``PX_FUZZ_SEED=<n>`` replays
a run.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import cloudpickle
import pytest
import zmq
from conftest import ClusterFactory
from fuzz_support import (
    CONTROLLER_IDENTITY,
    INF,
    NAN,
    RAW_KINDS,
    Garbage,
    Peer,
    Port,
    Signer,
    SlowLoris,
    apply_payload,
    cluster_pids,
    cluster_ports,
    dead_processes,
    dependency,
    encode,
    hex_identity,
    identity,
    lb_flags,
    log_growth,
    now_iso,
    port_of,
    raw_tcp,
    result_of,
    running,
    subscriptions,
    wait_logs_quiet,
)

import jupyter_ext as jx

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEED = int(os.environ.get("PX_FUZZ_SEED") or random.randrange(2**32))
LOG_BUDGET = 200_000
"""Bytes all of a cluster's logs may grow by while it is attacked (drops are counted)."""
REPLY_TIMEOUT = 3.0
"""Seconds within which the controller answers a request (it answers in milliseconds)."""
SILENCE = 1.0
"""Seconds to wait for a reply that should not come."""


def _square_after(x, delay=0.0):
    """x * x, after ``delay`` seconds."""
    import time

    time.sleep(delay)
    return x * x


def _bump(name):
    """Add one to a counter in the engine's namespace; returns the new count."""
    from IPython import get_ipython

    ns = get_ipython().user_ns
    ns[name] = ns.get(name, 0) + 1
    return ns[name]


def _counters(names):
    from IPython import get_ipython

    ns = get_ipython().user_ns
    return {name: ns.get(name, 0) for name in names}


def _report(title: str, problems: list[str]) -> str:
    shown = problems[:40]
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    return f"{title} (PX_FUZZ_SEED={SEED}):\n  " + "\n  ".join(shown) + more


def _warm_up(rc: Any) -> None:
    """A few round trips, so that the client's direct lanes are in use."""
    for _ in range(5):
        assert rc[:].apply_async(abs, -1).get(10) == [1] * len(rc.ids)


def _client_identities(rc: Any, peer: Peer) -> list[bytes]:
    """The legitimate client's twin socket identities (``<16 hex>:s`` and ``:r``).

    A peer with the key learns them from the hub's records (``client_uuid``); the client's
    own receiving socket says so too.
    """
    stems: set[bytes] = set()
    own = rc.transport.io.dealer.identity
    if re.fullmatch(rb"[0-9a-f]{16}:[rs]", own):
        stems.add(own[:-2])
    msg_id = peer.request("px_db_request", {"query": {}}, route=b"hub")
    for reply in peer.wait_replies(msg_id, REPLY_TIMEOUT):
        for record in reply.content.get("records") or []:
            uuid = str(record.get("client_uuid") or "") if isinstance(record, dict) else ""
            with contextlib.suppress(ValueError):  # (the identity itself, or its hex)
                raw = uuid.encode() if len(uuid) == 16 else bytes.fromhex(uuid)
                if re.fullmatch(rb"[0-9a-f]{16}(:[rs])?", raw):
                    stems.add(raw[:16])
    return [stem + suffix for stem in sorted(stems) for suffix in (b":s", b":r")]


class LegitWork:
    """A legitimate client's work, submitted before and during an attack, checked after."""

    def __init__(self, rc: Any):
        self.rc = rc
        self.lview = rc.load_balanced_view()
        self.items: list[tuple[str, Any, Any]] = []
        self.n = 0

    def submit(self, label: str, delay: float = 0.0) -> None:
        """One direct apply on each engine and one load-balanced apply."""
        for eid in self.rc.ids:
            self.n += 1
            ar = self.rc[eid].apply_async(_square_after, self.n, delay)
            self.items.append((f"direct apply on engine {eid} ({label})", ar, self.n**2))
        self.n += 1
        ar = self.lview.apply_async(_square_after, self.n, delay)
        self.items.append((f"load-balanced apply ({label})", ar, self.n**2))

    def submit_map(self, label: str, n: int, delay: float) -> None:
        xs = list(range(self.n + 1, self.n + 1 + n))
        self.n += n
        ar = self.lview.map(_square_after, xs, [delay] * n, chunksize=1, block=False)
        self.items.append((f"load-balanced map of {n} ({label})", ar, [x * x for x in xs]))

    def problems(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        out = []
        for label, ar, expected in self.items:
            try:
                got = ar.get(max(0.05, deadline - time.monotonic()))
            except Exception as exc:  # a timeout, or an error the user would see
                out.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if got != expected:
                out.append(f"{label}: wrong result {str(got)[:100]}")
        return out


def _health(rc: Any, timeout: float = 10.0) -> list[str]:
    """What a legitimate client finds broken: apply on each engine, a load-balanced map,
    and ``execute`` on all engines."""
    out = []
    ids = list(rc.ids)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    checks: list[tuple[str, Callable[[], Any], Any]] = [
        (
            "apply on each engine",
            lambda: [rc[e].apply_async(_square_after, e + 2).get(left()) for e in ids],
            [(e + 2) ** 2 for e in ids],
        ),
        (
            "a load-balanced map of 40",
            lambda: (
                rc.load_balanced_view()
                .map(_square_after, range(40), chunksize=1, block=False)
                .get(left())
            ),
            [x * x for x in range(40)],
        ),
        (
            "execute on all engines",
            lambda: (
                rc[:].execute("fuzz_alive = 41 + 1", block=False).get(left()),
                rc[:].pull("fuzz_alive", block=False).get(left()),
            )[1],
            [42] * len(ids),
        ),
    ]
    for label, check, expected in checks:
        try:
            got = check()
        except Exception as exc:
            out.append(f"afterwards, {label} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if got != expected:
            out.append(f"afterwards, {label} gave {str(got)[:100]}, not {str(expected)[:100]}")
    return out


# ----- a local user without the key


def test_hostile_frames_at_every_port_hurt_nobody(cluster_factory):
    """About 3,500 hostile messages at all 14 ports of a 2-engine cluster: random frames,
    no delimiter, truncated, unsigned, signed with another key, a signature of another
    message, malformed signatures and JSON, lying batch headers, 3,000-frame and 4 MB
    messages, from imposter identities (the controller's lane identity, the client's own
    twin sockets, made-up client ones), subscriptions of every size at the PUB ports, raw
    TCP garbage and half-open connections. Whatever would do harm if accepted (shutdown,
    os._exit, starting or signalling engines) shows as a dead or extra process.

    Proves: every process lives and the engine ids are unchanged, a client's work
    submitted before and during the attack finishes with correct results, the cluster
    works afterwards, and all the logs together grow by at most LOG_BUDGET bytes.
    """
    rng = random.Random(SEED)
    cluster, rc = cluster_factory.start(2)
    _warm_up(rc)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    ids = list(rc.ids)
    logs_before = wait_logs_quiet(cluster.folder, quiet=0.3, timeout=5)

    legit = LegitWork(rc)
    legit.submit("before the attack")
    legit.submit("before the attack, running for 1.5 s", delay=1.5)
    legit.submit_map("before the attack, 1.5 s each", 4, 1.5)
    legit.submit_map("before the attack", 100, 0.002)

    ctx: zmq.Context[Any] = zmq.Context()
    sockets: list[Any] = []
    loris = SlowLoris()
    sent: Counter[str] = Counter()
    pool = ThreadPoolExecutor(4)
    t0 = time.monotonic()
    try:
        ctrl = Peer(ctx, port_of(ports, "controller", "client").url, Signer(key))
        sockets.append(ctrl)
        imposters = [
            None,
            identity(rng),
            CONTROLLER_IDENTITY,
            hex_identity(rng, b":s"),
            hex_identity(rng, b":r"),
            *_client_identities(rc, ctrl),
        ]
        # every imposter connects first, while the client's 1.5 s tasks run
        peers: dict[Port, list[Peer]] = {}
        for port in ports:
            if not port.publishes:
                peers[port] = [Peer(ctx, port.url, Signer(key), i, linger=2000) for i in imposters]
                sockets += peers[port]
        stalled = ctx.socket(zmq.SUB)  # a subscriber that never reads
        stalled.linger = 0
        stalled.subscribe(b"")
        stalled.connect(port_of(ports, "controller", "iopub").url)
        sockets.append(stalled)
        for port in ports:
            loris.open(port.url)
        raw_attacks = [  # (alongside the zmq peers, from threads)
            pool.submit(raw_tcp, port.url, kind, random.Random(rng.random()))
            for port in ports
            for kind in RAW_KINDS
            if kind != "huge-subscription" or port.publishes
        ]

        order = list(ports)
        rng.shuffle(order)
        for port in order:
            if port.publishes:
                xsub = ctx.socket(zmq.XSUB)
                xsub.linger = 2000
                xsub.sndhwm = 0
                xsub.connect(port.url)
                sockets.append(xsub)
                for frames in subscriptions(rng, 100):
                    with contextlib.suppress(zmq.Again):
                        xsub.send_multipart(frames, zmq.NOBLOCK)
                        sent["subscription"] += 1
            else:
                socks = peers[port]
                for i, (kind, frames) in enumerate(Garbage(rng, key, port, ids).messages()):
                    if socks[i % len(socks)].send(frames):
                        sent[kind] += 1
            legit.submit(f"during the attack on the {port}")
        for raw in as_completed(raw_attacks, timeout=60):
            raw.result()
            sent["raw TCP connection"] += 1
    finally:
        pool.shutdown(cancel_futures=True)
        for s in sockets:
            s.close()
        loris.close()
        ctx.term()  # (every socket lingers at most 2 s)
    attack = time.monotonic() - t0
    print(f"sent {sum(sent.values())} hostile messages in {attack:.1f} s: {dict(sent)}")

    unfinished = legit.problems(timeout=30)
    health = _health(rc, timeout=20)
    problems = dead_processes(pids)
    if sorted(rc.ids) != ids:
        problems.append(f"the engine ids changed from {ids} to {sorted(rc.ids)}")
    growth = log_growth(logs_before, wait_logs_quiet(cluster.folder, quiet=1.0, timeout=20))
    if sum(growth.values()) > LOG_BUDGET:
        problems.append(
            f"the logs grew by {sum(growth.values()):,} bytes (at most {LOG_BUDGET:,}): {growth}"
        )
    problems += health
    if unfinished:
        problems.append(f"{len(unfinished)} of the client's {len(legit.items)} calls failed:")
        problems += unfinished
    assert not problems, _report(f"after {sum(sent.values())} hostile messages", problems)


# ----- a peer with the key


def test_replayed_requests_run_once(cluster_factory):
    """A correctly signed request sent again, at once or after its reply, runs once:
    straight to a lane, through the controller to a lane or a shell, straight to an
    engine's shell, and load-balanced. The first copy gets its normal reply; a copy gets
    an error reply or none, and the controller lives."""
    cluster, rc = cluster_factory.start(2)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    problems: list[str] = []
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        ctrl = Peer(ctx, port_of(ports, "controller", "client").url, signer)
        lane0 = Peer(ctx, port_of(ports, "engine 0", "lane").url, signer)
        shell1 = Peer(ctx, port_of(ports, "engine 1", "shell").url, signer)
        paths = [
            ("straight to engine 0's lane", lane0, None, "apply"),
            ("through the controller to engine 1's lane", ctrl, b"lane:1", "apply"),
            ("through the controller to engine 0's shell", ctrl, b"shell:0", "execute"),
            ("straight to engine 1's shell", shell1, None, "execute"),
            ("load-balanced", ctrl, b"lb", "apply"),
        ]
        for n, (path, peer, route, kind) in enumerate(paths):
            for when in ("after its reply", "at once"):
                label = f"{path}, sent again {when}"
                name = f"fuzz_replay_{n}_{when[:2]}"
                idents = [route] if route else []
                if kind == "apply":
                    md = lb_flags() if route == b"lb" else {}
                    payload = apply_payload(_bump, name)
                    header, frames = signer.pack("apply_request", {}, md, payload, idents)
                else:
                    content = {
                        "code": f"{name} = globals().get({name!r}, 0) + 1",
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": False,
                    }
                    header, frames = signer.pack("execute_request", content, {}, (), idents)
                msg_id = header["msg_id"]
                peer.send(frames)
                if when == "after its reply":
                    peer.wait_replies(msg_id, REPLY_TIMEOUT)
                peer.send(frames)
                replies = peer.wait_replies(msg_id, REPLY_TIMEOUT)
                peer.poll(SILENCE / 2)  # (time for the copy to run, or to be answered)
                replies = peer.replies_to(msg_id)
                ok = [r for r in replies if r.status == "ok"]
                if len(ok) != 1 or len(replies) > 2:
                    got = ", ".join(r.summary() for r in replies) or "none"
                    problems.append(f"{label}: replies were {got} (one ok, and an error or none)")
                try:  # the cluster still serves its client
                    rc.load_balanced_view().apply_async(abs, -1).get(10)
                except Exception as exc:
                    problems.append(f"after a request {label}, the cluster failed: {exc!r:.200}")
                    problems += dead_processes(pids)
                    raise AssertionError(_report("replays", problems)) from None
                counts: Counter[str] = Counter()
                for eid in rc.ids:
                    counts.update(rc[eid].apply_async(_counters, [name]).get(10))
                if counts[name] != 1:
                    problems.append(f"{label}: ran {counts[name]} times")
    finally:
        for peer in (ctrl, lane0, shell1):
            peer.close()
        ctx.term()
    problems += _health(rc)
    assert not problems, _report("replays", problems)


def test_duplicate_submission_is_refused_and_the_original_completes(cluster_factory):
    """The same signed load-balanced request sent again while the original runs, and
    while another original waits in the queue for it: each copy gets an error reply at
    once; each original runs once and completes normally, and the controller lives."""
    cluster, rc = cluster_factory.start(2)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    problems = []

    def submit(peer: Peer, payload: list[bytes], **flags: Any) -> tuple[str, list[bytes]]:
        header, frames = signer.pack("apply_request", {}, lb_flags(**flags), payload, [b"lb"])
        peer.send(frames)
        return header["msg_id"], frames

    def check(peer: Peer, label: str, msg_id: str, expected: Any) -> None:
        replies = peer.wait_replies(msg_id, 10, count=2)
        got = ", ".join(r.summary() for r in replies) or "none"
        statuses = [r.status for r in replies]
        if statuses != ["error", "ok"]:
            problems.append(f"{label}: replies were {got} (first the copy's error, then ok)")
        for r in replies:
            if r.status == "ok" and result_of(r) != expected:
                problems.append(f"{label}: the original returned {result_of(r)!r}")

    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, signer) as peer:
            # a copy of a running task; a second task waits for the first
            running_id, running_copy = submit(peer, apply_payload(_square_after, 3, 1.0))
            after_running, _ = submit(
                peer, apply_payload(_bump, "dup_a"), after=dependency(running_id)
            )
            time.sleep(0.3)  # (it runs for a second)
            peer.send(running_copy)
            check(peer, "a copy of a running task", running_id, 9)
            if [r.status for r in peer.wait_replies(after_running, 10)] != ["ok"]:
                problems.append("the task after the running one (and its copy) did not finish")
            if not running(pids["controller"]):
                raise AssertionError(
                    _report("duplicate submissions", [*problems, "the controller exited"])
                )

            # a copy of a queued task, waiting for another one
            blocker, _ = submit(peer, apply_payload(_square_after, 4, 1.0))
            queued_id, queued = submit(
                peer, apply_payload(_bump, "dup_b"), after=dependency(blocker)
            )
            peer.send(queued)
            check(peer, "a copy of a queued task", queued_id, 1)
            if [r.status for r in peer.replies_to(blocker)] != ["ok"]:
                problems.append("the task the queued one waited for did not finish")
    finally:
        ctx.term()
    problems += dead_processes(pids)
    if not problems:
        counts: Counter[str] = Counter()
        for eid in rc.ids:
            counts.update(rc[eid].apply_async(_counters, ["dup_a", "dup_b"]).get(10))
        if counts != {"dup_a": 1, "dup_b": 1}:
            problems.append(f"the originals ran {dict(counts)} times (once each)")
        problems += _health(rc)
    assert not problems, _report("duplicate submissions", problems)


_MUTANTS: list[Any] = [
    None, True, False, 0, 1, -1, 2.5, -0.0, NAN, INF, -INF, 2**63, -(2**63), 10**30, "", "x",
    "5", "all", "\u00e9\u2603", "a" * 10_000, [], [0], [1, 0], [-1], ["a"], [None], [[0]],
    [{"a": 1}], [0.5], {}, {"msg_ids": 5}, {"msg_ids": ["nope"]}, {"msg_ids": []}, {"a": [1]},
]  # fmt: skip

_HUB_FIELDS = {
    "px_queue_request": ["targets", "verbose"],
    "px_result_request": ["msg_ids"],
    "px_purge_request": ["msg_ids", "engine_ids"],
    "px_abort_request": ["msg_ids", "targets"],
    "px_db_request": ["query", "keys"],
    "px_history_request": ["verbose"],
    "px_connect_request": ["verbose"],
}


def test_mutated_requests_each_get_exactly_one_reply(cluster_factory):
    """600 correctly signed requests whose fields hold random values of random types:
    load-balanced tasks (flags targets, after, follow, timeout, retries, time_limit,
    label) and the controller's queries (queue, result, purge, abort, db, history,
    connect). Every one gets exactly one reply within 20 s, an error or a correct result
    ("every submitted request reaches exactly one final outcome"), and the controller
    lives and works."""
    rng = random.Random(SEED)
    cluster, rc = cluster_factory.start(2)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    sent: dict[str, tuple[str, Any]] = {}  # msg_id -> (what, expected result or None)
    ctx: zmq.Context[Any] = zmq.Context()
    problems = []
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, signer) as peer:
            for i in range(600):
                if rng.random() < 0.6:
                    flags = lb_flags()
                    for name in rng.sample(sorted(flags), rng.randrange(1, 3)):
                        flags[name] = rng.choice(_MUTANTS)
                    msg_id = peer.request(
                        "apply_request", {}, flags, apply_payload(abs, -i), route=b"lb"
                    )
                    sent[msg_id] = (f"load-balanced task with flags {encode(flags)[:200]!r}", i)
                else:
                    msg_type = rng.choice(sorted(_HUB_FIELDS))
                    content = {n: rng.choice(_MUTANTS) for n in _HUB_FIELDS[msg_type]}
                    msg_id = peer.request(msg_type, content, route=b"hub")
                    sent[msg_id] = (f"{msg_type} {encode(content)[:200]!r}", None)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not all(peer.replies_to(m) for m in sent):
                peer.poll(0.2)
                if not running(pids["controller"]):
                    break
            peer.poll(0.5)  # (any second replies)
            unanswered = [m for m in sent if not peer.replies_to(m)]
            if not running(pids["controller"]):
                problems.append(
                    f"the controller exited during the test ({len(unanswered)} of {len(sent)} "
                    "requests unanswered)"
                )
            for msg_id, (what, expected) in sent.items():
                replies = peer.replies_to(msg_id)
                if len(replies) != 1:
                    problems.append(f"{len(replies)} replies to a {what}")
                elif replies[0].status not in ("ok", "error"):
                    problems.append(f"a {what} got a {replies[0].summary()}")
                elif (
                    expected is not None
                    and replies[0].status == "ok"
                    and result_of(replies[0]) != expected
                ):
                    problems.append(f"a {what} returned {result_of(replies[0])!r}")
    finally:
        ctx.term()
    dead = dead_processes(pids)
    problems[:0] = dead
    if not dead:
        problems += _health(rc)
    assert not problems, _report("mutated requests", problems)


def test_a_peer_cannot_take_over_socket_identities(cluster_factory):
    """Even with the key, a peer cannot steal replies by connecting to the lanes under the
    controller's identity or under a client's twin identities (learned from the hub's
    records): the work in flight there, and the work sent after the imposters left, all
    complete."""
    cluster, rc = cluster_factory.start(2)
    _warm_up(rc)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    lview = rc.load_balanced_view()
    problems = []
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, signer) as ctrl:
            twins = _client_identities(rc, ctrl)
        assert twins, "the client's socket identities could not be learned"
        in_flight = [
            ("load-balanced map", lview.map(_square_after, [2, 3, 4, 5], [1.0] * 4, block=False)),
            *[
                (f"direct apply on engine {e}", rc[e].apply_async(_square_after, e, 1.0))
                for e in rc.ids
            ],
        ]
        time.sleep(0.3)  # (the work runs for a second)
        imposters = []
        for eid in rc.ids:
            lane = port_of(ports, f"engine {eid}", "lane")
            for ident in (CONTROLLER_IDENTITY, *twins):
                imposter = Peer(ctx, lane.url, signer, ident)
                imposters.append(imposter)
                imposter.request("px_lane_ping_request", {})
        for imposter in imposters:
            imposter.poll(0.2)
        for imposter in imposters:
            imposter.close()
        afterwards = [
            ("load-balanced map", lview.map(_square_after, [6, 7, 8, 9], block=False)),
            *[(f"direct apply on engine {e}", rc[e].apply_async(_square_after, e)) for e in rc.ids],
        ]
        deadline = time.monotonic() + 15
        for when, work in (("in flight while", in_flight), ("sent after", afterwards)):
            for label, ar in work:
                try:
                    ar.get(max(0.05, deadline - time.monotonic()))
                except Exception as exc:
                    problems.append(
                        f"{label} {when} imposters of the controller and the client connected "
                        f"to the lanes: {type(exc).__name__}: {str(exc)[:150]}"
                    )
    finally:
        ctx.term()
    problems += dead_processes(pids)
    problems += _health(rc)
    assert not problems, _report("imposters with the key", problems)


def test_a_peer_cannot_report_another_clients_task_as_finished(cluster_factory):
    """A peer's notice that another client's direct task failed changes nothing: the
    load-balanced task that waits for it runs once it really succeeded."""
    cluster, rc = cluster_factory.start(2)
    _warm_up(rc)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    lview = rc.load_balanced_view()
    problems = []

    def recorded(msg_id: str) -> None:
        deadline = time.monotonic() + 5
        while not rc.db_query({"msg_id": msg_id}) and time.monotonic() < deadline:
            time.sleep(0.02)  # (a client tells the controller within 20 ms)

    direct = rc[0].apply_async(_square_after, 6, 1.0)
    recorded(direct.msg_ids[0])
    with lview.temp_flags(after=direct, block=False):
        dependent = lview.apply(_square_after, 7)
    recorded(dependent.msg_ids[0])
    forged = {
        "msg_id": direct.msg_ids[0],
        "engine_id": 0,
        "status": "error",
        "metadata": {"status": "error"},
        "completed": now_iso(),
    }
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, Signer(key)) as peer:
            notice = {"submitted": [], "completed": [forged]}
            peer.request("px_direct_notice", notice, route=b"hub")
            # (as a request sent and answered since the peer's last notice, too)
            sent_and_done = {**forged, "msg_type": "apply_request", "date": now_iso()}
            peer.request("px_direct_notice", {"done": [sent_and_done]}, route=b"hub")
            peer.poll(0.2)
    finally:
        ctx.term()
    for label, ar, expected in (("the direct task", direct, 36), ("its dependent", dependent, 49)):
        try:
            got = ar.get(10)
        except Exception as exc:
            problems.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            if got != expected:
                problems.append(f"{label} returned {got!r}")
    problems += dead_processes(pids)
    problems += _health(rc)
    assert not problems, _report("a forged notice", problems)


def test_a_peer_cannot_rename_an_engine(cluster_factory):
    """A peer's ``engine_setup_request`` (which only the controller sends) changes
    nothing: engine 1 keeps its id in its replies, and direct and load-balanced work
    still runs on it."""
    cluster, rc = cluster_factory.start(2)
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "engine 1", "lane").url, Signer(key)) as peer:
            msg_id = peer.request("engine_setup_request", {"engine_id": 7, "cluster_id": "evil"})
            peer.wait_replies(msg_id, SILENCE)
    finally:
        ctx.term()
    problems = []
    direct = rc[1].apply_async(abs, -1)
    lb = rc.load_balanced_view(targets=[1]).map(abs, range(-20, 0), block=False)
    for label, ar, expected in (
        ("direct", direct, 1),
        ("load-balanced", lb, list(range(20, 0, -1))),
    ):
        try:
            if ar.get(10) != expected:
                problems.append(f"{label} work on engine 1 returned {ar.get(0)!r}")
        except Exception as exc:
            problems.append(f"{label} work on engine 1: {type(exc).__name__}: {str(exc)[:150]}")
            continue
        named = {md["engine_id"] for md in ([ar.metadata] if ar is direct else ar.metadata)}
        if named != {1}:
            problems.append(f"{label} replies from engine 1 name engine(s) {sorted(named)}")
    problems += dead_processes(pids)
    assert not problems, _report("after a peer's engine_setup_request to engine 1", problems)


# ----- one field at a time (a shared cluster, started again when a case breaks it)


@dataclass(frozen=True)
class Invalid:
    """A correctly signed request with one invalid part, and what must come back."""

    id: str
    msg_type: str = "apply_request"
    route: bytes = b"lb"
    content: Any = None
    flags: dict[str, Any] | None = None  # a load-balanced task's flags that change
    metadata: Any = None  # the whole metadata, raw
    header: dict[str, Any] | None = None  # header fields that change
    raw_header: bytes | None = None  # the whole header, raw
    names: str = ""  # regex the error reply must match (empty: no reply, or an error)
    copies: int = 1
    timers: bool = False  # time limits must still work afterwards

    def build(self, signer: Signer, known: str, i: int) -> tuple[Any, list[bytes]]:
        metadata = self.metadata
        if metadata is None and self.route == b"lb":
            flags = {
                k: (dependency(known) if v == "$known" else v)
                for k, v in (self.flags or {}).items()
            }
            metadata = lb_flags(**flags)
        header: Any = signer.header(self.msg_type)
        if self.header is not None:
            header.update({k: (v(i) if callable(v) else v) for k, v in self.header.items()})
        if self.raw_header is not None:
            header = self.raw_header
        buffers = apply_payload(abs, -5) if self.msg_type == "apply_request" else []
        return signer.pack(self.msg_type, self.content, metadata, buffers, [self.route], header)


def _non_string_id(i: int) -> Any:
    """A msg_id that is not a string (each one different)."""
    return {38: None, 39: True}.get(i, [i, i + 0.5, [i], {"n": i}, -(i + 1)][i % 5])


INVALID = [
    Invalid("lb-time_limit-string", flags={"time_limit": "5"}, names="time_limit", timers=True),
    Invalid("lb-time_limit-NaN", flags={"time_limit": NAN}, names="time_limit|NaN", timers=True),
    Invalid("lb-time_limit-negative", flags={"time_limit": -1}, names="time_limit"),
    Invalid("lb-retries-string", flags={"retries": "two"}, names="retries"),
    Invalid("lb-retries-negative", flags={"retries": -1}, names="retries"),
    Invalid("lb-retries-infinite", flags={"retries": INF}, names="retries|Infinity"),
    Invalid(
        "lb-timeout-string", flags={"timeout": "5", "after": "$known"}, names="timeout", timers=True
    ),
    Invalid("lb-targets-strings", flags={"targets": ["a"]}, names="targets"),
    Invalid("lb-targets-null", flags={"targets": [None]}, names="targets"),
    Invalid("lb-after-number", flags={"after": 5}, names="after"),
    Invalid("lb-after-msg_ids-number", flags={"after": {"msg_ids": 5}}, names="after|msg_ids"),
    Invalid("lb-follow-string", flags={"follow": "x"}, names="follow"),
    Invalid("lb-metadata-not-an-object", metadata=b"[1, 2]", names="metadata"),
    Invalid(
        "lb-msg_id-not-a-string",
        header={"msg_id": _non_string_id},
        copies=40,  # more than the engines' slots, in case each leaked one
    ),
    Invalid(
        "hub-queue-targets-string", "px_queue_request", b"hub", {"targets": "zero"}, names="targets"
    ),
    Invalid(
        "hub-queue-targets-nested", "px_queue_request", b"hub", {"targets": [[0]]}, names="targets"
    ),
    Invalid(
        "hub-result-msg_ids-number", "px_result_request", b"hub", {"msg_ids": 5}, names="msg_ids"
    ),
    Invalid(
        "hub-result-msg_ids-objects",
        "px_result_request",
        b"hub",
        {"msg_ids": [{"a": 1}]},
        names="msg_ids",
    ),
    Invalid(
        "hub-purge-msg_ids-string", "px_purge_request", b"hub", {"msg_ids": "abc"}, names="msg_ids"
    ),
    Invalid(
        "hub-purge-engine_ids-strings",
        "px_purge_request",
        b"hub",
        {"engine_ids": ["x"]},
        names="engine_ids",
    ),
    Invalid(
        "hub-abort-msg_ids-number", "px_abort_request", b"hub", {"msg_ids": 7}, names="msg_ids"
    ),
    Invalid(
        "hub-signal-signum-string", "px_signal_request", b"hub", {"signum": "KILL"}, names="signum"
    ),
    Invalid("hub-signal-signum-list", "px_signal_request", b"hub", {"signum": [2]}, names="signum"),
    Invalid(
        "hub-signal-msg_ids-string",
        "px_signal_request",
        b"hub",
        {"signum": 2, "msg_ids": "abc"},
        names="msg_ids",
    ),
    Invalid("hub-db-query-number", "px_db_request", b"hub", {"query": 5}, names="query"),
    Invalid("hub-start-n-string", "px_start_request", b"hub", {"n": "lots"}, names=r"\bn\b"),
    Invalid("hub-start-n-list", "px_start_request", b"hub", {"n": [1]}, names=r"\bn\b"),
    Invalid("hub-content-not-an-object", "px_queue_request", b"hub", b"[1]", names="content"),
    Invalid("hub-header-not-an-object", "px_queue_request", b"hub", raw_header=b"[1, 2]"),
    Invalid("hub-msg_id-not-a-string", "px_queue_request", b"hub", header={"msg_id": 5}),
    Invalid("hub-msg_type-not-a-string", "px_queue_request", b"hub", header={"msg_type": 5}),
    Invalid(
        "notice-bad-engine-id",
        "px_direct_notice",
        b"hub",
        {
            "submitted": [
                {"msg_id": "m1", "msg_type": "apply_request", "date": "x", "engine_id": "x"}
            ]
        },
    ),
    Invalid(
        "notice-lying-sizes",
        "px_direct_notice",
        b"hub",
        {
            "completed": [
                {
                    "msg_id": "m2",
                    "engine_id": 0,
                    "status": "ok",
                    "metadata": {"status": "ok"},
                    "sizes": [10**9, 5],
                }
            ]
        },
    ),
    Invalid("notice-not-lists", "px_direct_notice", b"hub", {"submitted": 5, "completed": "x"}),
    Invalid("notice-done-not-a-list", "px_direct_notice", b"hub", {"done": {"msg_id": "x"}}),
    Invalid(
        "hub-shutdown-targets-string",
        "px_shutdown_request",
        b"hub",
        {"targets": "all-of-them"},
        names="targets",
    ),
    Invalid(
        "hub-shutdown-hub-string", "px_shutdown_request", b"hub", {"hub": "no"}, names=r"\bhub\b"
    ),
]


class SharedCluster:
    """One 2-engine cluster for many cases, started again when a case broke it."""

    def __init__(self) -> None:
        self.factory = ClusterFactory()
        self.cluster: Any = None
        self.rc: Any = None
        self.known = ""
        self.broken = True

    def get(self) -> tuple[Any, Any]:
        if self.broken:
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.stop_cluster_sync(timeout=10)
            self.cluster, self.rc = self.factory.start(2)
            self.known = self._finished_task()
            self.broken = False
        return self.cluster, self.rc

    def _finished_task(self) -> str:
        """The msg_id of a finished load-balanced task (a valid dependency)."""
        key, ports = cluster_ports(self.rc)
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            with Peer(ctx, port_of(ports, "controller", "client").url, Signer(key)) as peer:
                msg_id = peer.request(
                    "apply_request", {}, lb_flags(), apply_payload(abs, -1), b"lb"
                )
                assert peer.wait_replies(msg_id, 10), "a valid load-balanced task got no reply"
        finally:
            ctx.term()
        return str(msg_id)


@pytest.fixture(scope="module")
def shared_cluster():
    shared = SharedCluster()
    yield shared
    shared.factory.stop_all()


def _time_limits_work(rc: Any) -> list[str]:
    """A task over its time limit fails with TaskTimeout (nothing disabled the timers)."""
    lview = rc.load_balanced_view()
    lview.set_flags(time_limit=0.5)
    ar = lview.apply_async(_square_after, 2, 4.0)
    try:
        ar.get(3.5)
    except jx.TaskTimeout:
        return []
    except TimeoutError:
        return ["afterwards, a task over its 0.5 s time limit was not stopped within 3.5 s"]
    except Exception as exc:
        return [f"afterwards, a task over its 0.5 s time limit raised {exc!r:.200}"]
    return ["afterwards, a task over its 0.5 s time limit ran to its end"]


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_request_is_refused_naming_the_field(shared_cluster, case):
    """A correctly signed request with a field of the wrong type or range (or a header,
    metadata or content that is not a JSON object) gets an error reply naming the field
    (``case.names``) within REPLY_TIMEOUT; what cannot be answered (a bad header, a notice)
    gets no ok reply. Afterwards every process lives and the cluster works."""
    cluster, rc = shared_cluster.get()
    key, ports = cluster_ports(rc)
    pids = cluster_pids(cluster, rc)
    signer = Signer(key)
    problems = []
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Peer(ctx, port_of(ports, "controller", "client").url, signer) as peer:
            sent = [case.build(signer, shared_cluster.known, i) for i in range(case.copies)]
            for _, frames in sent:
                peer.send(frames)
            if case.names:
                msg_id = sent[0][0]["msg_id"]
                replies = peer.wait_replies(msg_id, REPLY_TIMEOUT)
                if not replies:
                    problems.append(f"no reply within {REPLY_TIMEOUT} s")
                elif replies[0].status != "error":
                    problems.append(f"the reply was {replies[0].summary()}, not an error")
                elif not re.search(case.names, replies[0].error_text):
                    problems.append(
                        f"the error does not name {case.names!r}: {replies[0].error_text}"
                    )
            else:
                peer.poll(SILENCE)
                ok = [r for r in peer.received if r.status != "error"]
                if ok:
                    problems.append(f"{len(ok)} requests were served: {ok[0].summary()}")
    finally:
        ctx.term()
    dead = dead_processes(pids)
    problems += dead
    if not dead:
        problems += _health(rc)
        if case.timers:
            problems += _time_limits_work(rc)
    if problems:
        shared_cluster.broken = True
    assert not problems, _report(f"after {case.id}", problems)
