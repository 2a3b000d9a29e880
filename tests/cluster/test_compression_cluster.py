"""Gradient compression across the cluster (``make cluster-test``): DDP under torchrun on two
nodes with PowerSGD sends a fraction of plain DDP's bytes over the link, and still learns."""

import json

from cluster_support import needs_cluster, running

from course_utils import cluster, compression, models
from course_utils.cluster import torchrun

STEPS = 12
PLAIN_STEPS = 2  # PowerSGD all-reduces its first steps whole (compression.PowerSGD)


def across(made, tmp_path, compress: str, steps: int) -> tuple[dict, list[int]]:
    """One static torchrun job, 1 CNN worker per node: rank 0's JSON and the bytes each node sent."""
    out = tmp_path / f"{compress}-{steps}.json"
    args = ["--model", "cnn", "--parallel", "ddp", "--compress", compress, "--batch-size", "32"]
    args += ["--steps", str(steps), "--threads", "1", "--json", str(out)]
    before = [cluster.link_bytes(made, node)["sent"] for node in range(2)]
    job = torchrun.job(made, args, logs=tmp_path / f"logs-{compress}-{steps}")
    try:
        codes = torchrun.finish(job, 120)
    finally:
        job.stop()
    assert codes == {0: 0, 1: 0}, job.log(0)[-2000:]
    sent = [cluster.link_bytes(made, node)["sent"] - b for node, b in enumerate(before)]
    return json.loads(out.read_text()), sent


@needs_cluster
def test_powersgd_across_the_link_sends_a_fraction_of_the_bytes_and_learns(tmp_path):
    shapes = [p.shape for p in models.build("cnn").parameters()]
    plain, low_rank = (compression.payload_bytes(c, shapes) for c in ("none", "powersgd:1"))
    with running("comptest", 2, "1gbit") as made:
        sent = {}
        for compress in ("none", "powersgd:1"):
            result, sent[compress] = across(made, tmp_path, compress, STEPS)
            losses = result["losses"]
            assert sum(losses[-3:]) < sum(losses[:3]), (compress, losses)
    for node in range(2):  # start-up (DDP's first broadcast, the rendezvous) is the same in both
        start_up = sent["none"][node] - STEPS * plain
        assert 0 < start_up < 2 * plain, sent  # every gradient byte crossed, and little else
        expected = start_up + PLAIN_STEPS * plain + (STEPS - PLAIN_STEPS) * low_rank
        assert expected <= sent["powersgd:1"][node] < 1.25 * expected, (sent, expected)
        assert sent["powersgd:1"][node] < sent["none"][node] / 2
