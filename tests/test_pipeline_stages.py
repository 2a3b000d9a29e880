"""Pipeline parallelism (lesson 06): cutting the models into stages and balancing them
(course_utils.pipeline.stages), and the one-process baseline that does a pipeline's arithmetic
(course_utils.pipeline.measured)."""

import pytest
import torch

import course_utils as cu
from course_utils.pipeline import measured, stages


@pytest.mark.parametrize("name", ["cnn", "rnn", "transformer"])
def test_units_compose_to_the_model(name):
    model = cu.models.build(name, seed=0)
    X = cu.models.prepare_input(name, cu.data.mnist("train", limit=8)[0])
    pieces = stages.units(name, model)
    assert len(pieces) == stages.max_stages(name) == len(stages.UNIT_NAMES[name])
    for sizes in ([len(pieces)], stages.even_sizes(name, len(pieces))):
        h = X
        for stage in stages.split(name, model, sizes):
            h = stage(h)
        torch.testing.assert_close(h, model(X), rtol=1e-5, atol=1e-5)
    two = stages.split(name, model, stages.even_sizes(name, 2))
    state = cu.checkpoint.assemble([p for s in two for p in stages.full_pieces(s)])
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v)
    shapes = stages.boundary_shapes(two, X)
    assert shapes[-1] == (10,)


@pytest.mark.parametrize("cut", [16, 32, 48])
def test_conv2_slices_do_the_layers_arithmetic_forward_and_backward(cut):
    # Each slice pools its own channels and the boundary carries conv2's input plus the pooled
    # channels so far: same logits and same gradients (every parameter) as the whole CNN.
    X, y = cu.data.mnist("train", limit=16)
    reference = cu.models.build("cnn", seed=0)
    torch.nn.functional.cross_entropy(reference(X), y).backward()
    model = cu.models.build("cnn", seed=0)
    pieces = [
        stages.CNNBlock1(model),
        stages.Conv2Slice(model, 0, cut),
        stages.Conv2Slice(model, cut, 64),
        stages.Head(model),
    ]
    h0 = pieces[1](pieces[0](X))
    assert h0.shape == (16, 32 * 14 * 14 + cut * 7 * 7)  # input + pooled channels, per sample
    torch.nn.functional.cross_entropy(pieces[3](pieces[2](h0)), y).backward()
    grads = cu.checkpoint.assemble(
        [(full, row, p.grad) for full, row, p in stages.param_origins(torch.nn.Sequential(*pieces))]
    )
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_plan_balances_the_measured_costs_of_the_units():
    # conv1 block costly (as on a CPU), conv2's slices, fc a sliver
    costs = [(10.0, 10.0), (8.5, 8.5), (13.5, 13.5), (0.5, 0.5)]
    assert stages.plan(costs, 2) == [2, 2]  # 37 vs 28
    assert stages.plan([(8.0, 8.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)], 2) == [1, 3]
    assert stages.plan(costs, 4) == [1, 1, 1, 1]
    assert stages.unit_names("cnn")[1:3] == ["conv2 ch 0-15 + pool", "conv2 ch 16-63 + pool"]
    sim = stages.simulate_plan(costs, "gpipe", 2, 4)
    busy = {s: sum(e.end - e.start for e in sim if e.stage == s) for s in (0, 1)}
    assert busy == pytest.approx({0: 4 * 37.0, 1: 4 * 28.0})  # each stage's units, m times


def test_balance_minimises_the_slowest_stage():
    assert stages.balance([1, 5, 5, 1], 2) == [2, 2]
    assert stages.balance([8, 1, 1, 1], 2) == [1, 3]
    assert stages.balance([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        stages.balance([1, 1], 3)
    costs = stages.unit_costs(
        stages.units("cnn", cu.models.build("cnn", seed=0)), *cu.data.mnist("train", limit=16)
    )
    assert len(costs) == 4 and all(f > 0 and b > 0 for f, b in costs)


def test_the_microbatched_baseline_does_the_pipelines_arithmetic():
    # Lesson 06's second baseline: one process running the m microbatches in turn takes the
    # same step as on the whole batch (the pipeline's arithmetic, on one device).
    X, y = next(cu.data.batches(*cu.data.mnist("train"), 32, 1, seed=0))
    models = [cu.models.build("transformer", seed=0) for _ in range(2)]
    for model, step in zip(models, (cu.loop.train_step, cu.measure._accumulating(4))):
        step(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y)
    whole, pieces = (dict(m.named_parameters()) for m in models)
    for k in whole:
        torch.testing.assert_close(pieces[k], whole[k], rtol=1e-4, atol=1e-6)
    rate = measured.one_process_throughput("transformer", 32, num_steps=1, microbatches=4)
    assert rate > 0


def test_saved_bytes_counts_activations_not_weights():
    model = cu.models.build("cnn", seed=0)
    head = stages.units("cnn", model)[-1]  # flatten + fc: autograd keeps fc's input
    x = torch.randn(16, 64, 7, 7)
    assert stages.saved_bytes(head, x) == x.numel() * 4
