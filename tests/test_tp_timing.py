"""course_utils.tp_timing (lesson 09's measurements): the timed worker counts the hand-written
all-reduces of the formula, the sweep measures every setting in turns with the right number of
ranks, the speedup points pair the repeats, and the saved-activation count takes each storage once
and no weights."""

import pytest
import torch
import torch.nn as nn

import course_utils as cu
from course_utils import tp_timing


def test_saved_activations_count_each_storage_once_and_no_weights():
    X = torch.randn(2, 4)  # 32 bytes
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU())  # keeps X and its (2, 8) output: 32 + 64
    assert tp_timing.saved_activation_bytes(relu, X) == 32 + 64
    # tanh's output is kept by tanh and by the second linear: one storage, counted once
    tanh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    assert tp_timing.saved_activation_bytes(tanh, X) == 32 + 64
    with torch.no_grad():
        assert tp_timing.saved_activation_bytes(relu, X) == 0


def test_one_process_steps_send_nothing_and_an_unknown_way_is_refused():
    record = tp_timing.timed_steps("one process", 32, 8, 2)
    assert len(record) == 2  # the warm-up step is not kept
    assert all(r["calls"] == 0 and r["bytes"] == 0 and r["step_s"] > 0 for r in record)
    with pytest.raises(ValueError, match="how must be one of"):
        tp_timing.timed_steps("by magic", 32, 8, 1)


def test_steps_split_by_hand_send_the_formulas_all_reduces():
    width, batch, tokens, blocks = 32, 8, 16, 4
    ranks = cu.launch.run(tp_timing.timed_steps, 2, "by hand", width, batch, 1, threads=1)
    for record in ranks:
        (step,) = record
        assert step["calls"] == 4 * blocks  # f and g, attention and MLP, forward and backward
        assert step["bytes"] == 4 * blocks * 4 * batch * tokens * width
        assert 0 < step["comm_s"] < step["step_s"]


def test_the_sweep_measures_every_setting_in_turns_on_the_right_number_of_ranks():
    calls = []

    def launcher(fn, nproc, how, width, batch, steps, **kwargs):
        assert fn is tp_timing.timed_steps and kwargs["pin"] and kwargs["threads"] == 1
        calls.append((how, width, batch, nproc))
        step_s = width / 100 * (1 if how == "one process" else 0.5) + len(calls) / 1e6
        return [[{"step_s": step_s, "comm_s": step_s / 4, "calls": 0, "bytes": 0}] * steps]

    step_times, records = tp_timing.sweep([32, 64], [8], steps=3, repeats=2, launcher=launcher)
    settings = [(h, w, 8) for w in (32, 64) for h in tp_timing.HOWS]
    assert [c[:3] for c in calls] == settings * 2  # round after round, every setting in each
    assert all(nproc == (1 if how == "one process" else 2) for how, _, _, nproc in calls)
    assert set(step_times) == set(settings) and all(len(records[k]) == 2 for k in settings)
    assert step_times["one process", 64, 8].median == pytest.approx(0.64, rel=1e-3)


def test_speedup_points_pair_the_repeats_and_give_the_hand_written_communication_share():
    spread = cu.measure.spread
    step_times = {
        ("one process", 64, 8): spread([2.0, 4.0]),
        ("by hand", 64, 8): spread([1.0, 4.0]),
        ("DTensor", 64, 8): spread([4.0, 2.0]),
    }
    records = {
        ("by hand", 64, 8): [[{"step_s": 1.0, "comm_s": 0.25}], [{"step_s": 2.0, "comm_s": 1.0}]]
    }
    points = {p["layers"]: p for p in tp_timing.speedup_points(step_times, records)}
    assert set(points) == {"by hand", "DTensor"}
    hand, dtensor = points["by hand"], points["DTensor"]
    assert (hand["speedup_min"], hand["speedup_max"]) == (1.0, 2.0)  # 2/1 and 4/4, paired
    assert (dtensor["speedup_min"], dtensor["speedup_max"]) == (0.5, 2.0)
    assert (hand["comm_share_min"], hand["comm_share_max"]) == (25.0, 50.0)
    assert "comm_share" not in dtensor and hand["width"] == 64 and hand["batch"] == 8
