"""Benchmark workloads shared by every tool.

Each ``*_rc`` workload takes a connected client ``rc`` -- an ``ipyparallel.Client`` or a
``jupyter_ext.Client`` (same public API) -- and returns a number (or a small dict of
numbers, for percentiles).  The ``dask_*`` functions are the dask.distributed equivalents,
taking a ``distributed.Client``.

Nothing here imports ipyparallel, jupyter_ext or distributed: the module is also imported
*on the engines/workers* (the remote functions ``noop`` and ``noop1`` live here and are
sent by reference), so it must stay cheap and tool-agnostic.  ``run.py`` makes it
importable remotely by putting this directory on ``PYTHONPATH`` before any cluster starts
(and, for IPython-style engines, on ``sys.path`` again through ``execute``).

Every wait is bounded: blocking calls are written as ``*_async(...).get(timeout=...)``,
which is what ``apply_sync`` / ``push(block=True)`` / ``map_sync`` do internally, minus the
unbounded wait.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Seconds any single remote call may take before the workload gives up.
CALL_TIMEOUT = 60.0


# --------------------------------------------------------------------------- remote functions


def noop() -> None:
    """The trivial remote function."""
    return None


def noop1(x: Any) -> Any:
    """The trivial one-argument remote function (for map)."""
    return x


# --------------------------------------------------------------------------- helpers


def percentile(samples: Sequence[float], q: float) -> float:
    """``q``-th percentile (0-100) with linear interpolation, like numpy's default."""
    return float(np.percentile(np.asarray(samples, dtype=float), q))


def _latencies_ms(call: Callable[[], Any], calls: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    perf = time.perf_counter
    for _ in range(calls):
        t0 = perf()
        call()
        samples.append((perf() - t0) * 1e3)
    return {
        "p50": percentile(samples, 50),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples),
    }


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("workload deadline exceeded")
    return left


def make_array(mb: int) -> np.ndarray:
    """``mb`` MiB of float64 (random, so nothing can compress or deduplicate it)."""
    n = mb * 2**20 // 8
    return np.random.default_rng(12345).random(n)


