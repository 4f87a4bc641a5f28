"""Engines in a Slurm batch job, on a real one-node Slurm (daemons started once for the
module, stopped by PID): SLURM_JOB_ID on the engines, the walltime given to Slurm, stop
leaves no job, a bad sbatch argument raises with sbatch's message, engines that start
late join once the start returned at a minimum."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from slurm_support import SlurmNode, missing

from kernel_engine.errors import ClusterError

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmNode]:
    node = SlurmNode()
    node.start()
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(node.env)  # (sbatch, squeue and scancel in the controller find it)
    try:
        yield node
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        node.stop()


def job_field(node: SlurmNode, job: str, name: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, **node.env},
    ).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get(name, "")


def test_two_engines_in_one_job_and_stop_leaves_no_job(slurm, cluster_factory):
    started = time.monotonic()
    cluster, rc = cluster_factory.start(2, engines="slurm", slurm_args=["--time=10"])
    took = time.monotonic() - started
    assert rc.ids == [0, 1]
    jobs = rc[:].apply_sync(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
    assert jobs[0] and jobs[0] == jobs[1]
    assert slurm.jobs() == [f"{jobs[0]} RUNNING"]
    assert job_field(slurm, jobs[0], "TimeLimit") == "00:10:00"  # (the walltime asked for)
    assert sorted(rc[:].apply_sync(lambda: int(__import__("os").environ["SLURM_PROCID"]))) == [
        0,
        1,
    ]
    started = time.monotonic()
    cluster.stop_cluster_sync()
    stop_took = time.monotonic() - started
    assert stop_took < 10
    assert slurm.jobs() == []
    logs = cluster.engine_logs()
    assert "registered with cluster" in logs[0] and "registered with cluster" in logs[1]
    print(f"slurm: 2 engines ready in {took:.1f} s, stopped in {stop_took:.1f} s")


def test_a_bad_sbatch_argument_raises_with_sbatchs_message(slurm, cluster_factory):
    cluster = cluster_factory(2, engines="slurm", slurm_args=["--time=10", "--no-such-option"])
    started = time.monotonic()
    with pytest.raises(ClusterError, match="sbatch") as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 15
    assert "unrecognized option '--no-such-option'" in str(info.value)  # (sbatch's words)
    assert slurm.jobs() == []


def test_a_queued_job_is_no_failure_and_its_engines_join_when_it_runs(slurm, cluster_factory):
    # the job waits in the queue (--begin); the start returns at the minimum asked for
    cluster = cluster_factory(
        2, engines="slurm", slurm_args=["--time=10", "--begin=now+2"], min_engines=1
    )
    started = time.monotonic()
    rc = cluster.start_and_connect_sync()
    assert time.monotonic() - started >= 1.5  # (it did wait in the queue)
    assert len(rc.ids) >= 1
    rc.wait_for_engines(2, timeout=30)
    assert rc.ids == [0, 1]
    cluster_factory.record(cluster, rc)
    cluster.stop_cluster_sync()
    assert slurm.jobs() == []


def test_a_start_that_times_out_on_a_queued_job_says_why_it_waits(slurm, cluster_factory):
    # (the job waits for its begin time, long after start_timeout: the message must say
    # so, in Slurm's words, not only that no engine came)
    cluster = cluster_factory(
        2, engines="slurm", slurm_args=["--time=10", "--begin=now+600"], start_timeout=4
    )
    started = time.monotonic()
    with pytest.raises(ClusterError, match="0 of 2 engines ready") as info:
        cluster.start_cluster_sync()
    assert time.monotonic() - started < 15
    message = str(info.value)
    assert "PENDING" in message and "BeginTime" in message
    assert slurm.jobs() == []  # (the failed start cancelled it)
    assert "PENDING (BeginTime)" in cluster.engine_logs()["slurm-engines-0"]
