"""Zero-bubble schedules (lesson 07): the backward split into B (the input's gradient) and W (the
weights'), on paper against the paper's numbers and torch's own orders, and for real against one
process. Workers are launched with threads=1 (see tests/test_pipeline_engines.py)."""

from types import SimpleNamespace

import pytest
import torch

import course_utils as cu
from course_utils.config import RunConfig
from course_utils.pipeline import measured, schedules, zero_bubble

SPLIT = [
    (s, p, m)
    for s in zero_bubble.SPLIT_SCHEDULES
    for p in (1, 2, 3, 4)
    for m in (1, 2, 3, 4, 5, 8, 16)
    if s == "zbh1" or m >= 2 * p  # the V schedules need m >= their stages (torch's condition)
]


def check_split_timeline(events, schedule, num_stages, num_microbatches):
    """Every (stage, microbatch) has one F and one B, and at most one W (exactly one where every
    backward is split), in dependency order, each on the rank that holds its stage, one op at a
    time on each rank."""
    ev = {(e.kind, e.stage, e.microbatch): e for e in events}
    assert len(ev) == len(events)  # nothing twice
    weights = sum(e.kind == "W" for e in events)
    assert len(events) == 2 * num_stages * num_microbatches + weights
    if schedule != "dualpipev":  # DualPipeV splits only the backwards of its warm-up and drain
        assert weights == num_stages * num_microbatches
    for s in range(num_stages):
        for i in range(num_microbatches):
            f, b, w = ev["F", s, i], ev["B", s, i], ev.get(("W", s, i))
            assert f.end <= b.start  # forward before its backward...
            assert w is None or b.end <= w.start  # ...the input's gradient before the weights'
            if s > 0:  # a stage's F needs the previous stage's F
                assert ev["F", s - 1, i].end <= f.start
            if s < num_stages - 1:  # its B needs the next stage's B
                assert ev["B", s + 1, i].end <= b.start
    for e in events:
        assert e.row == zero_bubble.rank_of(schedule, num_stages, e.stage)
    for r in {e.row for e in events}:
        mine = sorted((e for e in events if e.row == r), key=lambda e: e.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))


@pytest.mark.parametrize("schedule,p,m", SPLIT)
def test_split_schedules_are_valid(schedule, p, m):
    num_stages = 2 * p if schedule in zero_bubble.V_SCHEDULES else p
    for forward, backward, weight in ((1, 2, 1), (1, 2, 0.5), (2, 3, 1.5), (1, 1, 0.2)):
        events = schedules.simulate(schedule, num_stages, m, forward, backward, weight=weight)
        check_split_timeline(events, schedule, num_stages, m)
        ranks = num_stages // 2 if schedule in zero_bubble.V_SCHEDULES else p
        busy = sum(e.end - e.start for e in events)  # the split moves work, adds none
        assert busy == pytest.approx(num_stages * m * (forward + backward))
        assert 0 <= schedules.bubble_fraction(events, ranks) < 1
        assert schedules.bubble_fraction(events) == schedules.bubble_fraction(events, ranks)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64])
def test_zbh1_has_a_third_of_1f1bs_bubble(p, m):
    # F = B = W (the paper's setting): 1F1B's whole backward costs 2F, its bubble (p-1)/(m+p-1);
    # ZB-H1's idle time per stage is (p-1)(F + B - W) = (p-1)F instead of (p-1)(F + B + W).
    one = schedules.bubble_fraction(schedules.simulate("1f1b", p, m, 1, 2), p)
    assert one == pytest.approx(schedules.bubble_formula(p, m))
    zb = schedules.simulate("zbh1", p, m, 1, 2, weight=1)
    bubble = schedules.bubble_fraction(zb, p)
    assert bubble < one
    if m >= p:  # the paper's numbers, exactly
        assert schedules.makespan(zb) == pytest.approx(3 * m + p - 1)
        assert bubble == pytest.approx((p - 1) / (3 * m + p - 1))
        assert bubble == pytest.approx(zero_bubble.bubble_formula(p, m))
        assert 1 / 3 < bubble / one <= 1 / 2 + 1e-12  # (m+p-1)/(3m+p-1): a third, as m grows
    if m >= 16 * p:
        assert bubble / one < 0.35


@pytest.mark.parametrize("forward,b,w", [(1, 1, 1), (2, 1, 0.5), (1, 3, 1), (1.5, 2, 1.5)])
def test_zbh1_bubble_formula_with_unequal_costs(forward, b, w):
    # (p-1)(F + B - W) per stage holds while W <= F and W <= B (W then fits in the gaps)
    for p in (2, 3, 4):
        for m in (p, 2 * p, 5 * p):
            events = schedules.simulate("zbh1", p, m, forward, b + w, weight=w)
            assert schedules.bubble_fraction(events, p) == pytest.approx(
                zero_bubble.bubble_formula(p, m, forward, b + w, w)
            )


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_the_v_schedules_beat_zbh1_and_1f1b_on_the_same_model(p, m):
    # The same model on p ranks: one stage of cost 2 (forward) + 4 (backward, W half of it) per
    # rank, or in a V two stages of half that.
    one = schedules.bubble_fraction(schedules.simulate("1f1b", p, m, 2, 4), p)
    h1 = schedules.bubble_fraction(schedules.simulate("zbh1", p, m, 2, 4, weight=2), p)
    for schedule in zero_bubble.V_SCHEDULES:
        v = schedules.bubble_fraction(schedules.simulate(schedule, 2 * p, m, 1, 2, weight=1), p)
        assert v < h1 < one
        assert v == pytest.approx((p - 1) / (6 * m + p - 1))  # one F of idle per rank and step


