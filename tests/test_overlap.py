"""course_utils.overlap, lesson 11's overlap experiment: a row per profiled step (its length,
compute, communication, the shares in backward and hidden), rounds paired by their medians, the
versions' table, and the worker that profiles each version."""

import pytest
import torch
from traces import traced_steps

import course_utils as cu
from course_utils import overlap, profiling


def test_step_rows_measure_each_step_and_carry_their_tags():
    rows = overlap.step_rows(traced_steps((350, 650)), 2, round=1, rank=0)
    assert len(rows) == 2
    for step, row in enumerate(rows, start=1):
        assert row["round"] == 1 and row["rank"] == 0 and row["step"] == step
        assert row["step_ms"] == pytest.approx(0.9)
        assert row["compute_ms"] == pytest.approx(0.6)  # forward + backward + optimizer
        assert row["comm_ms"] == pytest.approx(0.2)
        assert row["in_backward"] == pytest.approx(0.5)  # 350-450 of 350-450 and 650-750
        assert row["hidden"] == pytest.approx(0.25)  # 350-400 under the arithmetic
        assert row["all_reduces"] == 2
    rows = [{"round": k % 2, "x": float(k)} for k in range(6)]  # round 0: 0, 2, 4; round 1: 1, 3, 5
    assert overlap.round_medians(rows, "x") == [2.0, 3.0]


def test_the_table_shows_one_row_per_version():
    rows = overlap.step_rows(traced_steps(), 2, round=0, rank=0)
    table = overlap.overlap_table({"after": rows, "again": rows})
    lines = str(table).splitlines()
    assert len(lines) == 3 and lines[1].startswith("after") and "0%" in lines[1]
    assert table.numbers["rows"][0][1] == "2"  # all-reduces per step


def labelled(model, optimizer, X, y):
    """A data-parallel step by hand with a label around the all-reduces (the lesson's)."""
    optimizer.zero_grad(set_to_none=True)
    with profiling.label("forward"):
        loss = torch.nn.functional.cross_entropy(model(X), y)
    with profiling.label("backward"):
        loss.backward()
    cu.ddp.average_gradients(model)
    with profiling.label("optimizer"):
        optimizer.step()


@pytest.mark.parametrize("step_fn, cap, all_reduces", [(labelled, None, 6), ("ddp", 0.1, 3)])
def test_profile_steps_traces_the_asked_steps_of_each_version(tmp_path, step_fn, cap, all_reduces):
    paths = cu.launch.run(
        overlap.profile_steps, 2, tmp_path, step_fn, cap, 2, threads=1, device="cpu"
    )
    assert paths == [str(profiling.trace_path(tmp_path, rank)) for rank in (0, 1)]
    for path in paths:
        rows = overlap.step_rows(profiling.events(path), 2)
        assert [r["all_reduces"] for r in rows] == [all_reduces, all_reduces]
        if step_fn == "ddp":  # DDP starts its buckets' all-reduces from backward's hooks
            events = profiling.events(path)
            for step in (1, 2):
                one = profiling.step_events(events, step)
                comm = profiling.intervals(one, lambda e: profiling.is_communication(e["name"]))
                backward = profiling.intervals(one, lambda e: profiling.is_phase(e, ("backward",)))
                # the first begins before backward ends (how long the last one then waits for
                # the other rank depends on the machine's load, so its share is not asserted)
                assert comm[0][0] < backward[-1][1]
            assert all(r["in_backward"] > 0 for r in rows)
        else:
            assert all(r["in_backward"] == 0 for r in rows)
