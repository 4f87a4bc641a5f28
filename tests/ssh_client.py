"""The client side of tests/test_ssh.py, run "on" the head host (``ip netns exec``):
``python ssh_client.py HEAD_IP A_IP B_IP SSH_CONFIG``. Runs the scenarios one after the
other and prints what it saw as one JSON object on its last line. Every wait is bounded;
every process it starts is stopped (and checked gone) by PID."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

import jupyter_ext as jx


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _tree(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def two_hosts(head: str, a: str, b: str, ssh_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.monotonic()
    cluster = jx.Cluster(
        engines="ssh", hosts={a: 1, b: 1}, ip=head, ssh_args=ssh_args, start_timeout=30
    )
    out["n"] = cluster.n
    try:
        rc = cluster.start_and_connect_sync()
        out["start_s"] = time.monotonic() - started
        out["ids"] = rc.ids
        out["doubled"] = rc[:].apply_sync(lambda x: 2 * x, 21)
        out["netns"] = rc[:].apply_sync(lambda: __import__("os").readlink("/proc/self/ns/net"))
        ar = rc[:].apply_async(lambda: print("hello from", __import__("os").getpid()))
        ar.get(timeout=10)
        out["stdout"] = list(ar.stdout)
        info = [rc.engine_info(i) for i in rc.ids]
        out["engine_pids"] = [i["pid"] for i in info]
        out["engine_hostnames"] = [i["hostname"] for i in info]
        out["head_hostname"] = __import__("socket").gethostname()
        out["engine_ips"] = [i["connection_info"]["ip"] for i in info]
        out["engine_curve"] = [bool(i["connection_info"].get("curve_publickey")) for i in info]
        client_file = json.loads(cluster.connection_file.read_text())
        out["client_ip"] = client_file["ip"]
        out["curve_serverkey"] = bool(client_file.get("curve_serverkey"))
        out["cluster_curve"] = cluster.curve
        sessions = [
            p
            for p in _tree(cluster.controller_pid or 0)
            if psutil.Process(p).name() == "ssh"  # (the ssh client sessions)
        ]
        out["ssh_sessions"] = len(sessions)
        controller = cluster.controller_pid or 0
        out.update(usr1(rc))
        out.update(dask(rc))
        # Ctrl-C of a task on a remote engine: Jupyter's interrupt_request, on its host
        ar = rc[0].apply_async(time.sleep, 30)
        time.sleep(0.5)
        t0 = time.monotonic()
        rc.send_signal("SIGINT", targets=[0])
        try:
            ar.get(timeout=15)
            out["interrupt"] = "no error"
        except Exception as exc:
            out["interrupt"] = f"{type(exc).__name__}: {exc}"[:300]
        out["interrupt_s"] = time.monotonic() - t0
        # engine 1 dies (SIGKILL, as a crash on its host) while running a task
        ar = rc[1].apply_async(time.sleep, 30)
        time.sleep(0.5)
        t0 = time.monotonic()
        psutil.Process(out["engine_pids"][1]).kill()
        try:
            ar.get(timeout=15)
            out["death"] = "no error"
        except Exception as exc:
            out["death"] = f"{type(exc).__name__}: {exc}"[:1000]
        out["death_s"] = time.monotonic() - t0
        out["ids_after_death"] = rc.ids
        out["still_computes"] = rc[0].apply_sync(lambda: 7)
        t0 = time.monotonic()
        cluster.stop_cluster_sync(timeout=10)
        out["stop_s"] = time.monotonic() - t0
        out["left"] = _wait_gone([controller, *sessions, *out["engine_pids"]], 5)
        logs = cluster.engine_logs()
        out["logs"] = {str(k): v[-3000:] for k, v in logs.items()}
    finally:
        if cluster.running:
            cluster.stop_cluster_sync(timeout=10)
    return out


def usr1(rc: Any) -> dict[str, Any]:
    """A signal other than SIGINT to a remote engine: it sends it itself, when asked."""
    rc[0].execute(
        "import signal\nusr1_seen = []\n"
        "signal.signal(signal.SIGUSR1, lambda signum, frame: usr1_seen.append(signum))",
        block=True,
    )
    rc.send_signal("SIGUSR1", targets=[0])
    deadline = time.monotonic() + 10
    while not (seen := rc[0].pull("usr1_seen", block=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"usr1_seen": seen}


def dask(rc: Any) -> dict[str, Any]:
    """become_dask across the hosts: each server on its engine's address; stop_dask."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return {"dask": "not installed"}
    t0 = time.monotonic()
    dask_client = rc.become_dask()
    try:
        out = {
            "dask_scheduler": dask_client.scheduler.address,
            "dask_workers": sorted(dask_client.run(os.getpid)),
            "dask_sum": dask_client.submit(sum, [1, 2, 3]).result(timeout=30),
        }
    finally:
        rc.stop_dask()
    out["dask_status"] = dask_client.status
    out["dask_servers_left"] = rc[:].apply_sync(
        lambda: len(__import__("jupyter_ext.integrations.dask").integrations.dask._state)
    )
    out["dask_s"] = time.monotonic() - t0
    return out


