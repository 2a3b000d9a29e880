"""Lessons 06 and 07: the measured experiments in ``course_utils.pipeline.sweeps`` (formulas and
edge cases on made-up timelines, one real run against one process), the grid of Gantt charts,
and the lessons' hand-written code against the package's (extracted from the notebooks)."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils.measure import spread
from course_utils.pipeline import schedules, stages, sweeps
from course_utils.pipeline.schedules import Event

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def cell_defining(notebook: str, name: str) -> str:
    """The source of the notebook's code cell that defines ``name``."""
    nb = json.loads((NOTEBOOKS / notebook).read_text())
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and (f"def {name}(" in src or f"class {name}(" in src):
            return src
    raise LookupError(f"no cell defines {name} in {notebook}")


def test_busy_shares_and_busy_time_match_the_bubble():
    events = schedules.simulate("1f1b", 3, 5, [1.0, 2.0, 1.5], [2.0, 3.0, 2.5])
    shares = sweeps.busy_shares(events)
    assert len(shares) == 3 and all(0 < s <= 1 for s in shares)
    bubble = schedules.bubble_fraction(events, 3)
    assert 1 - sum(shares) / 3 == pytest.approx(bubble)
    assert sweeps.busy_time(events) == pytest.approx(5 * (1 + 2 + 1.5 + 2 + 3 + 2.5))
    # the slowest stage (stage 1) is the busiest
    assert shares.index(max(shares)) == 1


def test_busy_shares_count_ranks_where_ranks_hold_several_stages():
    events = [Event(0, "F", 0, 0.0, 1.0, rank=0), Event(3, "F", 0, 1.0, 2.0, rank=0)]
    events.append(Event(1, "F", 0, 0.0, 0.5, rank=1))
    assert sweeps.busy_shares(events) == pytest.approx([1.0, 0.25])


def test_handoff_waits_measure_the_gap_after_the_neighbour_finished():
    events = [
        Event(0, "F", 0, 0.0, 1.0),
        Event(1, "F", 0, 1.25, 2.0),  # waited 0.25 for stage 0's F 0
        Event(1, "B", 0, 2.0, 3.0),
        Event(0, "B", 0, 3.5, 4.0),  # waited 0.5 for stage 1's B 0
    ]
    assert sorted(sweeps.handoff_waits(events)) == pytest.approx([0.25, 0.5])
    # a stage busy with something else when the input arrived did not wait for it
    busy = [Event(0, "F", 0, 0.0, 1.0), Event(1, "F", 9, 0.0, 2.0), Event(1, "F", 0, 2.0, 3.0)]
    assert sweeps.handoff_waits(busy) == []


def test_plan_rows_and_imbalance_follow_the_plan():
    costs = [(1.0, 2.0), (1.0, 2.0), (1.0, 2.0), (1.0, 2.0)]  # four equal units
    rows = sweeps.plan_rows(costs, (2, 3, 4))
    assert [r[0] for r in rows] == [2, 3, 4]
    assert rows[0][1] == [2, 2] and rows[0][3] == pytest.approx(2.0)
    assert rows[1][3] == pytest.approx(2.0)  # 3 stages of 4 equal units: one holds two
    assert rows[2][3] == pytest.approx(4.0)
    assert rows[0][2] == "6000.0 / 6000.0"  # ms per stage
    assert len(sweeps.PLAN_HEADERS) == len(rows[0])
    assert sweeps.imbalance(costs, [2, 2]) == pytest.approx(1.0)
    assert sweeps.imbalance(costs, [3, 1]) == pytest.approx(3.0)


def test_stage_names_join_units_per_stage():
    assert sweeps.stage_names(["a", "b", "c"], [2, 1]) == "a + b | c"
    assert sweeps.stage_names(["a", "b", "c"], [1, 1, 1]) == "a | b | c"


def test_bound_factors_multiply_to_the_speedup_over_the_bound():
    m, batch = 4, 64
    # one made-up round: 2 stages, a recorded step of 1.0 s, each stage busy 0.8 s
    events = [Event(0, "F", 0, 0.0, 0.8), Event(1, "F", 0, 0.2, 1.0)]
    pipe_rate = batch / 1.25  # the run's mean step: 1.25 s (time outside the timeline)
    one_rate = batch / 1.2  # one process's step on the same microbatches: 1.2 s
    sweep = sweeps.Sweep(
        rates={m: {sweeps.SAME: spread([one_rate]), "pipeline": spread([pipe_rate])}},
        runs={m: [{"events": events, "samples_per_s": pipe_rate}]},
    )
    factors = sweeps.bound_factors(sweep, m, batch)
    formula = schedules.bubble_formula(2, m)
    assert factors["idle beyond the formula"].median == pytest.approx(0.8 / (1 - formula))
    assert factors["extra work"].median == pytest.approx(1.2 / 1.6)
    assert factors["outside the timeline"].median == pytest.approx(1.0 / 1.25)
    speedup = pipe_rate / one_rate
    bound = schedules.speedup_bound(2, m)
    assert factors["together"].median == pytest.approx(speedup / bound)
    assert sweep.speedup(m, sweeps.SAME).median == pytest.approx(speedup)
    assert sweep.bubbles(m).median == pytest.approx(0.2)


