"""Lesson 15 (across a slow link) without a cluster: the decision guide's arithmetic against hand
calculation, each measured layout's bytes on the link by its collectives, FSDP's bytes under
--precision bf16 against their definition (with the bytes held, the losses and the accuracy), the
compression predictions, the fit's guard, the figures drawn from made-up data, the lesson's
hand-written pieces against their definitions and the package, and the whole lesson run where no
cluster can be made. The probes on a real cluster are in
``tests/cluster/test_slow_link_cluster.py``."""

import math
import multiprocessing
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, lesson_without_a_cluster, notebook_functions

import course_utils as cu
from course_utils import (
    compression,
    fsdp_precision,
    launch,
    many_machines,
    models,
    topology,
)
from course_utils import slow_link as sl
from course_utils.collectives import AlphaBeta

NOTEBOOK = ROOT / "notebooks" / "15_across_a_slow_link.ipynb"
B = 1_000_000  # a made-up gradient, bytes
# beta 1 byte/s inside, 0.1 across, no latency: seconds are bytes over beta, easy to check by hand
LINKS = topology.TwoLinks(intra=AlphaBeta(0.0, 1.0, 2), inter=AlphaBeta(0.0, 0.1, 2))


# --- the decision guide ---------------------------------------------------------------------


def test_tensor_parallel_all_reduces_the_activations_four_times_a_layer():
    assert sl.tp_bytes(layers=2, tokens=10, hidden=3) == 4 * 2 * 10 * 3 * 4
    assert sl.tp_bytes(1, 1, 1, bytes_per_value=2) == 8


def test_each_layout_costs_what_its_collectives_cost_by_hand():
    tp = 8 * B
    rows = {r["layout"]: r for r in sl.layouts(LINKS, B, tp, nodes=2, per_node=2)}
    flat = rows["DDP, flat ring over all ranks"]  # 6 steps of B/4 across
    assert (flat["inside"], flat["across"]) == (0.0, pytest.approx(6 * B / 4 / 0.1))
    assert flat["link_bytes"] == 1.5 * B and flat["held"] == B
    hier = rows["DDP, hierarchical all-reduce"]  # 2 steps of B/2 inside, 2 of B/2 across
    assert hier["inside"] == pytest.approx(B) and hier["across"] == pytest.approx(B / 0.1)
    assert hier["link_bytes"] == B
    fsdp = rows["FSDP over all ranks"]  # two all-gathers and a reduce-scatter: 1.5 flat rings
    assert fsdp["across"] == pytest.approx(1.5 * flat["across"]) and fsdp["held"] == B / 4
    hsdp = rows["HSDP: shard inside, replicate across"]
    assert hsdp["inside"] == pytest.approx(1.5 * B) and hsdp["across"] == hier["across"]
    assert hsdp["held"] == B / 2 and hsdp["link_bytes"] == B
    tp_in = rows["TP inside, DDP across"]  # each node's tp group all-reduces tp / 2 over 2 ranks
    assert tp_in["inside"] == pytest.approx(tp / 2) and tp_in["across"] == hier["across"]
    tp_out = rows["TP across, DDP inside"]  # 2 rings of tp / 2 share the link, 2 steps of tp / 2
    assert tp_out["across"] == pytest.approx(tp / 0.1) and tp_out["link_bytes"] == tp
    assert tp_out["inside"] == pytest.approx(B / 2)  # dp inside: 2 steps of (B/2)/2


def test_on_a_slow_link_the_guide_keeps_tensor_parallel_inside_and_prefers_hsdp_to_fsdp():
    rows = sl.layouts(LINKS, B, 20 * B, nodes=2, per_node=4)
    order = [r["layout"] for r in rows]
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    assert order[-1] == "TP across, DDP inside"
    assert order.index("HSDP: shard inside, replicate across") < order.index("FSDP over all ranks")
    assert order.index("DDP, hierarchical all-reduce") < order.index(
        "DDP, flat ring over all ranks"
    )


# --- compression, predicted -----------------------------------------------------------------


def test_a_hook_pays_below_the_rate_where_its_saved_bytes_take_its_overhead():
    rate = sl.break_even_rate(1e6, 0.01)
    assert rate == pytest.approx(many_machines.WIRE * 1e8)
    assert many_machines.WIRE * 1e6 / rate == pytest.approx(0.01)  # saved time = overhead there
    assert sl.break_even_rate(1e6, 0.0) == math.inf and sl.break_even_rate(1e6, -0.01) == math.inf
    assert sl.break_even_rate(0.0, 0.01) == 0.0