def rss_mib(pid: int | None = None) -> float | None:
    """Resident set size of process ``pid`` (default: this one) in MiB, from the ``VmRSS``
    line of ``/proc/<pid>/status``; None when the process (or /proc) isn't there."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # the line is in kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _private_rss_mib(pid: int) -> float | None:
    """``VmRSS`` less ``RssShmem`` of process ``pid`` in MiB (None when unknown)."""
    kib: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssShmem"):
                    kib[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (kib["VmRSS"] - kib.get("RssShmem", 0)) / 1024 if "VmRSS" in kib else None


def _host_shmem_mib() -> float | None:
    """The host's shared memory in use (``Shmem`` of ``/proc/meminfo``) in MiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Shmem:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_mib(pid: int) -> dict[str, float] | None:
    """RSS, PSS and USS (private clean + private dirty) of process ``pid`` in MiB, from
    ``/proc/<pid>/smaps_rollup``; None when it (or the file) isn't there."""
    kib: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    kib[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if len(kib) != 4:
        return None
    uss = kib["Private_Clean"] + kib["Private_Dirty"]
    return {"rss": kib["Rss"] / 1024, "pss": kib["Pss"] / 1024, "uss": uss / 1024}


def engine_memory(engine_pids: list[int]) -> dict[str, Any]:
    """Memory per engine (the median over the engines, MiB): USS (what the engine alone
    holds: what stopping it would free) and RSS (counting pages shared with others)."""
    samples = [memory_mib(p) for p in engine_pids]
    if not engine_pids or None in samples:
        raise RuntimeError(f"no /proc/<pid>/smaps_rollup for engines {engine_pids}")
    return {
        "eng_uss_mib": statistics.median(m["uss"] for m in samples if m),
        "eng_rss_mib": statistics.median(m["rss"] for m in samples if m),
    }


def _check_same(sent: np.ndarray, got: Any) -> None:
    if not isinstance(got, np.ndarray) or got.shape != sent.shape or got.dtype != sent.dtype:
        raise AssertionError(f"pulled back {type(got).__name__} {getattr(got, 'shape', '')}")
    step = max(1, sent.size // 1024)
    if not np.array_equal(sent[::step], got[::step]) or sent[-1] != got[-1]:
        raise AssertionError("pulled-back array differs from the pushed one")


# --------------------------------------------------------------------------- transfers

TRANSFER_SIZES = (1, 64, 512)  # MiB, the push/pull rows


def transfers(
    push: Callable[[np.ndarray], Any],
    pull: Callable[[], np.ndarray],
    keep: Callable[[np.ndarray], None],
    sizes: tuple[int, ...],
    reps: int,
) -> dict[str, float]:
    """GB/s of ``push(arr)`` and ``pull()`` for each size: ``cold`` the first transfer of
    that size, ``warm`` the median of ``reps`` more. ``keep(arr)`` puts the array where
    ``pull`` fetches it from (not timed)."""
    out: dict[str, float] = {}
    perf = time.perf_counter
    for mb in sizes:
        arr = make_array(mb)
        for direction in ("push", "pull"):
            if direction == "pull":
                keep(arr)
            rates = []
            for _ in range(1 + reps):
                t0 = perf()
                if direction == "push":
                    push(arr)
                else:
                    got = pull()
                    dt = perf() - t0
                    _check_same(arr, got)
                    del got
                    rates.append(arr.nbytes / dt / 1e9)
                    continue
                rates.append(arr.nbytes / (perf() - t0) / 1e9)
            out[f"{direction}_{mb}_cold_gbps"] = rates[0]
            out[f"{direction}_{mb}_warm_gbps"] = statistics.median(rates[1:])
        del arr
    return out


def transfer_keys(sizes: tuple[int, ...] = TRANSFER_SIZES) -> tuple[str, ...]:
    return tuple(
        f"{d}_{mb}_{t}_gbps" for mb in sizes for d in ("push", "pull") for t in ("cold", "warm")
    )


# --------------------------------------------------------------------------- IPython-Parallel API


def setup_engines_rc(rc: Any, path: str, timeout: float = CALL_TIMEOUT) -> None:
    """Make ``path`` importable on every engine (belt and braces next to PYTHONPATH).

    ``sys.path.insert`` can't be sent through ``apply``: a bound method of a list pickles
    the list *by value*, so the insert would land in a copy.  ``execute`` runs in place.
    """
    code = f"import sys\nif {path!r} not in sys.path:\n    sys.path.insert(0, {path!r})\n"
    rc[:].execute(code, block=False).get(timeout=timeout)


def warmup_rc(rc: Any, timeout: float = CALL_TIMEOUT) -> None:
    """One call through each path, so imports/first-use costs aren't measured."""
    rc[:].apply_async(noop).get(timeout=timeout)


def apply_latency_rc(
    rc: Any, calls: int = 1000, warmup: int = 50, timeout: float = CALL_TIMEOUT
) -> dict[str, float]:
    """``rc[0].apply_sync(noop)`` round trip: p50/p90/p99/mean in ms; and, as
    ``apply_get_p50_ms``, the p50 of ``rc[0].apply_async(noop).get()`` (on jupyter_ext a
    blocking call's reply is read by the calling thread, an AsyncResult's by the client's
    IO thread).  Lower is better.  (A call that hangs is stopped by the round's timeout.)"""
    view = rc[0]
    out = _latencies_ms(lambda: view.apply_sync(noop), calls, warmup)
    got = _latencies_ms(lambda: view.apply_async(noop).get(timeout=timeout), calls // 2, warmup)
    out["apply_get_p50_ms"] = got["p50"]
    return out


def dv_apply_rate_rc(
    rc: Any, seconds: float = 1.5, warmup: int = 10, timeout: float = CALL_TIMEOUT
) -> float:
    """``rc[:].apply_sync(noop)`` (every engine), back to back: calls/s.  Higher is better."""
    view = rc[:]
    nengines = len(rc.ids)
    for _ in range(warmup):
        view.apply_async(noop).get(timeout=timeout)
    perf = time.perf_counter
    calls = 0
    t0 = perf()
    while True:
        res = view.apply_async(noop).get(timeout=timeout)
        calls += 1
        elapsed = perf() - t0
        if elapsed >= seconds:
            break
    if len(res) != nengines:
        raise AssertionError(f"expected {nengines} results, got {len(res)}")
    return calls / elapsed


def dv_pipelined_rate_rc(rc: Any, calls: int = 1000, timeout: float = 120.0) -> float:
    """Submit ``calls`` x ``rc[:].apply_async(noop)``, then wait for all: calls/s."""
    view = rc[:]
    view.apply_async(noop).get(timeout=CALL_TIMEOUT)
    deadline = time.monotonic() + timeout
    perf = time.perf_counter
    t0 = perf()
    ars = [view.apply_async(noop) for _ in range(calls)]
    for ar in ars:
        ar.get(timeout=_remaining(deadline))
    return calls / (perf() - t0)


def transfers_rc(
    rc: Any, sizes: tuple[int, ...], reps: int, timeout: float = 120.0
) -> dict[str, float]:
    """:func:`transfers` of ``rc[0].push({"a": arr})`` and ``rc[0].pull("a")``."""
    view = rc[0]

    def push(arr: np.ndarray) -> None:
        view.push({"a": arr}, block=False).get(timeout=timeout)

    def pull() -> Any:
        return view.pull("a", block=False).get(timeout=timeout)

    try:
        return transfers(push, pull, push, sizes, reps)
    finally:
        view.execute("a = None", block=False).get(timeout=timeout)


def push_to_all_rc(
    rc: Any, engine_pids: list[int], mb: int = 512, timeout: float = 300.0
) -> dict[str, Any]:
    """``rc[:].push({"b": arr})`` of an ``mb`` MiB array to every engine: seconds, and the
    memory it took over the array's size (1.0: one copy in all; N over zmq): the engines'
    RSS growth apart from shared memory, plus the host's shared memory growth (a segment
    the engines map counts once, whether or not they touched its pages)."""
    arr = make_array(mb)
    view = rc[:]
    view.execute("b = None", block=False).get(timeout=timeout)
    before = [_private_rss_mib(p) for p in engine_pids]
    shared_before = _host_shmem_mib()
    t0 = time.perf_counter()
    view.push({"b": arr}, block=False).get(timeout=timeout)
    dt = time.perf_counter() - t0
    after = [_private_rss_mib(p) for p in engine_pids]
    shared_after = _host_shmem_mib()
    growth = None
    if engine_pids and None not in before and None not in after:
        growth = (sum(after) - sum(before)) / mb  # type: ignore[arg-type]
        if shared_before is not None and shared_after is not None:
            growth += (shared_after - shared_before) / mb
    view.execute("b = None", block=False).get(timeout=timeout)
    return {"push8_s": dt, "push8_rss_x": growth}


def push_pull_gbps_rc(rc: Any, mb: int = 64, reps: int = 3, timeout: float = 120.0) -> float:
    """Push then pull an ``mb`` MiB numpy array to/from one engine: GB/s (2·size/time),
    median over ``reps``.  Higher is better."""
    arr = make_array(mb)
    view = rc[0]
    view.push({"a": np.zeros(1)}, block=False).get(timeout=timeout)
    rates = []
    perf = time.perf_counter
    for _ in range(reps):
        t0 = perf()
        view.push({"a": arr}, block=False).get(timeout=timeout)
        got = view.pull("a", block=False).get(timeout=timeout)
        dt = perf() - t0
        _check_same(arr, got)
        del got
        rates.append(2 * arr.nbytes / dt / 1e9)
    view.execute("del a", block=False).get(timeout=timeout)
    return statistics.median(rates)


def lb_apply_latency_rc(
    rc: Any, calls: int = 300, warmup: int = 30, timeout: float = CALL_TIMEOUT
) -> dict[str, float]:
    """Load-balanced ``v.apply_sync(noop)`` round trip: p50/p90 in ms.  Lower is better."""
    view = rc.load_balanced_view()
    return _latencies_ms(lambda: view.apply_async(noop).get(timeout=timeout), calls, warmup)


def lb_map_rate_rc(rc: Any, n: int = 2000, timeout: float = 300.0) -> float:
    """Load-balanced ``v.map_sync(noop1, range(n))`` with chunksize=1: tasks/s."""
    view = rc.load_balanced_view()
    view.map(noop1, range(20), block=False, chunksize=1).get(timeout=CALL_TIMEOUT)
    perf = time.perf_counter
    t0 = perf()
    res = view.map(noop1, range(n), block=False, chunksize=1).get(timeout=timeout)
    dt = perf() - t0
    res = list(res)
    if len(res) != n or res[-1] != n - 1:
        raise AssertionError(f"map returned {len(res)} results, last={res[-1:]}")
    return n / dt


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(
    pid: int | None, run: Callable[[], float], keys: tuple[str, str], units: int
) -> dict[str, Any]:
    """``run()``'s value under ``keys[0]``, and process ``pid``'s CPU time per unit of
    work during it (microseconds) under ``keys[1]`` (None without a PID). CPU time, unlike
    wall time, hardly moves when other processes compete for the cores."""
    before = cpu_seconds(pid) if pid else None
    value = run()
    used = None if before is None else (cpu_seconds(pid) - before) * 1e6 / units
    return {keys[0]: value, keys[1]: used}


def _engine_pids(rc: Any) -> list[int]:
    """The engines' PIDs where the client says them (jupyter_ext's ``engine_info``)."""
    pids = []
    for eid in rc.ids:
        try:
            pid = rc.engine_info(eid).get("pid")
        except Exception:
            return []
        if pid:
            pids.append(int(pid))
    return pids


def _memory_sample(rc: Any, controller_pid: int | None, engine_pids: list[int]) -> dict[str, Any]:
    """RSS of the controller, this client and the engines (MiB), plus the sizes of the
    client's per-task bookkeeping (what would grow if the client kept every task)."""
    gc.collect()  # count what is alive, not garbage the cycle collector hasn't reached
    engines = [rss_mib(p) for p in engine_pids]
    sample: dict[str, Any] = {
        "controller_rss_mib": rss_mib(controller_pid) if controller_pid else None,
        "client_rss_mib": rss_mib(),
        "engines_rss_mib": sum(engines) if engines and None not in engines else None,
    }
    for attr in ("history", "results", "metadata", "outstanding"):
        try:
            sample[f"client_{attr}"] = len(getattr(rc, attr))
        except (AttributeError, TypeError):
            sample[f"client_{attr}"] = None
    return sample


def task_database_size(cluster_id: str) -> dict[str, Any]:
    """The cluster's task database: its size on disk (file and WAL, MiB) and how many
    records it holds (read-only, beside the running controller); None without one."""
    import sqlite3

    from kernel_engine import clusters

    path = clusters.cluster_folder(cluster_id) / "tasks.db"
    out: dict[str, Any] = {"lr_db_mib": None, "lr_db_records": None}
    if not path.exists():
        return out
    size = sum(p.stat().st_size for p in (path, path.with_name("tasks.db-wal")) if p.exists())
    out["lr_db_mib"] = size / 2**20
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        out["lr_db_records"] = con.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        con.close()
    return out


def longrun_rc(
    rc: Any,
    n: int = 200_000,
    segments: int = 10,
    warmup: int = 2000,
    controller_pid: int | None = None,
    deadline: float | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``n`` tiny load-balanced tasks (``noop1``, chunksize=1) in ``segments`` equal maps,
    one after the other; each map's results are checked and dropped before the next one
    is submitted, so the client never holds more than ``n / segments`` of them.

    Returns ``{"first_tps", "last_tps", "ratio", "before", "after", "segments"}``:
    tasks/s of the first and last 10% of the tasks (the segments that make them up),
    last/first, memory samples (:func:`_memory_sample`) after the warm-up and after the
    last segment, and one record per segment (tasks/s and a memory sample).
    ``progress(partial)`` is called after each segment with the result so far.
    ``deadline`` (``time.monotonic()``) bounds the whole run.

    A segment that fails (a timeout: tasks got too slow) ends the run without raising:
    the result then has ``"error"`` (what happened, and how far that segment got), no
    ``last_tps``/``ratio``, ``after`` from the last whole segment and ``at_stop`` sampled
    at that moment.  A failing warm-up raises.
    """
    if segments < 10 or segments % 10:
        raise ValueError("segments must be a multiple of 10 (first/last 10% = whole segments)")
    if n % segments:
        raise ValueError(f"n={n} is not a multiple of segments={segments}")
    deadline = time.monotonic() + 3600.0 if deadline is None else deadline
    view = rc.load_balanced_view()
    engine_pids = _engine_pids(rc)
    # Warm-up of the same shape, so first-use costs don't land in the first 10%.
    view.map(noop1, range(warmup), block=False, chunksize=1).get(timeout=_remaining(deadline))
    out: dict[str, Any] = {
        "n": n,
        "segments_planned": segments,
        "warmup": warmup,
        "engine_pids": engine_pids,
        "before": _memory_sample(rc, controller_pid, engine_pids),
        "segments": [],
    }
    seg = n // segments
    perf = time.perf_counter
    tenth = segments // 10

    def rate(recs: list[dict[str, Any]]) -> float:
        return sum(r["tasks"] for r in recs) / sum(r["s"] for r in recs)

    for i in range(segments):
        lo = i * seg
        t0 = perf()
        amr = view.map(noop1, range(lo, lo + seg), block=False, chunksize=1)
        try:
            res = amr.get(timeout=_remaining(deadline))
            dt = perf() - t0
            if len(res) != seg or res[0] != lo or res[-1] != lo + seg - 1:
                raise AssertionError(f"{len(res)} results, ends {res[:1]}..{res[-1:]}")
        except Exception as exc:
            got = getattr(amr, "progress", None)
            where = f"{got:,} of {seg:,} done" if isinstance(got, int) else "unfinished"
            out["error"] = (
                f"stopped in tasks {lo + 1:,}-{lo + seg:,} ({where} after {perf() - t0:.0f} s): "
                f"{type(exc).__name__}: {exc}"
            )[:300]
            out["stopped_after"] = lo
            break
        del res, amr  # drop this segment's results before the next one
        rec = {"segment": i, "tasks": seg, "done": lo + seg, "s": dt, "tps": seg / dt}
        rec.update(_memory_sample(rc, controller_pid, engine_pids))
        out["segments"].append(rec)
        if i + 1 == tenth:
            out["first_tps"] = rate(out["segments"][:tenth])
        if progress is not None:
            progress(out)
    if "error" not in out:
        out["last_tps"] = rate(out["segments"][-tenth:])
        out["ratio"] = out["last_tps"] / out["first_tps"]
        out["total_tps"] = n / sum(r["s"] for r in out["segments"])
        out["after"] = _memory_sample(rc, controller_pid, engine_pids)
    else:  # "after" = after the last whole segment, comparable with a full run's
        out["at_stop"] = _memory_sample(rc, controller_pid, engine_pids)
        last_done = out["segments"][-1] if out["segments"] else out["at_stop"]
        out["after"] = {k: v for k, v in last_done.items() if k in out["at_stop"]}
    return out


# --------------------------------------------------------------------------- dask.distributed


def first_result_dask(client: Any, timeout: float = CALL_TIMEOUT) -> None:
    """``noop`` pinned to each worker, wait for all (analogue of ``rc[:].apply_sync(noop)``)."""
    from distributed import wait

    workers = sorted(client.scheduler_info()["workers"])
    futs = [
        client.submit(noop, pure=False, workers=[w], allow_other_workers=False) for w in workers
    ]
    _done, not_done = wait(futs, timeout=timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} workers did not answer in {timeout}s")
    client.gather(futs)


def warmup_dask(client: Any, timeout: float = CALL_TIMEOUT) -> None:
    client.gather(client.map(noop1, range(20), pure=False))
    client.submit(noop, pure=False).result(timeout=timeout)


def lb_apply_latency_dask(
    client: Any, calls: int = 300, warmup: int = 30, timeout: float = CALL_TIMEOUT
) -> dict[str, float]:
    """``client.submit(noop, pure=False).result()`` round trip: p50/p90 in ms."""
    return _latencies_ms(
        lambda: client.submit(noop, pure=False).result(timeout=timeout), calls, warmup
    )


def lb_map_rate_dask(client: Any, n: int = 2000, timeout: float = 300.0) -> float:
    """``client.gather(client.map(noop1, range(n), pure=False))``: tasks/s."""
    import concurrent.futures

    client.gather(client.map(noop1, range(20), pure=False))
    perf = time.perf_counter
    t0 = perf()
    futs = client.map(noop1, range(n), pure=False)
    # gather has no timeout of its own: wait (bounded) first, then gather what is done.
    from distributed import wait

    _done, not_done = wait(futs, timeout=timeout)
    if not_done:
        raise concurrent.futures.TimeoutError(f"{len(not_done)} tasks not done in {timeout}s")
    res = client.gather(futs)
    dt = perf() - t0
    if len(res) != n or res[-1] != n - 1:
        raise AssertionError(f"map returned {len(res)} results")
    return n / dt


def push_pull_gbps_dask(client: Any, mb: int = 64, reps: int = 3, timeout: float = 120.0) -> float:
    """``scatter(arr, workers=[w], direct=True, hash=False)`` then ``future.result()``:
    the dask analogue of push+pull to one engine.  GB/s (2·size/time), median of reps."""
    arr = make_array(mb)
    worker = sorted(client.scheduler_info()["workers"])[0]
    rates = []
    perf = time.perf_counter
    for _ in range(reps):
        t0 = perf()
        fut = client.scatter(arr, workers=[worker], direct=True, hash=False, timeout=timeout)
        got = fut.result(timeout=timeout)
        dt = perf() - t0
        _check_same(arr, got)
        del got
        fut.release()
        rates.append(2 * arr.nbytes / dt / 1e9)
    return statistics.median(rates)
