#!/usr/bin/env python
"""Run the same workloads on jupyter_ext, IPython Parallel and dask.distributed; print a
Markdown table of medians and ratios.

    python benchmarks/run.py [--rounds 5] [--only direct|lb|longrun|all] [--tools jx,ipp,dask]
                             [--json out.json] [--quick] [--longrun-rounds 1]

Every (round, tool) pair runs in a fresh child process (this same script with ``--child``)
that starts a 2-engine cluster, times it, runs the workloads on it and stops it in a
``finally``.  Tools alternate order from round to round; the table shows the median over
rounds (and the min-max range).  The long run (200,000 load-balanced tasks: do the cost
per task and the memory stay flat?) runs in a child of its own, in the first
``--longrun-rounds`` rounds only, and for jupyter_ext only.  A tool that can't be
imported, can't start, or a workload that raises is reported in its cell as
``not available: ...`` / ``error: ...``; the run goes on.  Each child has a hard time
limit; processes a child leaves behind are found (this process is their subreaper) and
stopped by PID, and reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import workloads as W  # noqa: E402  (needs BENCH_DIR on sys.path)
from references import PoolTool, ZmqTool  # noqa: E402

N_ENGINES = 2
START_TIMEOUT = 120  # seconds for a cluster to become ready

TOOL_NAMES = {
    "jx": "jupyter_ext",
    "jxmem": "jupyter_ext, db=memory",
    "ipp": "IPython Parallel",
    "dask": "dask.distributed",
    "ppe": "ProcessPoolExecutor",
    "zmq": "raw pyzmq",
}
TOOL_DISTS = {
    "jx": "jupyter-px",
    "jxmem": "jupyter-px",
    "ipp": "ipyparallel",
    "dask": "distributed",
    "ppe": "",  # (the standard library)
    "zmq": "pyzmq",
}
REFERENCES = ("ppe", "zmq")
"""Reference tools: each measures only the rows that name it in ``Metric.refs``."""
SCALE_ENGINES = 8


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "lower" | "higher"
    groups: tuple[str, ...]
    dask: bool  # does dask have a comparable measurement?
    tools: tuple[str, ...] | None = None  # measured only for these tools (others: n/a)
    refs: tuple[str, ...] = ()  # reference tools (REFERENCES) that measure it too


CPU_TOOLS = ("jx", "jxmem")  # the controller's CPU is read from /proc by its PID

METRICS = [
    Metric(
        "start_s", "Start to ready, 2 engines", "s", "lower", ("direct", "lb"), True, refs=("ppe",)
    ),
    Metric(
        "first_result_s",
        "Start to first `rc[:].apply_sync(noop)` result",
        "s",
        "lower",
        ("direct", "lb"),
        True,
        refs=("ppe",),
    ),
    *(
        Metric(
            f"apply_{p}_ms",
            f"`rc[0].apply_sync(noop)` {p} (pool: `submit(noop).result()`; zmq: ping-pong)",
            "ms",
            "lower",
            ("direct",),
            False,
            refs=REFERENCES,
        )
        for p in ("p50", "p90", "p99")
    ),
    Metric(
        "apply_get_p50_ms",
        "`rc[0].apply_async(noop).get()` p50",
        "ms",
        "lower",
        ("direct",),
        False,
        refs=("ppe",),
    ),
    Metric(
        "dv_apply_cps",
        "`rc[:].apply_sync(noop)`, back to back",
        "calls/s",
        "higher",
        ("direct",),
        False,
    ),
    Metric(
        "dv_pipelined_cps",
        "`rc[:].apply_async(noop)` x{pipelined_calls}, then wait",
        "calls/s",
        "higher",
        ("direct",),
        False,
    ),
    Metric(
        "dv_ctrl_cpu_us",
        "Controller CPU per engine call of the row above",
        "us",
        "lower",
        ("direct",),
        False,
        CPU_TOOLS,
    ),
    Metric(
        "pushpull_gbps", "{mb} MiB numpy push+pull, one engine", "GB/s", "higher", ("direct",), True
    ),
    Metric(
        "lb_map_tps",
        "LB `map_sync(noop1, range({lb_map_n}))`, chunksize=1 (zmq: messages pipelined)",
        "tasks/s",
        "higher",
        ("lb",),
        True,
        refs=REFERENCES,
    ),
    Metric(
        "lb_map_ctrl_cpu_us",
        "Controller CPU per task of the LB map (robust to a noisy machine)",
        "us",
        "lower",
        ("lb",),
        False,
        CPU_TOOLS,
    ),
    Metric(
        "lb_apply_p50_ms", "LB `apply_sync(noop)` p50", "ms", "lower", ("lb",), True, refs=("ppe",)
    ),
    *(
        Metric(
            f"{d}_{mb}_{t}_gbps",
            f"{d} {mb} MiB numpy array, one engine, {t}",
            "GB/s",
            "higher",
            ("direct",),
            False,
            refs=REFERENCES,
        )
        for mb in W.TRANSFER_SIZES
        for d in ("push", "pull")
        for t in ("cold", "warm")
    ),
    Metric(
        "start8_s",
        f"Start to ready, {SCALE_ENGINES} engines",
        "s",
        "lower",
        ("scale",),
        True,
        refs=("ppe",),
    ),
    Metric(
        "eng_uss_mib",
        f"Memory per engine, USS ({SCALE_ENGINES} engines, after a first task; median)",
        "MiB",
        "lower",
        ("scale",),
        False,
        ("jx", "jxmem"),
    ),
    Metric(
        "eng_rss_mib",
        f"Memory per engine, RSS ({SCALE_ENGINES} engines, after a first task; median)",
        "MiB",
        "lower",
        ("scale",),
        False,
        ("jx", "jxmem"),
    ),
    Metric(
        "push8_s",
        f"`rc[:].push` of one {{push8_mb}} MiB array to {SCALE_ENGINES} engines",
        "s",
        "lower",
        ("scale",),
        False,
    ),
    Metric(
        "push8_rss_x",
        "... the engines' total RSS growth, in copies of the array (goal: 1.2 at most)",
        "copies",
        "lower",
        ("scale",),
        False,
    ),
]

#: Measured for these tools only: 200,000 tasks would take IPython Parallel (~430 tasks/s
#: here) 8 minutes and dask (~630/s) 5 minutes per round; see README.md.
LONGRUN_TOOLS = ("jx",)
_LR = ("longrun",)
METRICS += [
    Metric(
        "lr_first_tps",
        "Long run, {longrun_n:,} LB `noop1` tasks (chunksize=1): first 10%",
        "tasks/s",
        "higher",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric("lr_last_tps", "Long run: last 10%", "tasks/s", "higher", _LR, False, LONGRUN_TOOLS),
    Metric(
        "lr_ratio",
        "Long run: last 10% / first 10% tasks/s (goal: at least 0.7)",
        "ratio",
        "higher",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_ctrl_rss_before_mib",
        "Long run: controller RSS before (after warm-up)",
        "MiB",
        "lower",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_ctrl_rss_after_mib",
        "Long run: controller RSS after",
        "MiB",
        "lower",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_client_rss_before_mib",
        "Long run: client RSS before (after warm-up)",
        "MiB",
        "lower",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_client_rss_after_mib",
        "Long run: client RSS after",
        "MiB",
        "lower",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_db_mib",
        "Long run: task database on disk after (default limits: 1 GiB, 7 days)",
        "MiB",
        "lower",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
    Metric(
        "lr_db_records",
        "Long run: records the database holds after",
        "records",
        "higher",
        _LR,
        False,
        LONGRUN_TOOLS,
    ),
]
LONGRUN_KEYS = tuple(m.key for m in METRICS if m.groups == _LR)
SCALE_KEYS = tuple(m.key for m in METRICS if m.groups == ("scale",))

SIZES = {
    "full": dict(
        apply_calls=1000,
        apply_warmup=50,
        dv_seconds=1.5,
        pipelined_calls=1000,
        mb=64,
        pushpull_reps=5,
        lb_apply_calls=300,
        lb_map_n=2000,
        longrun_n=200_000,
        longrun_segments=10,
        longrun_warmup=2000,
        transfer_sizes=W.TRANSFER_SIZES,
        transfer_reps=3,
        push8_mb=512,
    ),
    "quick": dict(
        apply_calls=200,
        apply_warmup=20,
        dv_seconds=0.5,
        pipelined_calls=200,
        mb=16,
        pushpull_reps=1,
        lb_apply_calls=100,
        lb_map_n=300,
        longrun_n=6000,
        longrun_segments=10,
        longrun_warmup=200,
        transfer_sizes=(1, 16),
        transfer_reps=1,
        push8_mb=16,
    ),
}


def _source_fingerprint(mod: Any) -> str:
    """Hash of the (path, size, mtime) of a package's .py files (for jupyter_ext: also
    kernel_engine), to notice code that changes while the benchmark runs."""
    import hashlib

    roots = [Path(mod.__file__).parent]
    if mod.__name__ == "jupyter_ext":
        with contextlib.suppress(Exception):
            import kernel_engine

            roots.append(Path(kernel_engine.__file__).parent)
    h = hashlib.sha1()
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _errmsg(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    return text[:200]


# =========================================================================== child side
# One tool, one round, one cluster.  Writes its results to --result-file as it goes.


class RcTool:
    """ipyparallel and jupyter_ext: same Cluster/Client API."""

    def __init__(self, tool: str):
        self.tool = tool
        self.cluster: Any = None
        self.rc: Any = None
        self.mod: Any = None
        self.setup_s = 0.0

    def load(self) -> None:
        if self.tool in ("jx", "jxmem"):
            import jupyter_ext

            self.mod = jupyter_ext
        else:
            import ipyparallel

            self.mod = ipyparallel

    def module(self) -> Any:
        return self.mod

    def start(self, n: int, workdir: str) -> float:
        """Seconds from ``Cluster(...)`` creation until the client sees ``n`` engines."""
        t0 = time.perf_counter()
        if self.tool in ("jx", "jxmem"):
            # jx: the task records in SQLite (the default); jxmem: in memory only
            db = "memory" if self.tool == "jxmem" else "sqlite"
            self.cluster = self.mod.Cluster(
                n=n, log_level="WARNING", start_timeout=START_TIMEOUT, db=db
            )
        else:
            # A private profile dir: no cluster files left in ~/.ipython by crashed runs.
            self.cluster = self.mod.Cluster(
                n=n,
                log_level=logging.WARNING,
                engine_timeout=START_TIMEOUT,
                profile_dir=os.path.join(workdir, "ipp-profile"),
            )
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(n, timeout=START_TIMEOUT)
        elapsed = time.perf_counter() - t0
        if len(self.rc.ids) != n:
            raise RuntimeError(f"client sees {len(self.rc.ids)} engines, expected {n}")
        return elapsed

    def setup(self, notes: list[str]) -> bool:
        """Path setup + first noop on every engine; ``self.setup_s`` is how long it took."""
        t0 = time.perf_counter()
        try:
            W.setup_engines_rc(self.rc, str(BENCH_DIR))
        except Exception as exc:  # PYTHONPATH may be enough; the warm-up will tell
            notes.append(f"execute(sys.path.insert) failed: {_errmsg(exc)}")
        try:
            W.warmup_rc(self.rc)
        except Exception as exc:
            notes.append(f"warm-up failed: {_errmsg(exc)}")
            return False
        self.setup_s = time.perf_counter() - t0
        return True

    def workloads(
        self, only: str, s: dict[str, Any], ctx: ChildContext
    ) -> list[tuple[tuple[str, ...], Any]]:
        rc = self.rc
        out: list[tuple[tuple[str, ...], Any]] = []
        if only == "longrun" and self.tool in LONGRUN_TOOLS:
            out.append((LONGRUN_KEYS, lambda: self.longrun(s, ctx)))
        if only == "scale":
            if self.tool in ("jx", "jxmem"):
                out.append(
                    (("eng_uss_mib", "eng_rss_mib"), lambda: W.engine_memory(W._engine_pids(rc)))
                )
            out.append(
                (
                    ("push8_s", "push8_rss_x"),
                    lambda: W.push_to_all_rc(rc, W._engine_pids(rc), mb=s["push8_mb"]),
                )
            )
        if only in ("direct", "all"):
            out += [
                (
                    ("apply_p50_ms", "apply_p90_ms", "apply_p99_ms", "apply_get_p50_ms"),
                    lambda: W.apply_latency_rc(
                        rc, calls=s["apply_calls"], warmup=s["apply_warmup"]
                    ),
                ),
                (("dv_apply_cps",), lambda: W.dv_apply_rate_rc(rc, seconds=s["dv_seconds"])),
                (
                    ("dv_pipelined_cps", "dv_ctrl_cpu_us"),
                    lambda: W.with_cpu(
                        self.controller_pid,
                        lambda: W.dv_pipelined_rate_rc(rc, calls=s["pipelined_calls"]),
                        ("dv_pipelined_cps", "dv_ctrl_cpu_us"),
                        s["pipelined_calls"] * N_ENGINES,
                    ),
                ),
                (
                    ("pushpull_gbps",),
                    lambda: W.push_pull_gbps_rc(rc, mb=s["mb"], reps=s["pushpull_reps"]),
                ),
                (
                    W.transfer_keys(s["transfer_sizes"]),
                    lambda: W.transfers_rc(rc, s["transfer_sizes"], s["transfer_reps"]),
                ),
            ]
        if only in ("lb", "all"):
            out += [
                (
                    ("lb_apply_p50_ms",),
                    lambda: W.lb_apply_latency_rc(rc, calls=s["lb_apply_calls"]),
                ),
                (
                    ("lb_map_tps", "lb_map_ctrl_cpu_us"),
                    lambda: W.with_cpu(
                        self.controller_pid,
                        lambda: W.lb_map_rate_rc(rc, n=s["lb_map_n"]),
                        ("lb_map_tps", "lb_map_ctrl_cpu_us"),
                        s["lb_map_n"],
                    ),
                ),
            ]
        return out

    @property
    def controller_pid(self) -> int | None:
        return getattr(self.cluster, "controller_pid", None)

    def longrun(self, s: dict[str, Any], ctx: ChildContext) -> dict[str, Any]:
        """The long run; its details (every segment) go to the result file as they come.
        A run stopped partway still gives the first 10% and the RSS before; its "after"
        rows show the RSS after its last whole segment, flagged with why it stopped."""
        pid = getattr(self.cluster, "controller_pid", None)
        detail = W.longrun_rc(
            self.rc,
            n=s["longrun_n"],
            segments=s["longrun_segments"],
            warmup=s["longrun_warmup"],
            controller_pid=pid,
            deadline=ctx.deadline,
            progress=lambda partial: ctx.report("longrun", partial),
        )
        ctx.report("longrun", detail)
        before, after = detail["before"], detail["after"]
        out: dict[str, Any] = {
            "lr_first_tps": detail.get("first_tps"),
            "lr_last_tps": detail.get("last_tps"),
            "lr_ratio": detail.get("ratio"),
            "lr_ctrl_rss_before_mib": before["controller_rss_mib"],
            "lr_ctrl_rss_after_mib": after.get("controller_rss_mib"),
            "lr_client_rss_before_mib": before["client_rss_mib"],
            "lr_client_rss_after_mib": after.get("client_rss_mib"),
            **W.task_database_size(self.rc.cluster_id),
        }
        if "error" in detail:
            print(f"long run: {detail['error']}", flush=True)
            why = detail["error"]
            done = f"RSS after {detail['stopped_after']:,} of {detail['n']:,} tasks, then stopped"
            errors = {k: why for k in ("lr_first_tps", "lr_last_tps", "lr_ratio") if out[k] is None}
            for k in ("lr_ctrl_rss_after_mib", "lr_client_rss_after_mib"):
                errors.setdefault(k, done)
            out["_errors"] = errors
        return out

    def stop(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            if self.tool == "ipp" and self.rc is not None:
                with contextlib.suppress(Exception):
                    self.rc.close()
            cluster.stop_cluster_sync()
        self.rc = None


class DaskTool:
    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.setup_s = 0.0

    def load(self) -> None:
        import distributed  # noqa: F401

    def module(self) -> Any:
        import distributed

        return distributed

    def start(self, n: int, workdir: str) -> float:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        self.cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
            local_directory=workdir,
        )
        self.client = Client(self.cluster, timeout=START_TIMEOUT)
        self.client.wait_for_workers(n, timeout=START_TIMEOUT)
        return time.perf_counter() - t0

    def setup(self, notes: list[str]) -> bool:
        """First noop on every worker (``client.run``) + warm-up; ``self.setup_s``: the
        time to that first result."""
        t0 = time.perf_counter()
        try:
            W.first_result_dask(self.client)
            self.setup_s = time.perf_counter() - t0
            W.warmup_dask(self.client)
        except Exception as exc:
            notes.append(f"warm-up failed: {_errmsg(exc)}")
            return False
        return True

    def workloads(
        self, only: str, s: dict[str, Any], ctx: ChildContext
    ) -> list[tuple[tuple[str, ...], Any]]:
        c = self.client
        out: list[tuple[tuple[str, ...], Any]] = []
        if only in ("direct", "all"):
            out.append(
                (
                    ("pushpull_gbps",),
                    lambda: W.push_pull_gbps_dask(c, mb=s["mb"], reps=s["pushpull_reps"]),
                )
            )
        if only in ("lb", "all"):
            out += [
                (
                    ("lb_apply_p50_ms",),
                    lambda: W.lb_apply_latency_dask(c, calls=s["lb_apply_calls"]),
                ),
                (("lb_map_tps",), lambda: W.lb_map_rate_dask(c, n=s["lb_map_n"])),
            ]
        return out

    def stop(self) -> None:
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        try:
            if client is not None:
                client.close(timeout=30)
        finally:
            if cluster is not None:
                cluster.close(timeout=30)


class ChildContext:
    """What a workload may use besides its sizes: the child's own deadline (its hard
    limit minus time to stop the cluster) and ``report(name, data)``, which stores
    ``data`` under ``name`` in the result file right away (kept even if the child is
    killed later)."""

    def __init__(self, deadline: float, report: Any):
        self.deadline = deadline
        self.report = report


STOP_MARGIN = 60.0  # seconds of a child's limit kept for stopping its cluster


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def child_main(
    tool: str, only: str, size: str, result_file: str, limit: float, longrun_tasks: int | None
) -> int:
    t_child = time.monotonic()
    signal.signal(signal.SIGTERM, _on_sigterm)
    res: dict[str, Any] = {"tool": tool, "metrics": {}, "errors": {}, "notes": []}

    def save() -> None:
        tmp = result_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, result_file)

    def report(name: str, data: Any) -> None:
        res[name] = data
        save()

    ctx = ChildContext(t_child + max(limit - STOP_MARGIN, limit / 2), report)

    s = dict(SIZES[size])
    if longrun_tasks:
        s["longrun_n"] = longrun_tasks
    impl: Any
    if tool == "dask":
        impl = DaskTool()
    elif tool == "ppe":
        impl = PoolTool()
    elif tool == "zmq":
        impl = ZmqTool()
    else:
        impl = RcTool(tool)
    try:
        impl.load()
    except Exception as exc:
        res["unavailable"] = _errmsg(exc)
        save()
        return 0
    with contextlib.suppress(Exception):
        res["code"] = _source_fingerprint(impl.module())
    workdir = tempfile.mkdtemp(prefix=f"{tool}-work-", dir=os.getcwd())
    try:
        scale = only == "scale"
        try:
            res["metrics"]["start8_s" if scale else "start_s"] = impl.start(
                SCALE_ENGINES if scale else N_ENGINES, workdir
            )
        except Exception as exc:
            res["start_error"] = _errmsg(exc)
            traceback.print_exc()
            return 0
        save()
        # Start to first result: also pays for whatever "ready" left undone (imports...).
        if impl.setup(res["notes"]) and not scale:
            res["metrics"]["first_result_s"] = res["metrics"]["start_s"] + impl.setup_s
        save()
        for keys, fn in impl.workloads(only, s, ctx):
            t0 = time.monotonic()
            try:
                value = fn()
            except Exception as exc:
                traceback.print_exc()
                for k in keys:
                    res["errors"][k] = _errmsg(exc)
            else:
                if isinstance(value, dict):  # latency: p50/p90, or one value per key
                    errors = value.get("_errors", {})  # a value may come with an error
                    for k in keys:
                        v = value[k] if k in value else value[k.rsplit("_", 2)[-2]]
                        if v is not None:
                            res["metrics"][k] = v
                        if k in errors or v is None:
                            res["errors"][k] = errors.get(k, "not measured")
                else:
                    res["metrics"][keys[0]] = value
            print(f"{tool}: {keys[0]} took {time.monotonic() - t0:.1f}s", flush=True)
            save()
    except KeyboardInterrupt as exc:
        res["notes"].append(f"interrupted ({exc})")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the stop finish (parent SIGKILLs)
        try:
            impl.stop()
        except BaseException as exc:
            traceback.print_exc()
            res["notes"].append(f"stop failed: {_errmsg(exc)}")
        save()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# =========================================================================== parent side


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def _all_pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _descendants(root: int) -> dict[int, int]:
    """{pid: starttime} of every process below ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st:
            children.setdefault(st[1], []).append((pid, st[2]))
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def _enable_subreaper() -> bool:
    """Orphans of our children get re-parented to us, so we can find and stop them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


_OWN_CHILDREN: set[int] = set()  # reaped by subprocess.Popen, not by _reap_zombies


def _reap_zombies() -> None:
    me = os.getpid()
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st and st[1] == me and st[0] == "Z" and pid not in _OWN_CHILDREN:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _stop_pids(pids: dict[int, int], grace: float = 10.0) -> list[str]:
    """Wait ``grace`` s for these processes to exit, then SIGTERM, then SIGKILL.  Only
    processes whose start time still matches (no PID reuse).  Returns what was stopped."""

    def alive() -> dict[int, int]:
        _reap_zombies()
        out = {}
        for pid, start in pids.items():
            st = _proc_stat(pid)
            if st and st[2] == start and st[0] != "Z":
                out[pid] = start
        return out

    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive()
    stopped = [f"{pid} {_cmdline(pid)}" for pid in left]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            break
    return stopped


def _orphans(exclude: set[int]) -> dict[int, int]:
    me = os.getpid()
    out = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st and st[1] == me and st[0] != "Z" and pid not in exclude:
            out[pid] = st[2]
            out.update(_descendants(pid))
    return out


def run_child(
    tool: str,
    rnd: int,
    args: argparse.Namespace,
    tmpdir: str,
    only: str,
    limit: float,
) -> dict[str, Any]:
    """One child: ``tool``, round ``rnd``, workloads of ``only``, at most ``limit`` s."""
    tag = "-longrun" if only == "longrun" else ""
    result_file = os.path.join(tmpdir, f"{tool}-r{rnd}{tag}.json")
    log_path = os.path.join(tmpdir, f"{tool}-r{rnd}{tag}.log")
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        tool,
        "--only",
        only,
        "--size",
        args.size,
        "--result-file",
        result_file,
        "--child-timeout",
        str(limit),
        *(["--longrun-tasks", str(args.longrun_tasks)] if args.longrun_tasks else []),
    ]
    notes: list[str] = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmpdir, stdin=subprocess.DEVNULL
        )
        _OWN_CHILDREN.add(proc.pid)
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() - t0 > limit:
                timed_out = True
                break
            _reap_zombies()
            time.sleep(0.2)
        if timed_out:
            notes.append(f"timed out after {limit:.0f}s")
            tree = _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)  # child stops its cluster in a finally
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            killed = _stop_pids(tree, grace=2.0)
            if killed:
                notes.append(f"killed {len(killed)} leftover processes")
    _OWN_CHILDREN.discard(proc.pid)
    # Anything still alive that this child started now hangs off us (subreaper).
    leaked = _stop_pids(_orphans(exclude=set()), grace=10.0) if SUBREAPER else []
    if leaked:
        notes.append(f"{len(leaked)} processes outlived stop, killed: " + "; ".join(leaked))
    try:
        with open(result_file) as f:
            res: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        tail = ""
        with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
            tail = lines[-1] if lines else ""
        res = {
            "tool": tool,
            "metrics": {},
            "errors": {},
            "start_error": f"child exited {proc.returncode}: {tail}"[:200],
        }
    if timed_out and "start_s" not in res["metrics"] and "start_error" not in res:
        res["start_error"] = notes[0]
    res.setdefault("notes", []).extend(notes)
    res["groups"] = ["direct", "lb"] if only == "all" else [only]
    res["round"] = rnd
    res["load_before"] = load
    res["wall_s"] = time.monotonic() - t0
    res["log"] = log_path
    return res


def merge_longrun(
    res: dict[str, Any] | None,
    lr: dict[str, Any],
    keys: tuple[str, ...] = LONGRUN_KEYS,
    group: str = "longrun",
) -> dict[str, Any]:
    """Fold a long-run (or scale) child's result into the same round's regular one
    (``res``; None with ``--only longrun``).  Only ``keys`` are taken: its start-up
    numbers belong to another cluster and don't go into the start-up rows."""
    if res is None:
        return lr
    if group != "longrun":
        for k in keys:
            if k in lr["metrics"]:
                res["metrics"][k] = lr["metrics"][k]
            elif k in lr["errors"] or "start_error" in lr:
                res["errors"][k] = lr["errors"].get(k) or f"start: {lr['start_error']}"
        res["notes"] += [f"{group}: {n}" for n in lr.get("notes", [])]
        res["groups"] = [*res.get("groups", []), group]
        return res
    for k in keys:
        if k in lr["metrics"]:
            res["metrics"][k] = lr["metrics"][k]
        elif k in lr["errors"]:
            res["errors"][k] = lr["errors"][k]
        elif "start_error" in lr:
            res["errors"][k] = f"start: {lr['start_error']}"
        elif "unavailable" in lr:
            res["errors"][k] = f"not available: {lr['unavailable']}"
        elif lr.get("notes"):
            res["errors"][k] = lr["notes"][0]
    res["notes"] += [f"longrun: {n}" for n in lr.get("notes", [])]
    res["groups"] = [*res.get("groups", []), "longrun"]
    for k in ("longrun", "code"):
        if k in lr:
            res["longrun_code" if k == "code" else k] = lr[k]
    res["longrun_wall_s"] = lr.get("wall_s")
    res["longrun_log"] = lr.get("log")
    return res