def test_a_runs_predicted_bytes_count_powersgds_plain_first_steps():
    full, small = sl.payload("none"), sl.payload("powersgd:2")
    assert full == many_machines.gradient_bytes("cnn") and small < full / 5
    assert sl.predicted_sent("none", 10) == pytest.approx(many_machines.WIRE * 10 * full)
    powersgd = many_machines.WIRE * (2 * full + 8 * small)
    assert sl.predicted_sent("powersgd:2", 10) == pytest.approx(powersgd)
    assert sl.predicted_sent("bf16", 4) == pytest.approx(many_machines.WIRE * 4 * full / 2)


# --- the fit ----------------------------------------------------------------------------------


def rows_of(op, points):
    return [{"op": op, "bytes": b, "seconds": t, "samples": [t]} for b, t in points]


def test_a_fit_that_puts_all_the_time_into_alpha_is_read_as_a_bandwidth():
    inter = rows_of("inter", [(1e6, 2e-3 + 1e6 / 1e7), (4e6, 2e-3 + 4e6 / 1e7)])
    noisy = rows_of("intra", [(1e6, 0.012), (4e6, 0.011)])  # the larger size came out faster
    links = sl.fit_links(inter + noisy)
    assert links.intra == AlphaBeta(0.0, 4e6 / 0.011, 2)
    assert links.inter.beta_bytes_per_s == pytest.approx(1e7, rel=1e-6)  # a sane fit is kept
    assert links.inter.alpha_s == pytest.approx(1e-3, rel=1e-6)


# --- placement, measured: the model ---------------------------------------------------------


def test_each_layouts_link_bytes_are_its_collectives_by_hand():
    model = models.build("transformer")
    whole = 4 * sum(p.numel() for p in model.parameters())
    blocks = 4 * sum(p.numel() for p in model.blocks.parameters())
    root = whole - blocks  # embedding, positions, norm, head: gathered once a step
    assert sl.placement_bytes("ddp") == pytest.approx(1.5 * whole)  # a ring of 4 over 2 nodes
    assert sl.placement_bytes("hsdp") == pytest.approx(whole)  # shards' all-reduce across
    # gloo: 2 gathers (half a ring each) and a reduce-scatter that is a whole all-reduce
    assert sl.placement_bytes("fsdp") == pytest.approx(1.5 * (2 * blocks + 1.5 * root))
    nccl = sl.placement_bytes("fsdp", gloo=False)  # a reduce-scatter half an all-reduce
    assert nccl == pytest.approx(1.5 * (1.5 * blocks + root))
    assert sl.placement_bytes("fsdp") / sl.placement_bytes("hsdp") > 2.9  # about 3x here
    assert sl.placement_bytes("ddp", nodes=1) == 0.0  # nothing crosses on one node
    with pytest.raises(ValueError, match="unknown layout"):
        sl.placement_bytes("tp")


def test_the_layouts_the_lesson_runs_are_named_as_the_guide_names_them():
    rows = {r["layout"]: r for r in sl.layouts(LINKS, B, 0.0, 2, 2)}
    assert set(sl.GUIDE.values()) <= set(rows)
    shares = {k: rows[name]["held"] / B for k, name in sl.GUIDE.items()}
    assert shares == {"ddp": 1.0, "fsdp": 0.25, "hsdp": 0.5}


# --- precision on the wire and in memory ----------------------------------------------------


def test_fsdps_collectives_are_defined_by_its_padded_shards_and_the_policys_dtypes():
    model = models.build("transformer")

    def shard(module, n):  # rows padded to a multiple of n, a rank keeps ceil(rows / n)
        return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) if p.dim() else 1
                   for p in module.parameters())  # fmt: skip

    for n in (2, 4):
        forward_and_backward = shard(model, n) + shard(model.blocks, n)
        assert fsdp_precision.handed("fp32", n) == {
            "all-gather float32": 4 * forward_and_backward,
            "reduce-scatter float32": 4 * n * shard(model, n),
        }
        assert fsdp_precision.handed("bf16", n) == {
            "all-gather bfloat16": 2 * forward_and_backward,
            "reduce-scatter float32": 4 * n * shard(model, n),
        }