def test_sweep_work_is_busy_time_over_the_baseline_step():
    events = [Event(0, "F", 0, 0.0, 1.0), Event(1, "F", 0, 0.0, 1.0)]
    sweep = sweeps.Sweep(
        rates={"k": {"one process": spread([32.0, 16.0])}},
        runs={"k": [{"events": events}, {"events": events}]},
    )
    # baseline steps 64/32 = 2 s and 64/16 = 4 s; busy 2 s in both
    assert sorted(sweep.work("k", 64).samples) == pytest.approx([0.5, 1.0])


def test_split_unit_costs_split_each_backward_into_b_and_w():
    model = cu.models.build("transformer", seed=0)
    units = stages.units("transformer", model)
    X, y = cu.data.mnist("train", limit=8)
    costs = sweeps.split_unit_costs(units, X, y, repeats=1)
    assert len(costs) == len(units)
    for f, whole, w in costs:
        assert f > 0 and whole > 0 and 0 <= w <= whole
    assert costs[0][2] == costs[0][1]  # the first unit's input needs no gradient: all W
    f, b, w = sweeps.stage_fbw(costs, [3, 3])
    assert sum(f) == pytest.approx(sum(c[0] for c in costs))
    assert sum(w) == pytest.approx(sum(c[2] for c in costs))
    assert all(wi <= bi for wi, bi in zip(w, b))


def test_train_step_ms_leaves_the_weights_alone():
    model = cu.models.build("cnn", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    X, y = cu.data.mnist("train", limit=4)
    assert sweeps.train_step_ms(model, X, y, 2) > 0
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)  # lr 0


def test_conv2_cut_cost_is_the_slowest_stage_in_ms():
    model = cu.models.build("cnn", seed=0)
    X, y = cu.data.mnist("train", limit=8)
    assert 0 < sweeps.conv2_cut_cost(model, X, y, 16) < 10_000


def test_a_run_trains_as_one_process_does():
    losses = sweeps.one_process_losses("cnn", 16, 3)
    run = sweeps.run("cnn", 2, "1f1b", "hand", 16, 3, [2, 2])
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), rtol=1e-4, atol=0)
    assert run["samples_per_s"] > 0 and run["sizes"] == [2, 2]
    assert {e.stage for e in run["events"]} == {0, 1}


def test_gantts_share_one_time_axis():
    short = schedules.simulate("gpipe", 2, 2, 1, 2)
    long = schedules.simulate("gpipe", 2, 8, 1, 2)
    fig = cu.plots.gantts([[(short, "short"), (long, "long")], [(short, "alone")]], unit="slot")
    limits = {ax.get_xlim() for ax in fig.axes if ax.axison}
    assert len(limits) == 1
    assert limits.pop()[1] >= schedules.makespan(long)
    assert not fig.axes[3].axison  # the empty slot of the second row
    plt.close(fig)


def test_lesson_06_exercises_match_the_package():
    namespace: dict = {}
    exec(cell_defining("06_pipeline_parallel.ipynb", "one_f_one_b"), namespace)
    exec(cell_defining("06_pipeline_parallel.ipynb", "my_bubble"), namespace)
    for p in (1, 2, 3, 4):
        for m in (1, 2, 5, 8):
            assert namespace["my_bubble"](p, m) == pytest.approx(schedules.bubble_formula(p, m))
            for s in range(p):
                ours = namespace["one_f_one_b"](p, m, s)
                assert ours == schedules.stage_order("1f1b", p, m, s)


def test_lesson_07_zb_h1_matches_the_package():
    namespace: dict = {}
    exec(cell_defining("07_pipelines_at_scale.ipynb", "zb_h1"), namespace)
    for p in (1, 2, 3, 4):
        for m in (1, 2, 5, 8):
            for s in range(p):
                assert namespace["zb_h1"](p, m, s) == schedules.stage_order("zbh1", p, m, s)


def test_lesson_07_checkpointed_block_keeps_its_input_and_the_same_gradients():
    src = cell_defining("07_pipelines_at_scale.ipynb", "Checkpointed")
    namespace: dict = {"torch": torch}
    exec(src.split("\n\n\nck_X")[0], namespace)  # the class, not the experiment after it
    plain = cu.models.build("transformer", seed=0)
    ckpt = cu.models.build("transformer", seed=0)
    ckpt.blocks = torch.nn.ModuleList(namespace["Checkpointed"](b) for b in ckpt.blocks)
    X, y = cu.data.mnist("train", limit=8)
    h = plain.tokens(X).detach()
    assert stages.saved_bytes(ckpt.blocks[0], h) == h.numel() * h.element_size()
    assert stages.saved_bytes(ckpt, X) < stages.saved_bytes(plain, X)
    for model in (plain, ckpt):
        F.cross_entropy(model(X), y).backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