def longrun_lines(tools: list[str], results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown: every long run's segments (tasks/s, RSS), so growth shows."""

    def num(x: Any) -> str:
        return "-" if x is None else _fmt(x)

    out: list[str] = []
    for tool in tools:
        for r in results.get(tool, []):
            lr = r.get("longrun")
            if not lr or not lr.get("segments"):
                continue
            b = lr["before"]
            out += [
                "",
                f"Long run, {TOOL_NAMES[tool]}, round {r['round'] + 1}: {lr['n']:,} tasks in "
                f"{lr['segments_planned']} maps of {lr['n'] // lr['segments_planned']:,} "
                f"(after a {lr['warmup']:,}-task warm-up). RSS in MiB; `results`/`history` "
                "are the lengths of the client's `rc.results` and `rc.history`.",
                "",
                "| Tasks done | tasks/s | controller RSS | client RSS | engines RSS (sum) "
                "| results | history |",
                "|---|---|---|---|---|---|---|",
                f"| 0 (before) | - | {num(b['controller_rss_mib'])} | "
                f"{num(b['client_rss_mib'])} | {num(b['engines_rss_mib'])} | "
                f"{num(b.get('client_results'))} | {num(b.get('client_history'))} |",
            ]
            for g in lr["segments"]:
                out.append(
                    f"| {g['done']:,} | {num(g['tps'])} | {num(g['controller_rss_mib'])} | "
                    f"{num(g['client_rss_mib'])} | {num(g['engines_rss_mib'])} | "
                    f"{num(g.get('client_results'))} | {num(g.get('client_history'))} |"
                )
            if len(lr["segments"]) < lr["segments_planned"]:
                out.append(f"| (stopped after {len(lr['segments'])} segments) |")
    return out


SUBREAPER = False


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _short(msg: str, limit: int = 100) -> str:
    """An error message for a table cell: no trailing '(/path/to/file.py)', bounded."""
    msg = re.sub(r" \(/[^)]*\)$", "", msg)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _cell_text(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def summarize(
    tools: list[str], results: dict[str, list[dict[str, Any]]], metrics: list[Metric]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {tool: {"median", "min", "max", "n", "errors", "cell"}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in metrics:
        row = out.setdefault(m.key, {})
        for tool in tools:
            runs = [
                r
                for r in results.get(tool, [])
                if set(m.groups) & set(r.get("groups", m.groups)) or "unavailable" in r
            ]
            if (
                (tool == "dask" and not m.dask)
                or (m.tools is not None and tool not in m.tools)
                or (tool in REFERENCES and tool not in m.refs)
            ):
                row[tool] = {"cell": "n/a"}
                continue
            unavailable = [r["unavailable"] for r in runs if "unavailable" in r]
            if unavailable:
                row[tool] = {"cell": f"not available: {unavailable[0]}"}
                continue
            vals = [r["metrics"][m.key] for r in runs if m.key in r.get("metrics", {})]
            errs = [r["errors"][m.key] for r in runs if m.key in r.get("errors", {})]
            errs += [
                r["start_error"]
                for r in runs
                if "start_error" in r and m.key not in r.get("metrics", {})
            ]
            errs += [
                n
                for r in runs
                if m.key not in r.get("metrics", {})
                and m.key not in r.get("errors", {})
                and "start_error" not in r
                for n in r.get("notes", [])[:1]
            ]
            info: dict[str, Any] = {"n": len(vals), "errors": errs, "samples": vals}
            if vals:
                med = statistics.median(vals)
                info.update(median=med, min=min(vals), max=max(vals))
                cell = _fmt(med)
                if len(vals) > 1:
                    cell += f" [{_fmt(min(vals))}-{_fmt(max(vals))}]"
                if errs:
                    cell += f" ({len(errs)} failed: {_short(errs[0])})"
            elif errs:
                cell = f"error: {_short(errs[0])}"
            else:
                cell = "error: no result"
            info["cell"] = _cell_text(cell)
            row[tool] = info
    return out


def ratio(m: Metric, subject: dict[str, Any], other: dict[str, Any]) -> tuple[float | None, str]:
    """How many times better ``subject`` is than ``other`` (>1: subject better)."""
    a, b = subject.get("median"), other.get("median")
    if a is None or b is None or a <= 0 or b <= 0:
        return None, "-"
    r = b / a if m.better == "lower" else a / b
    return r, f"{r:.2f}x"


def render_table(
    tools: list[str], summary: dict[str, Any], metrics: list[Metric], sizes: dict[str, Any]
) -> str:
    subject = "jx" if "jx" in tools else tools[0]
    others = [t for t in tools if t != subject]
    head = ["Workload (2 engines)", "Unit", "Better"] + [TOOL_NAMES[t] for t in tools]
    head += [f"{subject} vs {o}" for o in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in metrics:
        row = summary[m.key]
        cells = [m.label.format(**sizes), m.unit, m.better]
        cells += [row[t]["cell"] for t in tools]
        for o in others:
            cells.append(ratio(m, row[subject], row[o])[1])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(tool: str) -> str:
    if not TOOL_DISTS[tool]:
        return f"(Python {platform.python_version()})"
    try:
        return metadata.version(TOOL_DISTS[tool])
    except metadata.PackageNotFoundError:
        return "not installed"


def _progress(rnd: int, rounds: int, tool: str, res: dict[str, Any], what: str = "") -> None:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in res["metrics"].items())
    lr = res.get("longrun")
    if lr and lr.get("segments"):
        segs = lr["segments"]
        shown += "; segments tasks/s " + " ".join(_fmt(g["tps"]) for g in segs)
        for label, key in (("controller", "controller_rss_mib"), ("client", "client_rss_mib")):
            a, b = lr["before"][key], segs[-1][key]
            if a is not None and b is not None:
                shown += f"; {label} RSS {a:.1f} -> {b:.1f} MiB"
    problems = [f"unavailable: {res['unavailable']}"] if "unavailable" in res else []
    problems += [f"start: {res['start_error']}"] if "start_error" in res else []
    problems += [f"{k}: {v}" for k, v in res["errors"].items()] + res["notes"]
    print(
        f"[round {rnd + 1}/{rounds}] {tool}{' ' + what if what else ''} "
        f"({res['wall_s']:.0f}s): {shown}" + (f"  !! {' | '.join(problems)}" if problems else ""),
        file=sys.stderr,
        flush=True,
    )


def parent_main(args: argparse.Namespace) -> int:
    global SUBREAPER
    SUBREAPER = _enable_subreaper()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOL_NAMES]
    if bad or not tools:
        print(f"unknown tools {bad}; choose from {','.join(TOOL_NAMES)}", file=sys.stderr)
        return 2
    longrun_rounds = {"longrun": args.rounds, "all": min(args.longrun_rounds, args.rounds)}.get(
        args.only, 0
    )
    # the regular child's --only
    regular = None if args.only in ("longrun", "scale") else args.only
    metrics = [
        m
        for m in METRICS
        if (args.only == "all" and (m.groups != _LR or longrun_rounds)) or args.only in m.groups
    ]
    sizes = dict(SIZES[args.size])
    if args.longrun_tasks:
        sizes["longrun_n"] = args.longrun_tasks
    tmpdir = tempfile.mkdtemp(prefix="px-bench-")
    print(f"# logs in {tmpdir}; subreaper={'on' if SUBREAPER else 'off'}", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    skip: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        k = rnd % len(tools)
        for tool in tools[k:] + tools[:k]:  # alternate who goes first
            if tool in skip:  # not importable: no point in trying again
                results[tool].append(skip[tool])
                continue
            res = None
            if regular is not None:
                res = run_child(tool, rnd, args, tmpdir, regular, args.child_timeout)
                _progress(rnd, args.rounds, tool, res)
                if "unavailable" in res:
                    skip[tool] = res
            if rnd < longrun_rounds and tool in LONGRUN_TOOLS and tool not in skip:
                lr = run_child(tool, rnd, args, tmpdir, "longrun", args.longrun_timeout)
                _progress(rnd, args.rounds, tool, lr, "long run")
                if "unavailable" in lr:
                    skip[tool] = lr
                res = merge_longrun(res, lr)
            if args.only in ("all", "scale") and tool not in skip and tool != "zmq":
                sc = run_child(tool, rnd, args, tmpdir, "scale", args.child_timeout)
                _progress(rnd, args.rounds, tool, sc, f"{SCALE_ENGINES} engines")
                res = merge_longrun(res, sc, SCALE_KEYS, "scale")
            if res is not None:
                results[tool].append(res)
    summary = summarize(tools, results, metrics)
    table = render_table(tools, summary, metrics, sizes)
    subject = "jx" if "jx" in tools else tools[0]
    versions = ", ".join(
        f"{TOOL_NAMES[t]} {_version(t)}" + (" (not importable)" if t in skip else "") for t in tools
    )
    out = [
        "",
        f"## jupyter-px benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {versions})",
        "",
        f"Median of {args.rounds} rounds [min-max]; each round starts a fresh cluster per "
        f"tool, tools alternate order. Size preset: `{args.size}`."
        + (
            f" Long-run rows: {longrun_rounds} round{'s' if longrun_rounds != 1 else ''}, "
            f"{TOOL_NAMES['jx']} only (n/a: not run, see benchmarks/README.md); first/last "
            "10% = the first/last of 10 equal maps, each map's results dropped before the "
            "next; RSS = VmRSS of the process, in MiB."
            if longrun_rounds
            else ""
        ),
        "",
        table,
        "",
        f"**Ratio columns** (`{subject} vs X`): how many times better {TOOL_NAMES[subject]} "
        f"is than X on that row, from the medians: X/{subject} for *lower is better* rows, "
        f"{subject}/X for *higher is better* rows. **>1 means {TOOL_NAMES[subject]} is "
        f"better, <1 means it is worse.**",
    ]
    out += longrun_lines(tools, results)
    loads = [r["load_before"] for t in tools for r in results[t] if r.get("load_before")]
    if loads:
        out += [
            "",
            "1-min load average before each tool's round: "
            f"{min(loads):.2f}-{max(loads):.2f} "
            f"on {os.cpu_count()} CPUs (our own previous round counts too; well above the "
            "CPU count means something else was competing).",
        ]
    for t in tools:
        codes = {r[k] for r in results[t] for k in ("code", "longrun_code") if k in r}
        if len(codes) > 1:
            out += [
                "",
                f"**Warning:** {TOOL_NAMES[t]}'s source changed during the run "
                f"({len(codes)} versions over {args.rounds} rounds): its rounds "
                "don't all measure the same code.",
            ]
    if "dask" in tools:
        out += [
            "",
            "dask.distributed equivalents: start = `LocalCluster(n_workers=2, "
            "threads_per_worker=1, processes=True)` + `Client` + `wait_for_workers(2)`; "
            "first result = `client.submit(noop, workers=[w])` for each worker, all done; "
            "push+pull = `client.scatter(arr, workers=[w], direct=True, hash=False)` + "
            "`future.result()`; LB map = `client.gather(client.map(noop1, range(N), "
            "pure=False))`; LB apply = `client.submit(noop, pure=False).result()`. "
            "n/a = no comparable operation.",
        ]
    print("\n".join(out))
    print(f"\n# total {time.monotonic() - t_start:.0f}s; logs in {tmpdir}", file=sys.stderr)
    if args.json:
        payload = {
            "meta": {
                "rounds": args.rounds,
                "longrun_rounds": longrun_rounds,
                "only": args.only,
                "tools": tools,
                "size": args.size,
                "sizes": sizes,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "versions": {t: _version(t) for t in tools},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "better": {m.key: m.better for m in metrics},
                "units": {m.key: m.unit for m in metrics},
            },
            "summary": {
                k: {
                    t: {kk: vv for kk, vv in v.items() if kk != "cell"} | {"cell": v["cell"]}
                    for t, v in row.items()
                }
                for k, row in summary.items()
            },
            "runs": results,
            "table": table,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds per tool (default 5)")
    p.add_argument(
        "--only",
        choices=("direct", "lb", "longrun", "scale", "all"),
        default="all",
        help="direct: start, apply latency, DirectView rates, push/pull; "
        "lb: start, load-balanced apply and map; longrun: 200,000 load-balanced tasks, "
        "throughput and RSS over time (jupyter_ext only), --rounds times; "
        f"scale: start with {SCALE_ENGINES} engines, and one array pushed to all of them; "
        "all: direct + lb + scale every round, plus longrun in the first --longrun-rounds "
        "rounds",
    )
    p.add_argument(
        "--longrun-rounds",
        type=int,
        default=1,
        help="with --only all: how many rounds also run the long run (default 1; 0: none)",
    )
    p.add_argument(
        "--longrun-timeout",
        type=float,
        default=600.0,
        help="hard limit (s) for one long-run child (default 600)",
    )
    p.add_argument(
        "--longrun-tasks",
        type=int,
        default=None,
        help="tasks in the long run (default 200,000; a multiple of 10): 1000000 shows "
        "what the task database holds and weighs after a million tasks",
    )
    p.add_argument(
        "--tools",
        default="jx,ipp,dask,ppe,zmq",
        help="comma list of jx, ipp, dask, ppe (ProcessPoolExecutor), zmq (raw pyzmq), "
        "jxmem (jupyter_ext with db=memory)",
    )
    p.add_argument("--json", metavar="OUT", help="also write every sample and the summary")
    p.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        default="full",
        help="small sizes, for a smoke test",
    )
    p.add_argument("--size", choices=tuple(SIZES), default="full", help=argparse.SUPPRESS)
    p.add_argument(
        "--child-timeout",
        type=float,
        default=400.0,
        help="hard limit (s) for one tool's round (default 400)",
    )
    p.add_argument("--child", choices=tuple(TOOL_NAMES), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(
            args.child,
            args.only,
            args.size,
            args.result_file,
            args.child_timeout,
            args.longrun_tasks,
        )
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.longrun_rounds < 0:
        p.error("--longrun-rounds must be >= 0")
    if args.longrun_tasks is not None and (args.longrun_tasks < 10 or args.longrun_tasks % 10):
        p.error("--longrun-tasks must be a positive multiple of 10")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
