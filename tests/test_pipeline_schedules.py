"""Pipeline parallelism (lesson 06): GPipe and 1F1B on paper (course_utils.pipeline.schedules):
every simulated timeline valid, its bubble the formula, its peak memory the schedule's.
``check_timeline`` is the validity check the other pipeline tests use on measured timelines."""

import pytest

from course_utils.pipeline import schedules

SETTINGS = [(s, p, m) for s in schedules.SCHEDULES for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)]


def check_timeline(events, num_stages, num_microbatches):
    """Every (stage, microbatch) has one F and one B, in dependency order, without overlaps."""
    ev = {(e.kind, e.stage, e.microbatch): e for e in events}
    assert len(ev) == len(events) == 2 * num_stages * num_microbatches  # each exactly once
    for s in range(num_stages):
        for i in range(num_microbatches):
            assert ev["F", s, i].end <= ev["B", s, i].start  # forward before its backward
            if s > 0:  # activations flow down, gradients flow up
                assert ev["F", s - 1, i].end <= ev["F", s, i].start
            if s < num_stages - 1:
                assert ev["B", s + 1, i].end <= ev["B", s, i].start
        mine = sorted((e for e in events if e.stage == s), key=lambda e: e.start)
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))  # one op at a time


@pytest.mark.parametrize("schedule,p,m", SETTINGS)
def test_schedule_is_valid_and_its_bubble_is_the_formula(schedule, p, m):
    for forward, backward in ((1, 1), (1, 2)):
        events = schedules.simulate(schedule, p, m, forward, backward)
        check_timeline(events, p, m)
        assert schedules.makespan(events) == pytest.approx((m + p - 1) * (forward + backward))
        assert schedules.bubble_fraction(events, p) == pytest.approx(schedules.bubble_formula(p, m))
    grid = schedules.table(schedule, p, m)
    assert len(grid) == p and all(len(row) == 2 * (m + p - 1) for row in grid)
    for s, row in enumerate(grid):
        assert sorted(c for c in row if c) == sorted(f"{k}{i}" for k in "FB" for i in range(m))
        assert row.index("F0") == s  # microbatch 0 reaches stage s after s slots
    expected = [m] * p if schedule == "gpipe" else [min(p - s, m) for s in range(p)]
    assert schedules.peak_in_flight(schedule, p, m) == expected


def test_unequal_stages_and_communication():
    # p = 2, m = 1: F on stage 0, send, F on 1, B on 1, send, B on 0, all in a row.
    events = schedules.simulate("gpipe", 2, 1, forward=[1, 2], backward=[3, 4], comm=0.5)
    assert schedules.makespan(events) == pytest.approx(1 + 0.5 + 2 + 4 + 0.5 + 3)
    check_timeline(events, 2, 1)
    # With m microbatches the slowest stage sets the pace: makespan >= m * its time.
    events = schedules.simulate("1f1b", 2, 8, forward=[1, 3], backward=[1, 3])
    assert schedules.makespan(events) >= 8 * 6
    check_timeline(events, 2, 8)