def test_bf16_halves_what_fsdp_gathers_and_nothing_it_reduces_or_holds_between_steps():
    runs = launch.run(fsdp_precision.measure, 2, 2, 32, 100, timeout=300)[0]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    for kind, run in runs.items():
        assert run["handed"] == fsdp_precision.handed(kind, 2)  # every byte, every step
    assert bf16["handed"]["all-gather bfloat16"] == fp32["handed"]["all-gather float32"] / 2
    assert bf16["held"] == fp32["held"] and bf16["peak"] < fp32["peak"]
    assert bf16["losses"] != fp32["losses"]  # the policy changed the arithmetic...
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2**-8)  # ...within a rounding
    assert 0 <= bf16["accuracy"] <= 1 and 0 <= fp32["accuracy"] <= 1


def test_the_counter_restores_the_collectives_it_wraps():
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single
    with fsdp_precision._counted() as counts:
        assert dist.all_gather_single is not gather
    assert (dist.all_gather_single, dist.reduce_scatter_single) == (gather, scatter)
    assert counts == {}


# --- the figures ----------------------------------------------------------------------------


def test_the_figures_draw_measured_points_and_model_lines_or_predictions_alone():
    sizes = [2**20, 2**22]
    rows = rows_of("intra", [(s, s / 2e8) for s in sizes]) + rows_of(
        "inter", [(s, s / 1e7) for s in sizes]
    )
    (ax,) = cu.plots.two_links(rows, LINKS, sizes).axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("measured" in t for t in labels) == 2 and sum("model" in t for t in labels) == 2
    assert "predictions" in cu.plots.two_links(None, LINKS, sizes).axes[0].get_title()
    timed = [
        {"op": op, "bytes": s, "seconds": 1e-7 * s, "samples": [1e-7 * s]}
        for op in ("gloo", "hierarchical")
        for s in sizes
    ]
    (ax,) = cu.plots.all_reduce_sizes(timed, LINKS, sizes, 2, 2).axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) >= {"gloo, measured", "model: flat", "model: hierarchical"}
    rows = sl.layouts(LINKS, B, 8 * B, 2, 2)
    (ax,) = cu.plots.layout_times(rows).axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["layout"] for r in rows]
    assert len(ax.patches) == 2 * len(rows)  # inside and across, stacked


def test_the_compression_figure_shows_bytes_and_steps_per_hook():
    hooks, steps = ["none", "powersgd:2"], 10
    predicted = {"bytes": {h: 1e5 for h in hooks}, "10mbit": {h: 0.2 for h in hooks}}
    runs = {"10mbit": {h: {"sent": [2e6, 1e6], "step_s": 0.25} for h in hooks}}
    left, right = cu.plots.compression_runs(runs, predicted, steps).axes
    assert [round(p.get_height()) for p in left.patches] == [100, 100]  # kB per step, node 1
    assert [round(p.get_height()) for p in right.patches] == [250, 250]
    left, right = cu.plots.compression_runs(None, predicted, steps).axes
    assert not left.patches and not right.patches


def test_the_placement_figure_shows_bytes_and_steps_per_layout_or_the_model_alone():
    model = {"bytes": {"fsdp": 3e6, "hsdp": 1e6}, "nccl": {"fsdp": 2e6, "hsdp": 1e6}}
    model["link_s"] = {"fsdp": 0.25, "hsdp": 0.08}
    runs = {k: {"sent": [0, 5 * b], "step_s": 2 * model["link_s"][k]} for k, b in
            model["bytes"].items()}  # fmt: skip
    left, right = cu.plots.placement_runs(runs, model, 5).axes
    assert [round(p.get_height(), 6) for p in left.patches] == [3.0, 1.0]  # MB per step, node 1
    assert [round(p.get_height()) for p in right.patches] == [500, 160]  # ms
    assert [t.get_text() for t in left.get_xticklabels()] == ["fsdp", "hsdp"]
    left, right = cu.plots.placement_runs(None, model, 5).axes
    assert not left.patches and not right.patches and len(left.lines) == 2
    assert "predicted only" in left.figure.texts[0].get_text()


# --- the lesson's hand-written pieces -------------------------------------------------------


