"""The two-link model against its derivation (and the ring's own schedule), the hierarchical
all-reduce against dist.all_reduce on 4 workers that play 2 nodes of 2 (and 4 x 1, 1 x 4), the
timed all-reduces, and the fit of both links."""

import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from course_utils import collectives, launch, topology
from course_utils.collectives import AlphaBeta
from course_utils.topology import TwoLinks

SHAPES = [(1,), (7,), (1001,), (5, 13), (2**15 + 3,)]  # none divisible by 2 or 4 but by chance
LAYOUTS = [2, 1, 4]  # ranks per node, on 4 workers
LINKS = TwoLinks(intra=AlphaBeta(50e-6, 1e9, 2), inter=AlphaBeta(100e-6, 12.5e6, 2))
MB16 = 16 * 2**20


def compare(per_node: int, seed: int) -> dict:
    """On each rank: the groups' members, and random tensors summed both ways."""
    rank = dist.get_rank()
    groups = topology.node_groups(per_node)
    members = [dist.get_process_group_ranks(g) for g in (groups.intra, groups.inter)]
    cases = []
    for dtype in (torch.float32, torch.float64):
        for i, shape in enumerate(SHAPES):
            g = torch.Generator().manual_seed(seed + 1000 * rank + i)  # different on each rank
            x = torch.randn(shape, generator=g, dtype=dtype)
            mine, builtin = x.clone(), x.clone()
            returned = topology.hierarchical_all_reduce(mine, groups)
            dist.all_reduce(builtin)
            cases.append((x, mine, builtin, returned is mine))
    view = (torch.arange(12.0).reshape(3, 4) * (rank + 1)).T  # not contiguous: summed in place
    topology.hierarchical_all_reduce(view, groups)
    return {"members": members, "cases": cases, "view": view, "nodes": groups.nodes}


def calls_and_timings() -> dict:
    """What each timed all-reduce sums (on ones), the timings, and the links' rows."""
    groups = topology.node_groups(2)
    sums = {}
    for name, call in topology.all_reduces(groups).items():
        ones = torch.ones(11)
        call(ones)
        sums[name] = ones
    rows = topology.timed(topology.all_reduces(groups), [4096, 65536], repeats=2)
    links = topology.time_links([1024, 16384, 262144], per_node=2, repeats=2)
    return {"sums": sums, "rows": rows, "links": links}


def worker(seed: int) -> dict:
    return {"layouts": [compare(p, seed) for p in LAYOUTS], "timed": calls_and_timings()}


@pytest.fixture(scope="module")
def results():
    with warnings.catch_warnings():  # 4 workers on 2 cores take turns: slow, still exact
        warnings.filterwarnings("ignore", "4 workers on")
        return launch.run(worker, 4, 11, timeout=180, threads=1)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_hierarchical_all_reduce_equals_dist_all_reduce(results, layout):
    per_node = LAYOUTS[layout]
    found = [r["layouts"][layout] for r in results]
    for rank, r in enumerate(found):
        node = rank // per_node
        assert r["nodes"] == 4 // per_node
        assert r["members"][0] == list(range(node * per_node, (node + 1) * per_node))
        assert r["members"][1] == list(range(rank % per_node, 4, per_node))
        for i, (x, mine, builtin, in_place) in enumerate(r["cases"]):
            assert in_place and mine.shape == x.shape and mine.dtype == x.dtype
            torch.testing.assert_close(mine, builtin)
            expected = sum(f["cases"][i][0] for f in found)  # not just "agrees with gloo"
            torch.testing.assert_close(mine, expected)
        torch.testing.assert_close(r["view"], (torch.arange(12.0).reshape(3, 4) * 10).T)


def test_timed_all_reduces_sum_what_they_say_and_agree_across_ranks(results):
    for r in results:
        sums = r["timed"]["sums"]
        for name in ("gloo", "ring", "hierarchical"):
            torch.testing.assert_close(sums[name], torch.full((11,), 4.0))
        # the mesh's dp all-reduce: this rank's half (6 of 11) over the 2 nodes, the rest untouched
        torch.testing.assert_close(sums["mesh"], torch.tensor([2.0] * 6 + [1.0] * 5))
    rows, links = results[0]["timed"]["rows"], results[0]["timed"]["links"]
    assert [(row["op"], row["bytes"]) for row in rows] == [
        (op, size) for op in ("gloo", "ring", "hierarchical", "mesh") for size in (4096, 65536)
    ]
    assert [row["op"] for row in links] == ["intra"] * 3 + ["inter"] * 3
    for row in rows + links:
        assert len(row["samples"]) == 2 and row["min_seconds"] > 0
        assert row["min_seconds"] <= row["seconds"] <= max(row["samples"])
    assert all(r["timed"]["rows"] == rows for r in results)  # the slowest rank's, everywhere
    fitted = topology.fit_two_links(links)
    assert fitted.intra.alpha_s >= 0 and fitted.inter.beta_bytes_per_s > 0


