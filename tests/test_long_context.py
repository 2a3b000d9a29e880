"""course_utils.long_context (lesson 10's experiments): the textbook attention and the memory it
holds against the ring's, timed attention steps that send the formulas' bytes, the sweep in turns,
the ring's spans read back from a real trace and the share of each transfer hidden, the mixture of
experts' sweep and its points, and the all-to-all's alpha-beta cost."""

import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils import long_context as lc


@pytest.mark.parametrize("causal", [True, False])
def test_the_textbook_attention_is_pytorchs(causal):
    q, k, v, _, held = lc.local_inputs(24, batch=2, heads=2, head_dim=8)  # one process: all
    assert held.tolist() == list(range(24)) and q.requires_grad and q.shape == (2, 2, 24, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(lc.whole_attention(q, k, v, causal=causal), expected)


def test_whole_scores_take_memory_that_grows_as_the_square_of_the_length():
    shape = dict(batch=2, heads=2, head_dim=8)
    small, large = (lc.attention_memory("whole", t, **shape) for t in (128, 256))
    scores = 2 * 2 * 256 * 256 * 4  # one (B, heads, T, T) float32 matrix at T = 256
    assert 3 * scores <= large < 4 * scores  # scores, softmax, and its gradient at once
    assert 3.5 < large / small <= 4.2


def test_two_ranks_hold_half_the_written_out_rings_scores_and_a_fraction_of_the_whole():
    found = {}
    for ranks in (1, 2):  # the largest rectangle: (T/2) x (T/2) on one rank, (T/4) x (T/2) on 2
        args = (lc.attention_memory, ranks, "ring", 512, False)
        found[ranks] = max(cu.launch.run(*args, threads=1, device="cpu"))
    assert 0.45 < found[2] / found[1] < 0.6
    assert found[2] < 0.35 * lc.attention_memory("whole", 512)
    assert lc.MEMORY_SERIES["ring written out, cp 2"] == ("ring", 2, False)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_timed_attention_counts_the_formulas_bytes_and_the_rings_arithmetic(method):
    ranks = cu.launch.run(lc.timed_attention, 2, method, 64, 2, "zigzag", threads=1, device="cpu")
    expected = lc.sent_per_rank(method, 4, 64, 64, 2, backward=True)  # SHAPE: B 4, dim 4 x 16
    for record in ranks:
        assert len(record) == 2  # the warm-up step is not kept
        for step in record:
            assert step["sent"] == expected and 0 <= step["comm_s"] < step["step_s"]
            assert (step["compute_s"] > 0) == (method == "ring") and step["compute_s"] < step[
                "step_s"
            ]


def test_the_bytes_formulas():
    block = 4 * 1568 / 2 * 64 * 4  # one (B, T/cp, dim) float32 activation
    assert lc.sent_per_rank("ring", 4, 1568, 64, 2) == 2 * block
    assert lc.sent_per_rank("ring", 4, 1568, 64, 2, backward=True) == 8 * block
    assert lc.sent_per_rank("ulysses", 4, 1568, 64, 2) == 2 * block
    assert lc.sent_per_rank("ulysses", 4, 1568, 64, 2, backward=True) == 4 * block
    assert lc.sent_per_rank("ring", 4, 1568, 64, 1, backward=True) == 0  # nobody to send to
    eight = [lc.sent_per_rank(m, 1, 4096, 64, 8) for m in ("ring", "ulysses")]
    assert eight[0] / eight[1] == 4  # cp / 2
    with pytest.raises(ValueError, match="ring or ulysses"):
        lc.sent_per_rank("flash", 1, 8, 8, 2)


def test_the_attention_sweep_measures_in_turns_and_keeps_the_slowest_rank():
    calls = []

    def launcher(fn, nproc, method, seq_len, steps, layout, **kwargs):
        assert fn is lc.timed_attention and kwargs["pin"] and kwargs["threads"] == 1
        calls.append((method, nproc, layout))
        return [[{"step_s": 0.1 * (r + 1) * nproc}] * steps for r in range(nproc)]

    settings = {"one": ("ring", 1, 64, "zigzag"), "two": ("ulysses", 2, 64, "contiguous")}
    step_times, records = lc.attention_sweep(settings, steps=3, repeats=2, launcher=launcher)
    assert calls == [("ring", 1, "zigzag"), ("ulysses", 2, "contiguous")] * 2
    assert step_times["one"].samples == (0.1, 0.1)
    assert step_times["two"].samples == (pytest.approx(0.4),) * 2  # rank 1's, the slowest
    assert len(records["two"]) == 2 and len(records["two"][0]) == 2


def span(kind, phase, start, stop):
    return {"kind": kind, "phase": phase, "start": start, "stop": stop}


def test_transfers_pair_posts_with_waits_in_order_and_measure_what_hid():
    spans = [  # one step at cp 2: forward, then the backward's K/V hop and two dK/dV hops
        span("step", "step", 0, 20),
        span("post", "forward", 0, 0.1),
        span("block", "forward", 0.1, 3.1),
        span("wait", "forward", 3.1, 3.6),  # half of a 1 ms transfer showed
        span("block", "forward", 3.6, 5),
        span("post", "backward", 5, 5.1),
        span("block", "backward", 5.1, 9),
        span("post", "backward", 9, 9.1),
        span("wait", "backward", 9.1, 9.1),  # the K/V: all hidden
        span("block", "backward", 9.1, 12),
        span("wait", "backward", 12, 14),  # the first dK/dV: the other rank was late
        span("post", "backward", 14, 14.1),
        span("wait", "backward", 14.1, 15),  # the last hop home: nothing to hide behind
    ]
    found = lc.transfers(spans, alone_ms=1.0)
    assert [t["phase"] for t in found] == ["forward", "backward", "backward", "backward"]
    assert [t["hidden"] for t in found] == [pytest.approx(0.5), 1.0, 0.0, 0.0]
    assert [t["behind"] for t in found] == [True, True, True, False]
    assert [t["blocks_ms"] for t in found] == pytest.approx([3, 3.9, 2.9, 0])
    assert {t["step"] for t in found} == {0}


def test_a_real_ring_trace_holds_every_span_and_transfer():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        paths = cu.launch.run(
            lc.ring_trace, 2, 64, folder, steps=2, alone=3, threads=1, device="cpu"
        )
        lanes = [lc.ring_spans(cu.profiling.events(path)) for path in paths]
    for lane in lanes:
        kinds = [s["kind"] for s in lane]
        assert kinds.count("step") == 2 and kinds.count("alone") == 3
        assert kinds.count("block") == 2 * (2 + 2)  # 2 blocks forward, 2 backward, per step
        assert all(s["stop"] >= s["start"] for s in lane)
        found = lc.transfers(lane, alone_ms=1.0)
        for step in (0, 1):  # forward's hop, backward's K/V hop and 2 dK/dV hops
            mine = [t for t in found if t["step"] == step]
            assert [t["behind"] for t in mine] == [True, True, True, False]


def test_a_mixture_of_experts_run_records_its_router_every_step():
    sizes = dict(dim=16, heads=2, hidden=16, depth=2, experts=4)
    run = lc.moe_run(0.01, 1.0, steps=3, batch_size=8, **sizes)
    assert len(run["imbalance"]) == len(run["dropped"]) == 3
    assert all(1 <= x <= 4 for x in run["imbalance"]) and all(0 <= d < 1 for d in run["dropped"])
    routed, kept = torch.tensor(run["routed"]), torch.tensor(run["kept"])
    assert routed.shape == (2, 4) and (routed.sum(1) == 8 * 16).all()  # 8 images of 16 tokens
    assert (kept <= routed).all() and (kept <= run["capacity"]).all()
    assert run["capacity"] == cu.moe.capacity(128, 4, 1, 1.0) and 0 <= run["accuracy"] <= 1


def test_the_moe_sweep_runs_every_setting_two_at_a_time_and_its_points_spread_the_seeds():
    launches = []

    def launcher(fn, nproc, pair, steps, sizes, **kwargs):
        launches.append(list(pair))
        assert nproc == len(pair) and kwargs["threads"] == 1 and sizes == {"depth": 1}
        return [{"setting": s} for s in pair]

    runs = lc.moe_sweep((0.0, 0.1), (1.0,), 5, seeds=(0, 1, 2), launcher=launcher, depth=1)
    assert [len(pair) for pair in launches] == [2, 2, 2]
    assert [r["setting"] for r in runs] == [(w, 1.0, s) for w in (0.0, 0.1) for s in (0, 1, 2)]
    fake = [
        {"aux_weight": w, "capacity_factor": 1.0, "accuracy": a, "imbalance": [9, 9, 9, i]}
        | {"dropped": [1, 1, 1, i / 10]}
        for w, a, i in [(0.0, 0.5, 2.0), (0.0, 0.7, 3.0), (0.1, 0.6, 1.0)]
    ]
    points = {p["aux_weight"]: p for p in lc.moe_points(fake)}
    assert points[0.0]["imbalance"].samples == (2.0, 3.0)  # the last quarter: the last step
    assert points[0.0]["dropped"].samples == (0.2, 0.3)
    assert points[0.0]["accuracy"].samples == (0.5, 0.7)
    assert points[0.1]["imbalance"].samples == (1.0,)
