#!/usr/bin/env python
"""What the same work costs right after a pause: why a round trip is slower than its parts.

    .venv/bin/python benchmarks/idle_cost.py [--calls 1500] [--gaps 0,0.0002,0.001,0.005]

A round trip wakes several threads in turn (the caller, the client's IO thread, each
side's libzmq IO thread, the engine's loop), each after a pause. On this 2-core virtual
machine the code that runs just after a pause costs several times its CPU time in a
tight loop (cold caches and predictors, the host's scheduling): a round trip's time is
then set less by what each step does than by how much code each wake-up runs.

Measured here, as CPU time (``time.thread_time``, so waiting is not counted), p50 and
p90 of ``--calls`` calls after each pause of ``--gaps`` seconds (a sleep):

- **engine**: one engine's handling of a no-op ``apply_request`` (checking, unpacking,
  running, packing the reply: ``TaskLane._handle``, without its socket), run inside a
  real engine of a one-engine cluster;
- **reference**: in this process, plain Python of about the same size (a header's JSON
  dumped and read back, a small pickle round trip, a few dict operations): the machine's
  share, with none of jupyter-px's code.

The ratio of each row to its first (no pause) is the slowdown a wake-up pays.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
from typing import Any

import jupyter_ext as jx


def noop() -> None:
    return None


def _spread(samples: list[float]) -> tuple[float, float]:
    """(p50, p90) in us."""
    samples = sorted(samples)
    return (
        statistics.median(samples) * 1e6,
        samples[min(len(samples) - 1, int(0.9 * len(samples)))] * 1e6,
    )


def engine_handle(calls: int, gap: float) -> tuple[float, float]:
    """Runs in the engine: the CPU time of ``TaskLane._handle`` of a no-op request."""
    import time as _time

    from IPython import get_ipython

    from kernel_engine import protocol, serialize

    lane = get_ipython().kernel.lane  # type: ignore[union-attr]
    fn = get_ipython().user_ns["noop"]  # type: ignore[union-attr]
    buffers = serialize.pack_apply(fn, (), {})
    requests = [
        lane.wire.pack(protocol.APPLY_REQUEST, {}, None, {}, buffers)[1] for _ in range(calls)
    ]
    peer = b"0000000000000000:s"  # (a client's sending identity, as a lane sees it)
    samples = []
    for frames in requests:
        if gap:
            _time.sleep(gap)
        t0 = _time.thread_time()
        lane._handle(frames, peer)
        samples.append(_time.thread_time() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(0.9 * len(samples))] * 1e6


def reference(calls: int, gap: float) -> tuple[float, float]:
    """Plain Python of about an engine's size per task, in this process."""
    header = {
        "msg_id": "0" * 32,
        "msg_type": "apply_request",
        "username": "bench",
        "session": "1" * 32,
        "date": "2026-12-03T10:00:00.000000+00:00",
        "version": "5.3",
    }
    samples = []
    for i in range(calls):
        if gap:
            time.sleep(gap)
        t0 = time.thread_time()
        for _ in range(4):
            encoded = json.dumps({**header, "msg_id": f"{i:032x}"}).encode()
            parsed: dict[str, Any] = json.loads(encoded)
            pickle.loads(pickle.dumps((parsed, [i, None], b"x" * 64), protocol=5))
        samples.append(time.thread_time() - t0)
    return _spread(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500, help="calls per pause length")
    parser.add_argument(
        "--gaps", default="0,0.0002,0.001,0.005", help="pauses before each call, in seconds"
    )
    args = parser.parse_args()
    if args.calls < 10:
        parser.error("--calls must be at least 10")
    try:
        gaps = [float(g) for g in args.gaps.split(",")]
    except ValueError:
        parser.error(f"--gaps must be numbers separated by commas, not {args.gaps!r}")
    if not gaps or any(not 0 <= g <= 1 for g in gaps):
        parser.error("--gaps must each be between 0 and 1 second")
    rows = []
    with jx.Cluster(n=1) as rc:
        rc.wait_for_engines(1, timeout=60)
        view = rc[rc.ids[0]]
        view.push({"noop": noop})
        view.apply_sync(engine_handle, 200, 0.0)  # (warm up)
        reference(200, 0.0)
        for gap in gaps:
            rows.append(("engine", gap, view.apply_sync(engine_handle, args.calls, gap)))
            rows.append(("reference", gap, reference(args.calls, gap)))
    print("| work | pause before each call | CPU p50 us | CPU p90 us | p50 vs no pause |")
    print("|---|---|---|---|---|")
    first = {}
    for name, gap, (p50, p90) in rows:
        base = first.setdefault(name, p50)
        print(f"| {name} | {gap * 1e3:g} ms | {p50:.1f} | {p90:.1f} | {p50 / base:.1f}x |")


if __name__ == "__main__":
    main()
