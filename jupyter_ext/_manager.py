"""ClusterManager: the clusters of this machine, as IPython Parallel's registry of them."""

from __future__ import annotations

from typing import Any

from kernel_engine import clusters

from ._cluster import Cluster


class ClusterManager:
    """Running clusters by id, and new ones.

    ``load_clusters()`` finds the running clusters (their folders under the Jupyter
    runtime dir); ``new_cluster(**kwargs)`` makes a Cluster (not started; returns its key and it);
    ``remove_cluster(id)`` stops one and forgets it.
    """

    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}

    def load_clusters(
        self,
        *,
        profile_dirs: list[str] | None = None,
        profile_dir: str | None = None,
        profiles: list[str] | None = None,
        profile: str | None = None,
        init_default_clusters: bool = False,
    ) -> dict[str, Cluster]:
        """Add the running clusters not known yet; returns every known cluster.

        The keywords are IPython Parallel's, accepted for its code: clusters here are
        found by id in the Jupyter runtime dir, not in IPython profiles, so every running
        cluster is loaded whatever profile they name, and no stopped default cluster is
        made for ``init_default_clusters``."""
        if not isinstance(init_default_clusters, bool):
            raise TypeError(
                f"init_default_clusters must be True or False, not {init_default_clusters!r}"
            )
        for state in clusters.list_clusters():
            if state.cluster_id not in self.clusters:
                # by its folder: an id is also read as a path, relative to this process's
                # working folder, where a file of that name may be
                self.clusters[state.cluster_id] = Cluster.from_file(state.folder)
        return self.clusters

    def new_cluster(self, **kwargs: Any) -> tuple[str, Cluster]:
        """A new Cluster (start it with ``start_cluster``) and its key here, as IPython
        Parallel's: ``key, cluster = manager.new_cluster(n=2)``."""
        cluster = Cluster(**kwargs)
        self.clusters[cluster.cluster_id] = cluster
        return cluster.cluster_id, cluster

    def get_cluster(self, cluster_id: str) -> Cluster:
        """A known cluster; KeyError names the ones there are."""
        try:
            return self.clusters[cluster_id]
        except KeyError:
            raise KeyError(f"no cluster {cluster_id!r}; known: {sorted(self.clusters)}") from None

    def remove_cluster(self, cluster_id: str) -> Cluster:
        """Stop a cluster (if it runs) and forget it; returns it."""
        cluster = self.get_cluster(cluster_id)
        if cluster.running:
            cluster.stop_cluster_sync()
        return self.clusters.pop(cluster_id)