def refused(head: str, ssh_args: list[str]) -> dict[str, Any]:
    # the head itself runs no sshd: the connection is refused
    cluster = jx.Cluster(
        engines="ssh", hosts={head: 1}, ip=head, ssh_args=ssh_args, start_timeout=30
    )
    started = time.monotonic()
    try:
        cluster.start_cluster_sync()
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "took_s": time.monotonic() - started,
            "controller_left": _wait_gone([cluster.controller_pid or 0], 5),
        }
    finally:
        if cluster.running:
            cluster.stop_cluster_sync(timeout=10)
    return {"error": None}


def bad_command(a: str, ssh_args: list[str]) -> dict[str, Any]:
    cluster = jx.Cluster(
        engines="ssh",
        hosts={a: 1},
        ip=sys.argv[1],
        ssh_args=[*ssh_args, "-o", "NoSuchOption=yes"],
        start_timeout=30,
    )
    started = time.monotonic()
    try:
        cluster.start_cluster_sync()
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "took_s": time.monotonic() - started,
        }
    finally:
        if cluster.running:
            cluster.stop_cluster_sync(timeout=10)
    return {"error": None}


def loopback(a: str, b: str) -> dict[str, Any]:
    out = {}
    for ip in ("127.0.0.1", "0.0.0.0"):
        try:
            jx.Cluster(engines="ssh", hosts={a: 1, b: 2}, ip=ip)
        except Exception as exc:
            out[ip] = f"{type(exc).__name__}: {exc}"
        else:
            out[ip] = "no error"
    try:
        jx.Cluster(engines="ssh", hosts={a: 1, b: 2})
    except Exception as exc:
        out["default"] = f"{type(exc).__name__}: {exc}"
    return out


def launcher_stop(head: str, a: str, b: str, ssh_args: list[str], folder: Path) -> dict[str, Any]:
    """The launcher's own stop, by PID through ssh (the controller of two_hosts ends its
    engines itself first): engines that keep trying to register with a controller that
    never answers, ended by :meth:`SSHLauncher.stop` and by :func:`stop_record`."""
    import zmq

    from kernel_engine import clusters
    from kernel_engine.launchers import LaunchContext, ssh

    server_key = zmq.curve_keypair()[0].decode()
    info = {"ip": head, "client_port": 9, "key": "k" * 32, "curve_serverkey": server_key}
    env = {clusters.CONNECTION_ENV: json.dumps(info)}
    out: dict[str, Any] = {}
    launchers: list[ssh.SSHLauncher] = []
    try:
        for first in (0, 2):
            options = {"hosts": {a: 1, b: 1}, "ssh_args": ssh_args}
            context = LaunchContext(
                folder / f"launcher-{first}", 2, first, env=env, options=options
            )
            context.folder.mkdir(exist_ok=True)
            launchers.append(ssh.SSHLauncher(context))
            launchers[-1].start()
        sessions = [p.pid for launcher in launchers for p in launcher.sessions.values()]

        def engines() -> list[int]:
            return [p for launcher in launchers for d in launcher.remote_pids().values() for p in d]

        deadline = time.monotonic() + 10
        while len(engines()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = engines()
        out["engines_seen"] = len(seen)
        out["engines_running"] = len(_alive(seen))
        # the first: the launcher's stop, with its ssh sessions up
        t0 = time.monotonic()
        launchers[0].stop(5)
        out["stop_s"] = time.monotonic() - t0
        # the second: its controller died (its ssh sessions with it); the record is left
        record = launchers[1].record()
        for process in launchers[1].sessions.values():
            process.kill()
            process.wait(5)
        t0 = time.monotonic()
        ssh.stop_record(json.loads(json.dumps(record)), 5)
        out["stop_record_s"] = time.monotonic() - t0
        out["left"] = _wait_gone([*seen, *sessions], 5)
        for pid in out["left"]:
            psutil.Process(pid).kill()
    finally:
        for launcher in launchers:  # (after a failure above: nothing left behind)
            launcher.stop(5)
    return out


def main() -> None:
    head, a, b, config = sys.argv[1:5]
    ssh_args = ["-F", config]
    results: dict[str, Any] = {"pid": os.getpid()}
    for name, run in (
        ("loopback", lambda: loopback(a, b)),
        ("two_hosts", lambda: two_hosts(head, a, b, ssh_args)),
        ("refused", lambda: refused(head, ssh_args)),
        ("bad_command", lambda: bad_command(a, ssh_args)),
        # (its files in the hosts' temporary folder, which the test removes at the end)
        ("launcher_stop", lambda: launcher_stop(head, a, b, ssh_args, Path(config).parent)),
    ):
        try:
            results[name] = run()
        except Exception:
            results[name] = {"crashed": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
