"""What the cluster tests share (``make cluster-test``): the reason to skip where no cluster can be
made, a cluster that comes up for a test and leaves nothing behind, and one process's losses to
compare a cluster's run with."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest

from course_utils import cluster
from course_utils.train import RunConfig, run

REASON = cluster.unavailable()
needs_cluster = pytest.mark.skipif(REASON is not None, reason=f"no cluster here: {REASON}")


def leftovers(name: str) -> list[str]:
    """What of cluster ``name`` still exists: namespaces, /etc/netns folders, its record."""
    left = cluster.existing(name)
    ours = cluster.ETC.glob(f"{name}-*") if cluster.ETC.exists() else []
    left += [str(p) for p in ours if p.name[len(name) + 1 :].startswith(("node", "switch"))]
    record = cluster.STATE / f"{name}.json"
    return left + ([str(record)] if record.exists() else [])


@contextmanager
def running(name: str, nodes: int = 2, rate: str | None = "1gbit"):
    """A cluster for one test; afterwards nothing of it is left (checked), pass or fail."""
    made = cluster.up(cluster.Cluster(name, nodes, rate))
    try:
        yield made
    finally:
        cluster.down(name)
        assert leftovers(name) == [], leftovers(name)


def single_process(**kwargs) -> dict:
    """What ``--parallel none`` reports for the same settings (in this process)."""
    return run(RunConfig(parallel="none", **kwargs), progress=False)


def host_links() -> str:
    """The host's own interfaces, to check that the cluster added none."""
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