def cross_node_sends(nodes: int, per_node: int) -> list[int]:
    """Chunks the ring's schedule sends out of each node, counted from the schedule itself."""
    out = [0] * nodes
    for step in collectives.ring_schedule(nodes * per_node):
        for src, dst, _ in step["sends"]:
            if src // per_node != dst // per_node:
                out[src // per_node] += 1
    return out


@pytest.mark.parametrize("nodes,per_node", [(2, 2), (2, 4), (4, 2), (3, 2), (2, 1)])
def test_link_bytes_match_the_rings_schedule(nodes, per_node):
    n, nbytes = nodes * per_node, 1200.0
    for sends in cross_node_sends(nodes, per_node):
        assert sends * nbytes / n == pytest.approx(
            TwoLinks.link_bytes("flat", nbytes, nodes, per_node)
        )
    # hierarchical: per_node rings of the nodes, each on a shard of nbytes / per_node
    rings = per_node * cross_node_sends(nodes, 1)[0] * (nbytes / per_node) / nodes
    assert TwoLinks.link_bytes("hierarchical", nbytes, nodes, per_node) == pytest.approx(rings)
    assert TwoLinks.link_bytes("mesh", nbytes, nodes, per_node) == pytest.approx(rings)
    assert TwoLinks.link_bytes("mesh", nbytes, nodes, per_node, dp_across=False) == 0


def test_one_kind_of_link_gives_lesson_04s_ring():
    b = np.array([1e3, 1e6, MB16])
    intra, inter = LINKS.intra, LINKS.inter
    ring = collectives.ring_cost
    np.testing.assert_allclose(
        LINKS.flat(b, 1, 4), ring(b, 4, intra.alpha_s, intra.beta_bytes_per_s)
    )
    np.testing.assert_allclose(
        LINKS.flat(b, 4, 1), ring(b, 4, inter.alpha_s, inter.beta_bytes_per_s)
    )
    np.testing.assert_allclose(LINKS.hierarchical(b, 4, 1), LINKS.flat(b, 4, 1))
    np.testing.assert_allclose(LINKS.hierarchical(b, 1, 4), LINKS.flat(b, 1, 4))
    # the mesh with dp inside the node: a ring of the node's ranks on 1/nodes of the bytes
    np.testing.assert_allclose(
        LINKS.mesh(b, 2, 2, dp_across=False), ring(b / 2, 2, intra.alpha_s, intra.beta_bytes_per_s)
    )


def test_hierarchical_is_the_mesh_plus_the_intra_node_phases():
    b = np.array([1e4, MB16])
    inside = 2 * (2 - 1) * (LINKS.intra.alpha_s + b / 2 / LINKS.intra.beta_bytes_per_s)
    np.testing.assert_allclose(LINKS.inside(b, 2, 2), inside)
    np.testing.assert_allclose(LINKS.hierarchical(b, 2, 2) - LINKS.mesh(b, 2, 2), inside)
    np.testing.assert_allclose(LINKS.inside(b, 4, 1), 0)
    np.testing.assert_allclose(LINKS.predict("mesh", b, 2, 2), LINKS.mesh(b, 2, 2))
    with pytest.raises(ValueError, match="unknown method"):
        LINKS.predict("tree", b, 2, 2)


def test_flat_over_hierarchical_is_bounded_by_the_link_bytes():
    assert TwoLinks.ratio_bound(2, 2) == pytest.approx(1.5)
    assert TwoLinks.ratio_bound(2, 4) == pytest.approx(1.75)
    assert TwoLinks.ratio_bound(4, 2) == pytest.approx(7 / 6)
    free = TwoLinks(intra=AlphaBeta(0.0, 1e30, 2), inter=AlphaBeta(0.0, 12.5e6, 2))
    for nodes, per_node in [(2, 2), (2, 4), (4, 2)]:
        bound = TwoLinks.ratio_bound(nodes, per_node)
        # a free inside and no latency: exactly the bound; a real inside: below it
        ratio = free.flat(MB16, nodes, per_node) / free.hierarchical(MB16, nodes, per_node)
        assert ratio == pytest.approx(bound)
        assert LINKS.flat(MB16, nodes, per_node) / LINKS.hierarchical(MB16, nodes, per_node) < bound


def test_fit_two_links_recovers_both_links():
    sizes = [2**k for k in range(10, 25, 2)]
    rows = [
        {"op": op, "bytes": s, "seconds": 2 * link.alpha_s + s / link.beta_bytes_per_s}
        for op, link in (("intra", LINKS.intra), ("inter", LINKS.inter))
        for s in sizes
    ]
    fitted = topology.fit_two_links(rows)
    for got, want in ((fitted.intra, LINKS.intra), (fitted.inter, LINKS.inter)):
        assert got.alpha_s == pytest.approx(want.alpha_s, rel=1e-6)
        assert got.beta_bytes_per_s == pytest.approx(want.beta_bytes_per_s, rel=1e-6)
    with pytest.raises(ValueError, match="inter link"):
        topology.fit_two_links(rows[: len(sizes) + 1])
