"""The hierarchical all-reduce across a real link (2 nodes x 2 workers under torchrun): equal to
gloo's all-reduce, and the bytes each node's link carries are the model's, B for the hierarchical
one against 1.5 B for the flat ring.

This file is also the workers' script: torchrun runs it with ``--worker OUT``, the JSON rank 0
writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_support import needs_cluster, running

from course_utils import cluster, collectives, launch, slow_link, topology
from course_utils.cluster import torchrun

ROOT = Path(__file__).resolve().parents[2]
NAME = "slowlessonhier"
PER_NODE = 2
NUMEL = 2**20 + 3  # 4 MB of float32, not divisible by the ranks of a node


def worker(out: str) -> None:
    """On each rank: the hierarchical sum against gloo's, and the bytes each method sent."""
    with launch.process_group("cpu", 60) as me:
        groups = topology.node_groups(PER_NODE)
        x, diff = slow_link.hierarchical_check(groups, NUMEL)
        sent = {
            "hierarchical": slow_link.link_sent(
                lambda t: topology.hierarchical_all_reduce(t, groups), x, PER_NODE
            ),
            "flat": slow_link.link_sent(collectives.ring_all_reduce, x, PER_NODE),
        }
        if me.is_main:
            Path(out).write_text(json.dumps({"max_diff": diff, "sent": sent}))


@pytest.fixture
def measured(tmp_path):
    out = tmp_path / "measured.json"
    with running(NAME, 2, "1gbit") as made:
        agents = []
        for node in range(2):
            argv = [str(torchrun.TORCHRUN), "--nnodes", "2", "--nproc-per-node", str(PER_NODE)]
            argv += ["--node-rank", str(node), "--master-addr", made.address(0)]
            argv += ["--master-port", str(torchrun.PORT), __file__, "--worker", str(out)]
            log = open(tmp_path / f"node{node}.log", "wb")
            agents.append(
                cluster.spawn(made, node, argv, cwd=ROOT, env=torchrun.environment(),
                              stdout=log, stderr=subprocess.STDOUT)
            )  # fmt: skip
            log.close()
        try:
            codes = [agent.wait(timeout=120) for agent in agents]
        finally:
            for agent in agents:
                agent.kill()
        assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    return json.loads(out.read_text())


@needs_cluster
def test_hierarchical_all_reduce_across_nodes_sends_the_models_bytes(measured):
    assert measured["max_diff"] < 1e-5  # sums of 4 float32 numbers, in another order
    nbytes = NUMEL * 4
    for method, sent in measured["sent"].items():
        model = topology.TwoLinks.link_bytes(method, nbytes, 2, PER_NODE)
        for node_sent in sent:  # the payload, plus a few percent of headers
            assert model <= node_sent <= 1.1 * model, (method, node_sent, model)
    flat, hierarchical = (sum(measured["sent"][m]) for m in ("flat", "hierarchical"))
    assert flat / hierarchical == pytest.approx(1.5, rel=0.05)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