def test_zbh1_holds_as_much_as_1f1bs_first_stage():
    for p, m in ((2, 8), (4, 8), (4, 16)):
        assert schedules.peak_in_flight("zbh1", p, m) == [p] * p  # every stage: 1F1B's stage 0
        assert schedules.peak_in_flight("1f1b", p, m) == [p - s for s in range(p)]
    assert schedules.in_flight([("F", 0), ("B", 0), ("W", 0)]) == [1, 1, 0]  # freed by its W
    assert schedules.in_flight([("F", 0), ("B", 0)]) == [1, 0]  # a whole backward frees it


def _torch_order(kind, p, m, rank):
    """A rank's (kind, stage, microbatch) in torch's own schedule, read without processes."""
    from torch.distributed.pipelining import schedules as ts

    fake = SimpleNamespace(pp_group_size=p, num_stages=2 * p, _n_microbatches=m)
    names = {ts.FORWARD: "F", ts.BACKWARD_INPUT: "B", ts.FULL_BACKWARD: "B"}
    names[ts.BACKWARD_WEIGHT] = "W"
    order = []
    for action in kind._calculate_single_rank_operations(fake, rank):
        if action is None:
            continue
        subs = action.sub_actions if action.computation_type == ts.OVERLAP_F_B else [action]
        order += [(names[a.computation_type], a.stage_index, a.microbatch_index) for a in subs]
    return order


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_v_orders_are_torchs(p):
    from torch.distributed.pipelining import ScheduleDualPipeV, ScheduleZBVZeroBubble

    for m in range(2 * p, 4 * p + 3):
        for rank in range(p):
            assert zero_bubble.zbv_order(p, m, rank) == _torch_order(
                ScheduleZBVZeroBubble, p, m, rank
            )
            assert zero_bubble.dualpipev_order(p, m, rank) == _torch_order(
                ScheduleDualPipeV, p, m, rank
            )


def test_table_and_errors():
    grid = schedules.table("zbh1", 3, 4)
    assert all(len(row) == 3 * 4 + 3 - 1 for row in grid)  # 3m + p - 1 slots
    for row in grid:
        assert sorted(c for c in row if c) == sorted(f"{k}{i}" for k in "FBW" for i in range(4))
    with pytest.raises(ValueError, match="2 stages per rank"):
        schedules.table("zbv", 4, 8)
    with pytest.raises(ValueError, match="even"):
        schedules.simulate("zbv", 3, 8)
    with pytest.raises(ValueError):
        schedules.stage_order("zbv", 4, 8, 0)
    assert schedules.stage_order("zbh1", 2, 2, 1) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("W", 1),
        ("W", 0),
    ]


def test_gantt_draws_w_in_its_own_colour_and_v_ranks_as_rows():
    events = schedules.simulate("zbv", 4, 8, 1, 2, weight=1)
    fig = cu.plots.gantt(events, unit="slot")
    ax = fig.axes[0]
    assert len(ax.patches) == len(events)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["forward", "backward: input (B)", "backward: weights (W)"]
    colours = {tuple(p.get_facecolor()) for p, e in zip(ax.patches, events) if e.kind == "W"}
    others = {tuple(p.get_facecolor()) for p, e in zip(ax.patches, events) if e.kind != "W"}
    assert len(colours) == 1 and not colours & others
    hatched = [bool(p.get_hatch()) for p in ax.patches]
    assert hatched == [e.stage >= 2 for e in events]  # the way back
    plain = cu.plots.gantt(schedules.simulate("1f1b", 2, 4), unit="slot").axes[0]
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["forward", "backward"]


@pytest.mark.parametrize("schedule", zero_bubble.V_SCHEDULES)
def test_v_schedules_run_as_simulated_and_train_like_one_process(schedule):
    # profile(): 2 workers, 4 stages in a V; each rank runs its ops in the simulated order
    m = 4
    run = measured.Profile(
        "transformer", m, schedule, "torch", batch_size=32, num_steps=2, sizes=[2, 1, 1, 2]
    )
    result, other = cu.launch.run(measured.profile, 2, run, threads=1, device="cpu")
    assert other is None
    for rank, order in enumerate(schedules.rank_orders(schedule, 4, m)):
        ran = sorted((e for e in result["events"] if e.stage == rank), key=lambda e: e.start)
        assert [(e.kind, e.microbatch) for e in ran] == [(k, i) for k, _, i in order]
    one = cu.train.run(RunConfig(model="transformer", steps=2, batch_size=32), progress=False)
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0
    )


def test_schedule_bubbles_marks_what_was_not_run():
    spread = cu.measure.spread
    fig = cu.plots.schedule_bubbles(
        ["1f1b", "zbh1", "zbv"],
        {"1f1b": 0.2, "zbh1": 0.08, "zbv": 0.04},
        {"1f1b": 0.25, "zbh1": 0.1, "zbv": 0.06},
        {"1f1b": spread([0.3, 0.35]), "zbv": 0.5},
    )
    ax = fig.axes[0]
    assert len(ax.patches) == 3 + 3 + 2  # formula, simulated, and the two measured
    assert any(t.get_text() == "not run" for t in ax.texts)
    from matplotlib.container import ErrorbarContainer

    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and ax.get_ylim()[1] >= 0.5  # a min-max bar for the repeated one
