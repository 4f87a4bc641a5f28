"""Quickstart: start a local cluster, use it, stop it (what `make demo` runs)."""

import os
import time

import numpy as np

import jupyter_ext as jx

t0 = time.monotonic()
with jx.Cluster(n=2) as rc:
    print(f"{len(rc)} engines ready in {time.monotonic() - t0:.1f} s: {rc.ids}")

    dview = rc[:]
    print("engine pids:", dview.apply_sync(os.getpid))

    dview.scatter("chunk", np.arange(1_000_000, dtype=float), block=True)
    partial = dview.apply_sync(jx.interactive(lambda: float(chunk.sum())))  # noqa: F821
    print("sum of 0..999999 computed in parallel:", sum(partial))

    dview["greeting"] = "hello from the notebook"
    ar = dview.execute("print(greeting.upper())", block=True)
    print("engine output:", ar.stdout)

    squares = dview.map_sync(lambda x: x * x, range(10))
    print("static map:", squares)

    ar = rc[0].apply_async(time.sleep, 0.2)
    ar.get()
    print(
        f"one task: ran {ar.serial_time:.2f} s on engine {ar.engine_id}, "
        f"round trip {ar.wall_time:.2f} s"
    )
print("cluster stopped")
