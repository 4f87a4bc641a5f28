"""Engines started through ssh on other hosts (network namespaces with their own sshd and
host name, see ssh_support.py): both hosts' engines register and compute with the ids of
the hosts' order, everything encrypted; an engine killed on its host fails its task at
once with the cause; a refused host and a bad ssh option fail the start at once with
ssh's own words; stop leaves no process on any host; a loopback or wildcard ``ip`` with
remote hosts is refused, naming the address to use. The address and placement
decisions are tested first, without processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import kill_pids, wait_gone
from ssh_support import A_IP, B_IP, HEAD_IP, SshHosts, missing

from kernel_engine.errors import ClusterError, LaunchError
from kernel_engine.launchers import LaunchContext, find, ssh

# ----- pure decisions


def test_hosts_are_checked():
    assert ssh.check_hosts({"a": 2, "root@b": 1}) == {"a": 2, "root@b": 1}
    for bad, what in (
        ({}, "empty"),
        ({"-oProxyCommand=x": 1}, "not a host"),
        ({"a b": 1}, "not a host"),
        ({"a": 0}, "hosts\\['a'\\]"),
    ):
        with pytest.raises(ValueError, match=what):
            ssh.check_hosts(bad)
    with pytest.raises(TypeError, match="dict"):
        ssh.check_hosts(["a"])


def test_engines_fill_the_hosts_slots_in_order():
    hosts = {"a": 2, "b": 1}
    assert ssh.placement(hosts, 3) == ["a", "a", "b"]
    assert ssh.placement(hosts, 2) == ["a", "a"]
    assert ssh.placement(hosts, 5) == ["a", "a", "b", "a", "a"]


def test_remote_hosts_need_a_routable_address_and_it_is_named():
    remote = {"10.1.0.5": 1, "localhost": 1}
    said = ssh.address_problem("127.0.0.1", remote, "10.1.0.1")
    assert said is not None
    assert "10.1.0.5" in said and "loopback" in said and "ip='10.1.0.1'" in said
    said = ssh.address_problem("0.0.0.0", remote, "10.1.0.1")
    assert said is not None and "every interface" in said and "ip='10.1.0.1'" in said
    assert "ip=" in str(ssh.address_problem("::", {"localhost": 1}))  # (no wildcard, ever)
    assert ssh.address_problem("10.1.0.1", remote) is None
    assert ssh.address_problem("10.1.0.1", remote, curve=False) is not None
    # engines on this machine only: loopback is right
    assert ssh.address_problem("127.0.0.1", {"localhost": 2, "root@127.0.0.1": 1}) is None


def test_the_cluster_refuses_loopback_with_remote_hosts_before_starting(monkeypatch):
    import jupyter_ext as jx

    monkeypatch.setattr(ssh, "route_address", lambda host: "10.1.0.1")  # (no route looked up)
    with pytest.raises(ValueError, match=re.escape("ip='10.1.0.1'")):
        jx.Cluster(engines="ssh", hosts={"node1": 2})
    with pytest.raises(ValueError, match="needs hosts"):
        jx.Cluster(engines="ssh")
    with pytest.raises(ValueError, match="hosts do not apply"):
        jx.Cluster(engines="mpi", hosts={"node1": 1})
    cluster = jx.Cluster(engines="ssh", hosts={"localhost": 2, "127.0.0.1": 1})
    assert cluster.n == 3 and not cluster.curve
    assert jx.Cluster(engines="ssh", hosts={"node1": 2}, ip="10.1.0.1").curve


def test_the_remote_command_takes_its_environment_from_stdin():
    command = ssh.remote_command("/venv/bin/python", 7, "/a folder")
    assert command.startswith("exec /bin/sh -c ")
    assert "kernel_engine.engine.register --id 7" in command
    assert "KEY" not in command  # (the key is never on a command line)
    lines = ssh.env_lines({"JUPYTER_PX_CONNECTION_INFO": '{"key": "s3cret"}', "B": "1"})
    assert lines == b'JUPYTER_PX_CONNECTION_INFO={"key": "s3cret"}\nB=1\n\n'
    with pytest.raises(ValueError):
        ssh.env_lines({"A": "two\nlines"})
    assert ssh.pid_from_output(f"$ ssh host\n{ssh.PID_MARK} 4242\nmore") == 4242
    assert ssh.pid_from_output("ssh: connect to host x: Connection refused") is None


def test_the_remote_stop_command_ends_only_the_engines_named():
    # (run by a local shell here: on a host, ssh runs the same command)
    def fake_engine(eid: int) -> subprocess.Popen[bytes]:
        code = "import time; time.sleep(60)"
        args = [sys.executable, "-c", code, "kernel_engine.engine.register", "--id", str(eid)]
        return subprocess.Popen(args, start_new_session=True)

    engine, other = fake_engine(0), fake_engine(1)
    try:
        time.sleep(0.2)
        # engine 0 by its PID; engine 1's PID given as engine 2's: not it, left alone
        command = ssh.stop_command({engine.pid: 0, other.pid: 2}, 2.0)
        started = time.monotonic()
        subprocess.run(["sh", "-c", command], timeout=10, check=True)
        assert time.monotonic() - started < 1.5
        assert engine.wait(2) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for process in (engine, other):
            process.kill()
            process.wait(5)


def test_the_launcher_refuses_bad_options_and_a_loopback_controller(tmp_path):
    cls = find("ssh")
    assert cls is ssh.SSHLauncher
    with pytest.raises(ValueError, match="needs hosts"):
        cls(LaunchContext(tmp_path, 0))
    with pytest.raises(TypeError, match="no option mpi_args"):
        cls(LaunchContext(tmp_path, 0, options={"hosts": {"a": 1}, "mpi_args": []}))
    env = {"JUPYTER_PX_CONNECTION_INFO": json.dumps({"ip": "127.0.0.1"})}
    launcher = cls(LaunchContext(tmp_path, 1, env=env, options={"hosts": {"node1": 1}}))
    with pytest.raises(LaunchError, match="loopback"):
        launcher.start()
    env = {"JUPYTER_PX_CONNECTION_INFO": json.dumps({"ip": "10.1.0.1"})}  # (no curve key)
    launcher = cls(LaunchContext(tmp_path, 1, env=env, options={"hosts": {"node1": 1}}))
    with pytest.raises(LaunchError, match="always encrypted"):
        launcher.start()
    assert launcher.sessions == {}


def test_an_ssh_that_exits_cleanly_before_its_engine_registers_fails_the_start(cluster_factory):
    # (ssh -V prints its version and exits with code 0: it connects nowhere)
    cluster = cluster_factory(
        2, engines="ssh", hosts={"localhost": 2}, ssh_args=["-V"], start_timeout=30
    )
    started = time.monotonic()
    with pytest.raises(ClusterError, match="before its engine registered") as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 15
    assert "OpenSSH" in str(info.value)  # (ssh's own words)


def test_a_host_that_hangs_fails_the_start_with_sshs_output_and_leaves_no_proxy(
    cluster_factory, tmp_path
):
    # (a ProxyCommand that never connects: ssh waits on it, the start times out, and
    # ssh, ended by SIGTERM, leaves its proxy running unless the stop ends it)
    pid_file = tmp_path / "proxy.pid"
    proxy = f"sh -c 'echo $$ >{pid_file}; echo px-hanging-host >&2; exec sleep 100'"
    cluster = cluster_factory(
        1,
        engines="ssh",
        hosts={"localhost": 1},
        ssh_args=["-o", f"ProxyCommand={proxy}"],
        start_timeout=3,
    )
    with pytest.raises(ClusterError, match="0 of 1 engines ready") as info:
        cluster.start_cluster_sync()
    assert "px-hanging-host" in str(info.value)  # (what ssh said, from its engine's log)
    pids = [int(pid_file.read_text())]
    left = wait_gone(pids, timeout=5)
    kill_pids(left)
    assert not left, f"the ProxyCommand was left running: {left}"


# ----- three hosts


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, Any]]:
    """Make the hosts, run tests/ssh_client.py on the head once (every scenario), and
    remove everything."""
    why = missing()
    if why:
        pytest.skip(why)
    hosts = SshHosts()
    try:
        hosts.start()
        script = Path(__file__).with_name("ssh_client.py")
        args = [sys.executable, str(script), HEAD_IP, A_IP, B_IP, str(hosts.config)]
        done = hosts.run_in_head(args, timeout=90)
        assert done.returncode == 0, done.stderr[-5000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out["left_under_sshd"] = hosts.under_sshd()
        yield out
    finally:
        left = hosts.stop()
        assert not left, f"processes left on the hosts: {left}"


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any]:
    got = results[name]
    assert "crashed" not in got, got.get("crashed")
    return got


def test_engines_on_two_hosts_register_and_compute(results):
    got = _scenario(results, "two_hosts")
    assert got["n"] == 2  # (the sum of the hosts' counts)
    assert got["ids"] == [0, 1]
    assert got["doubled"] == [42, 42]
    assert got["engine_ips"] == [A_IP, B_IP]  # (ids in the hosts' order)
    assert len(set(got["netns"])) == 2  # (each in its host's network)
    assert len({got["head_hostname"], *got["engine_hostnames"]}) == 3  # (and of its name)
    assert sorted(got["stdout"]) == sorted(f"hello from {p}\n" for p in got["engine_pids"])
    assert got["start_s"] < 15
    print(f"ssh: 2 engines on 2 hosts ready in {got['start_s']:.1f} s")


def test_everything_off_host_is_encrypted(results):
    got = _scenario(results, "two_hosts")
    assert got["client_ip"] == HEAD_IP
    assert got["cluster_curve"] and got["curve_serverkey"]
    assert got["engine_curve"] == [True, True]


def test_each_remote_engines_output_is_in_engine_logs(results):
    logs = _scenario(results, "two_hosts")["logs"]
    for eid in ("0", "1"):
        assert "registered with cluster" in logs[eid]
        assert ssh.PID_MARK in logs[eid]


def test_an_engine_dying_on_its_host_fails_its_task_at_once_with_the_cause(results):
    got = _scenario(results, "two_hosts")
    # (its ssh session ending tells the controller: no waiting for missed heartbeats)
    assert got["death"].startswith("EngineError"), got["death"]
    assert f"ended on {B_IP}: its ssh session exited" in got["death"]
    assert got["death_s"] < 5
    assert got["still_computes"] == 7
    print(f"ssh: an engine killed on its host failed its task in {got['death_s']:.1f} s")


def test_ctrl_c_reaches_a_task_on_a_remote_engine(results):
    got = _scenario(results, "two_hosts")
    assert "KeyboardInterrupt" in got["interrupt"], got["interrupt"]
    assert got["interrupt_s"] < 10


def test_other_signals_reach_a_remote_engine_which_sends_them_itself(results):
    got = _scenario(results, "two_hosts")
    assert got["usr1_seen"] == [int(signal.SIGUSR1)]


def test_become_dask_across_hosts_binds_each_server_to_its_engines_address(results):
    got = _scenario(results, "two_hosts")
    if got.get("dask") == "not installed":
        pytest.skip("dask.distributed is not installed (the test extra)")
    assert got["dask_scheduler"].startswith(f"tcp://{A_IP}:")
    assert [w.rsplit(":", 1)[0] for w in got["dask_workers"]] == [f"tcp://{A_IP}", f"tcp://{B_IP}"]
    assert got["dask_sum"] == 6
    assert got["dask_status"] == "closed" and got["dask_servers_left"] == [0, 0]
    print(f"ssh: become_dask, a task and stop_dask across 2 hosts in {got['dask_s']:.1f} s")


def test_stop_leaves_no_process_on_any_host(results):
    got = _scenario(results, "two_hosts")
    assert got["ssh_sessions"] == 2
    assert got["stop_s"] < 10
    assert got["left"] == []
    stopped = _scenario(results, "launcher_stop")
    assert stopped["engines_seen"] == stopped["engines_running"] == 4
    assert stopped["stop_s"] < 10 and stopped["stop_record_s"] < 10
    assert stopped["left"] == []
    assert results["left_under_sshd"] == []
    print(
        f"ssh: stop {got['stop_s']:.1f} s; by PID through ssh {stopped['stop_s']:.1f} s, "
        f"from the record {stopped['stop_record_s']:.1f} s"
    )


def test_a_host_refusing_ssh_fails_the_start_with_sshs_message(results):
    got = _scenario(results, "refused")
    assert got["error"] == "ClusterError"
    assert f"ssh: connect to host {HEAD_IP} port 22: Connection refused" in got["message"]
    assert got["took_s"] < 10
    assert got["controller_left"] == []


def test_a_bad_ssh_option_fails_the_start_with_sshs_message(results):
    got = _scenario(results, "bad_command")
    assert got["error"] == "ClusterError"
    assert "Bad configuration option: nosuchoption" in got["message"]
    assert got["took_s"] < 10


def test_loopback_or_wildcard_with_remote_hosts_says_which_address_to_use(results):
    got = results["loopback"]
    for ip in ("127.0.0.1", "default"):
        assert got[ip].startswith("ValueError: engines on 10.77.0.2, 10.77.0.3 cannot reach")
        assert f"give ip='{HEAD_IP}'" in got[ip]
    assert "every interface" in got["0.0.0.0"] and f"ip='{HEAD_IP}'" in got["0.0.0.0"]
