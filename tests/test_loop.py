"""The training loop (course_utils.loop): each step's global loss, summed over the workers every
few steps in one collective (the runs on 2-3 workers: tests/test_ddp.py)."""

import pytest
import torch

from course_utils import loop


def test_metrics_sum_the_kept_steps_over_the_workers_in_one_call():
    history = loop.History(batch_size=0)
    metrics = loop.Metrics(history, sync_every=3, first_step=1)  # a run resumed after 1 step
    assert [metrics.due(step) for step in range(6)] == [False, True, False, False, True, False]
    # the other worker's two steps: loss 3 then 1, each on 2 samples, 2 then 0 right
    other = torch.tensor([[3.0 * 2, 2.0, 2.0], [1.0 * 2, 0.0, 2.0]])
    calls = []

    def reduce(totals):  # what an all_reduce of 2 workers returns
        calls.append(tuple(totals.shape))
        return totals + other

    metrics.add(torch.tensor(1.0), torch.tensor(1), 2)
    metrics.add(torch.tensor(2.0), torch.tensor(2), 2)
    assert history.losses == []  # kept on this worker until the sum
    metrics.record(reduce)
    assert calls == [(2, 3)]  # one collective for both steps
    assert history.losses == [2.0, 1.5]  # (1*2 + 3*2) / 4, (2*2 + 1*2) / 4
    assert history.accuracies == [0.75, 0.5] and history.batch_size == 4
    metrics.record(reduce)
    assert calls == [(2, 3)]  # nothing kept: nothing to sum
    metrics.add(torch.tensor(float("nan")), torch.tensor(0), 2)
    with pytest.raises(loop.NonFiniteLoss, match="at step 4:"):  # the whole run's 4th step
        metrics.record(None)


def test_fit_records_every_step_and_on_step_sees_the_last_sum():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(5)]
    seen = []
    history = loop.fit(
        model,
        optimizer,
        iter(batches),
        5,
        progress=False,
        sync_every=3,
        on_step=lambda step, h: seen.append(len(h.losses)),
    )
    assert seen == [0, 0, 3, 3, 5]  # summed after steps 3 and 5 (the last)
    assert len(history.step_times) == 5 and history.batch_size == 4
    torch.manual_seed(0)
    reference = torch.nn.Linear(5, 3)  # the same start, trained step by step
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = [loop.train_step(reference, ref_opt, X, y)[0].item() for X, y in batches]
    assert history.losses == pytest.approx(losses)  # the loss of each step, in order
