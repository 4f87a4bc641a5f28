"""Where clusters live: ``<jupyter runtime dir>/px/<cluster id>/``."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_runtime_dir


def clusters_dir() -> Path:
    """The folder holding one folder per cluster."""
    return Path(jupyter_runtime_dir()) / "px"


def cluster_folder(cluster_id: str) -> Path:
    return clusters_dir() / cluster_id


def find_connection_file(spec: str | os.PathLike[str] | None = None) -> Path:
    """The client connection file for ``spec``: a path, a cluster id, or None (newest)."""
    if spec is not None:
        path = Path(spec)
        if path.is_file():
            return path
        if path.is_dir() and (path / "client.json").is_file():
            return path / "client.json"
        by_id = cluster_folder(str(spec)) / "client.json"
        if by_id.is_file():
            return by_id
        raise FileNotFoundError(f"no cluster connection file at {spec!r} (nor cluster id)")
    found = sorted(clusters_dir().glob("*/client.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no running cluster found in {clusters_dir()}; start one with "
            "jupyter_ext.Cluster(n=...) or `jupyter px start -n N`"
        )
    return found[-1]
