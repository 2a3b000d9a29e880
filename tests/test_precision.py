"""Mixed precision (course_utils.precision, ``--precision``) against its definitions: bf16
autocast computes the linear layers in bfloat16 and steps float32 master weights; fp16's loss
scaler multiplies the loss, unscales before the step, skips a step with inf or NaN gradients and
halves its scale; FSDP2's policy gathers bfloat16 parameters (half the bytes), reduce-scatters
float32 gradients (the same bytes) and holds float32 shards, with losses close to float32's;
fp32 is the step the course always took. Accuracy after a short run per precision is printed,
not asserted tightly (this CPU has no AVX-512: bf16 is slow here, so no speed is measured)."""

import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_utils import data, launch, loop, models, precision, sharding
from course_utils.config import RunConfig, UsageError, parse, validate

U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, rounded to nearest


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_bf16_computes_linear_layers_in_bf16_and_steps_fp32_master_weights():
    model = mlp()
    outputs = []
    for layer in (model[0], model[2]):
        layer.register_forward_hook(lambda m, i, out: outputs.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: p - lr * grad
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = loop.train_step(model, optimizer, *batch(), amp=precision.Mixed("bf16"))
    assert outputs == [torch.bfloat16, torch.bfloat16]
    assert loss.dtype == torch.float32  # cross-entropy runs in float32 under autocast
    for old, p in zip(before, model.parameters()):
        assert p.dtype == p.grad.dtype == torch.float32  # the master weights and their grads
        assert torch.equal(
            p.detach(), old.add(p.grad, alpha=-0.1)
        )  # stepped in float32, to the bit
    # an update far below bfloat16's resolution still moves the float32 master weight
    w = model[0].weight.detach()
    assert not torch.equal(w, w.to(torch.bfloat16).float())


def scaled_grads(model: nn.Module) -> dict[int, torch.Tensor]:
    """Hooks that keep each parameter's gradient (by its position in ``model.parameters()``) as
    backward produces it, before anything unscales it."""
    seen = {}

    def keep(g: torch.Tensor, i: int) -> None:
        seen[i] = g.clone()

    for i, p in enumerate(model.parameters()):
        p.register_hook(lambda g, i=i: keep(g, i))
    return seen


def test_fp16_scales_the_loss_and_unscales_the_gradients_before_the_step():
    reference, model = mlp(), mlp()
    F.cross_entropy(reference(batch()[0]), batch()[1]).backward()  # float32, unscaled
    seen = scaled_grads(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scale = 2.0**10
    amp = precision.Mixed("fp16", init_scale=scale)
    loop.train_step(model, optimizer, *batch(), amp=amp)
    assert sorted(seen) == [0, 1, 2, 3] and amp.skipped == 0
    for i, (old, p, ref) in enumerate(zip(before, model.parameters(), reference.parameters())):
        # backward started from S x the loss: S x float32's gradient, up to float16's rounding
        assert torch.allclose(seen[i], scale * ref.grad, rtol=0.02, atol=0.02 * scale * 1e-3)
        assert torch.equal(p.grad * scale, seen[i])  # unscaled before the step, exactly (S=2^k)
        assert torch.equal(p.detach(), old.add(p.grad, alpha=-0.1))  # stepped unscaled grads
    assert amp.scaler.get_scale() == scale  # no inf: the scale stays (it grows after 2000)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_fp16_skips_a_step_with_inf_or_nan_gradients_and_halves_the_scale(bad):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp = precision.Mixed("fp16", init_scale=2.0**10)
    loop.train_step(model, optimizer, *batch(0), amp=amp)  # a good step: momentum exists
    kept = [p.detach().clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    hook = model[0].bias.register_hook(lambda g: g + bad)
    loop.train_step(model, optimizer, *batch(1), amp=amp)
    hook.remove()
    assert amp.skipped == 1 and amp.scaler.get_scale() == 2.0**9
    for old, buffer, p in zip(kept, momentum, model.parameters()):
        assert torch.equal(p.detach(), old)  # not stepped: neither weights...
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffer)  # ...nor momentum
    loop.train_step(model, optimizer, *batch(2), amp=amp)  # finite again: it steps
    assert amp.skipped == 1 and amp.scaler.get_scale() == 2.0**9
    assert not torch.equal(model[0].weight.detach(), kept[0])


def test_fp32_is_the_plain_step_to_the_bit():
    def plain_step(model, optimizer, X, y):  # the course's step before --precision
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        optimizer.step()
        return loss.detach(), None

    X, y = data.mnist("train")
    runs = []
    for step_fn in (plain_step, loop.train_step):
        model = models.build("cnn", seed=0)
        optimizer = models.make_optimizer(model, 0.01)
        losses = [step_fn(model, optimizer, X[i : i + 32], y[i : i + 32])[0] for i in (0, 32, 64)]
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        runs.append((torch.stack(losses), weights))
    (plain_losses, plain_weights), (losses, weights) = runs
    assert torch.equal(losses, plain_losses) and torch.equal(weights, plain_weights)


def fsdp_steps(kind: str, steps: int) -> dict:
    """``steps`` FSDP2 steps of the transformer on this rank's half of each batch, with
    ``--precision kind``: the global losses, the bytes and dtypes handed to FSDP's all-gathers
    and reduce-scatters, the sharded parameters' dtypes and the bytes held after the step."""
    me = launch.worker()
    sent = Counter()
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def counted_gather(output, input, **options):
        sent["all-gather", str(input.dtype)] += input.numel() * input.element_size()
        return gather(output, input, **options)

    def counted_scatter(output, input, **options):
        sent["reduce-scatter", str(input.dtype)] += input.numel() * input.element_size()
        return scatter(output=output, input=input, **options)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter
    from torch.distributed.device_mesh import init_device_mesh

    model = sharding.apply(
        models.build("transformer", seed=0), init_device_mesh("cpu", (2,)), 1, kind
    )
    optimizer = models.make_optimizer(model, 1e-3, "adamw")
    X, y = data.mnist("train")
    X = models.prepare_input("transformer", X)
    amp, losses = precision.Mixed(kind), []
    for step in range(steps):
        rows = slice(32 * step + 16 * me.rank, 32 * step + 16 * (me.rank + 1))
        loss, _ = loop.train_step(model, optimizer, X[rows], y[rows], amp=amp)
        dist.all_reduce(loss)
        losses.append(loss.item() / 2)
        if step == 0:
            first = dict(sent)
    return {
        "losses": losses,
        "sent_first_step": {" ".join(k): v for k, v in first.items()},
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "held": sharding.state_bytes(model.parameters(), optimizer),
    }


def test_fsdp_bf16_gathers_half_the_bytes_reduces_fp32_and_stays_close_to_fp32():
    steps = 4
    fp32, bf16 = (
        launch.run(fsdp_steps, 2, kind, steps, timeout=180)[0] for kind in ("fp32", "bf16")
    )
    gathered = fp32["sent_first_step"]["all-gather torch.float32"]
    assert bf16["sent_first_step"] == {
        "all-gather torch.bfloat16": gathered // 2,  # parameters on the wire: half
        "reduce-scatter torch.float32": fp32["sent_first_step"]["reduce-scatter torch.float32"],
    }
    assert bf16["dtypes"] == fp32["dtypes"] == ["torch.float32"]  # the shards stay float32
    assert bf16["held"] == fp32["held"]  # and so does every byte held between steps
    # bfloat16 keeps 8 significant bits: each product rounds its inputs by up to U_BF16
    # (relative). Through the transformer's ~20 chained products the worst case adds up to
    # ~20 U, but the errors have either sign and average out over each dot product and over the
    # batch's mean loss: the loss stays within one rounding, U (0.4%). Measured: ~0.05 U.
    for ours, theirs in zip(bf16["losses"], fp32["losses"]):
        assert ours == pytest.approx(theirs, rel=U_BF16)
    print(
        f"fsdp losses fp32 {fp32['losses']}, bf16 {bf16['losses']}; bytes {bf16['sent_first_step']}"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp8"], "use one of fp32, bf16, fp16"),
        (["--precision", "bf16", "--parallel", "pipeline", "--nproc", "2"], "none, ddp or fsdp"),
        (["--precision", "bf16", "--parallel", "tp", "--nproc", "2"], "none, ddp or fsdp"),
        (["--precision", "fp16", "--parallel", "fsdp", "--nproc", "2"], "only this rank's shard"),
        (
            ["--precision", "fp16", "--parallel", "ddp", "--nproc", "2", "--compress", "bf16"],
            "scaled",
        ),
    ],
)
def test_precision_is_refused_in_one_line_where_it_cannot_run(args, message):
    with pytest.raises(UsageError, match=message) as refused:
        validate(parse(["--model", "transformer", *args]))
    assert "\n" not in str(refused.value)


def test_precision_runs_with_its_strategies_and_is_part_of_a_checkpoint_record():
    for args in (["--parallel", "ddp", "--nproc", "2"], ["--parallel", "fsdp", "--nproc", "2"]):
        validate(parse(["--precision", "bf16", *args]))
    validate(parse(["--precision", "fp16", "--parallel", "ddp", "--nproc", "2"]))
    assert RunConfig().precision == "fp32"
    assert RunConfig(precision="bf16").record()["precision"] == "bf16"


def test_the_command_line_trains_fsdp_in_bf16_close_to_fp32_and_ddp_in_fp16():
    # The whole path: --precision reaches FSDP's policy and every rank's step. bf16 rounds each
    # product's inputs to 8 bits of mantissa (2^-8 relative); the losses stay within that.
    from course_utils.train import run

    kw = dict(model="transformer", nproc=2, steps=4, batch_size=32, lr=1e-3, optimizer="adamw")
    fp32 = run(RunConfig(parallel="fsdp", **kw), progress=False)["losses"]
    bf16 = run(RunConfig(parallel="fsdp", precision="bf16", **kw), progress=False)["losses"]
    assert fp32 != bf16  # the policy did something
    assert bf16 == pytest.approx(fp32, rel=2**-8)
    fp16 = run(RunConfig(parallel="ddp", precision="fp16", **kw), progress=False)["losses"]
    assert fp16 != fp32 and fp16 == pytest.approx(fp32, rel=2**-8)
