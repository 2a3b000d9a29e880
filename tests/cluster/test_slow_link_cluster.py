"""Lesson 15's link probe on a real cluster (``make cluster-test``): 2 nodes x 2 workers under
torchrun, on a 100 Mbit/s link. The hierarchical all-reduce equals gloo's, each method puts the
model's bytes on the link, the fitted link across is the rate, and the hierarchical all-reduce is
faster than the flat one there."""

import pytest
from cluster_support import needs_cluster, running

from course_utils import cluster, many_machines, topology
from course_utils import slow_link as sl

RATE = "100mbit"
SIZES = [2**20, 2**21]


@needs_cluster
def test_the_link_probe_measures_the_two_link_model_across_the_cluster(tmp_path):
    with running(f"{sl.NAME}test", 2, RATE) as made:
        probe = sl.link_probe(made, tmp_path, SIZES, repeats=1, timeout=180)
    assert probe["max_diff"] < 1e-5  # sums of 4 float32 numbers, in another order
    nbytes = 4 * probe["sent_numel"]
    for op, method in (("gloo", "flat"), ("hierarchical", "hierarchical"), ("mesh", "mesh")):
        model = topology.TwoLinks.link_bytes(method, nbytes, 2, sl.PER_NODE)
        for sent in probe["sent"][op]:  # the payload, plus a few percent of headers
            assert model <= sent <= 1.1 * model, (op, sent, model)
    rate = cluster.rate_bytes(RATE) / many_machines.WIRE
    assert probe["model"].inter.beta_bytes_per_s == pytest.approx(rate, rel=0.25)
    at = {r["op"]: r["seconds"] for r in probe["timings"] if r["bytes"] == max(SIZES)}
    assert at["gloo"] > 1.15 * at["hierarchical"], at  # the link rules: 1.5 B against B on it
