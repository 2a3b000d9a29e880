"""Lesson 15's probes on a real cluster (``make cluster-test``), 2 nodes x 2 workers under
torchrun. On a 100 Mbit/s link: the hierarchical all-reduce equals gloo's, each method puts the
model's bytes on the link, the fitted link across is the rate, and the hierarchical all-reduce is
faster than the flat one there. The transformer placed as FSDP over all ranks and as HSDP: each
puts its collectives' bytes on the link, and both train alike."""

import pytest
from cluster_support import needs_cluster, running

from course_utils import cluster, many_machines, topology
from course_utils import slow_link as sl

RATE = "100mbit"
SIZES = [2**20, 2**21]


@needs_cluster
def test_the_link_probe_measures_the_two_link_model_across_the_cluster(tmp_path):
    with running("slowlessonprobe", 2, RATE) as made:
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


@needs_cluster
def test_fsdp_and_hsdp_put_their_collectives_bytes_on_the_link_and_train_alike(tmp_path):
    steps = 3
    flags = {"fsdp": ["--parallel", "fsdp"], "hsdp": ["--parallel", "fsdp", "--replicate", "2"]}
    with running("slowlessonplace", 2, None) as made:  # no limit: the bytes are the point
        runs = sl.placement_sweep(made, tmp_path, flags, steps, batch_size=16)
    for layout, run in runs.items():
        model = sl.placement_bytes(layout) * steps
        for sent in run["sent"]:  # the collectives, their headers and a little of start-up
            assert model <= sent <= 1.08 * model, (layout, sent, model)
    assert runs["hsdp"]["result"]["mesh"]["replicate"] == 2  # (replicate, shard): 2 x 2
    fsdp, hsdp = (runs[k]["result"]["losses"] for k in ("fsdp", "hsdp"))
    assert hsdp == pytest.approx(fsdp, rel=1e-5)  # the same arithmetic, summed in another order