def _rank(rank: int, store: str, function, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    try:
        groups = topology.node_groups(2)
        x = torch.randn(1002, generator=torch.Generator().manual_seed(rank))
        mine, builtin = function(x.clone(), groups), x.clone()
        dist.all_reduce(builtin)
        out.put((rank, (mine - builtin).abs().max().item()))
    finally:
        dist.destroy_process_group()


def test_the_lessons_hierarchical_all_reduce_equals_dist_all_reduce():
    function = notebook_functions(NOTEBOOK, ["hierarchical_all_reduce"], {"dist": dist})
    fork = multiprocessing.get_context("fork")  # the lesson's function lives in this process
    out, store = fork.Queue(), tempfile.mktemp(prefix="slow-link-store-")
    ranks = [
        fork.Process(target=_rank, args=(r, store, function["hierarchical_all_reduce"], out))
        for r in range(4)
    ]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    assert [p.exitcode for p in ranks] == [0] * 4
    diffs = dict(out.get(timeout=5) for _ in ranks)
    assert sorted(diffs) == [0, 1, 2, 3] and max(diffs.values()) < 1e-5


def _checked(numel: int, broken: bool) -> float:
    groups = topology.node_groups(2)
    if broken:  # the node's sum only: the all-reduce across left out
        topology.hierarchical_all_reduce = lambda t, g: dist.all_reduce(t, group=g.intra)
    return sl.hierarchical_check(groups, numel)[1]


@pytest.mark.filterwarnings("ignore:4 workers on 2 cores")
def test_the_shared_check_finds_the_hierarchical_sum_equal_and_a_wrong_one_not():
    assert max(launch.run(_checked, 4, 1001, False, oversubscribe=True)) < 1e-5
    assert min(launch.run(_checked, 4, 1001, True, oversubscribe=True)) > 0.1


def test_the_lessons_answers_agree_with_the_package():
    names = ("flat_over_hierarchical", "break_even_rate", "sign_with_feedback")
    found = notebook_functions(NOTEBOOK, names, {"cu": cu, "torch": torch})
    for nodes, per_node in [(2, 2), (2, 8), (8, 4)]:
        got = found["flat_over_hierarchical"](nodes, per_node)
        assert got == pytest.approx(topology.TwoLinks.ratio_bound(nodes, per_node))
    assert found["break_even_rate"](1e6, 0.02) == sl.break_even_rate(1e6, 0.02)
    g = torch.tensor([0.5, -2.0, 0.0, 1.5])
    sent, residual = found["sign_with_feedback"](g, torch.zeros(4))
    torch.testing.assert_close(sent, torch.tensor([1.0, -1.0, 1.0, 1.0]))  # mean |v| = 1
    torch.testing.assert_close(residual, g - sent)
    assert compression.payload_bytes("sign", [(4,)]) == 4 + 1  # a scale and one byte of signs


def test_the_lessons_top_k_keeps_the_largest_and_carries_the_rest():
    (topk,) = notebook_functions(NOTEBOOK, ["topk_with_feedback"], {"torch": torch}).values()
    g, e = torch.tensor([0.1, -3.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, -1.5, 0.0])
    sent, residual = topk(g, e, 0.5)  # v = [0.1, -3, 0.5, 0.5]: -3 and one 0.5 go
    assert sent[1] == -3.0 and (sent != 0).sum() == 2 and sent[0] == 0
    torch.testing.assert_close(sent + residual, g + e)


# --- the whole lesson without a cluster -----------------------------------------------------


def test_the_lesson_runs_every_cell_without_a_cluster(monkeypatch, capsys):
    namespace = lesson_without_a_cluster(NOTEBOOK, monkeypatch)
    printed = capsys.readouterr().out
    assert "no cluster here, predictions only" in printed and "needs root (test)" in printed
    assert "across nodes, beta, assumed (a prediction)" in printed
    assert "step at 10mbit (predicted)" in printed and "(no cluster)" in printed
    assert "the guide (communication)  hsdp < fsdp" in printed  # fast mode: the two FSDPs
    assert "all-gathered, bf16 / fp32: 0.500x" in printed
    assert namespace["made"] is None and namespace["probe"] is None and namespace["runs"] is None
    assert namespace["placements"] is None
    assert namespace["links"] == sl.ASSUMED
    assert "Exercise 3: correct." in printed
