"""Gradient compression (course_utils.compression): each DDP hook on 2 gloo workers against its
definition, computed here in one process from both ranks' own gradients; the command line's
--compress, its training and its refusals."""

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from course_utils import compression, launch
from course_utils.config import RunConfig, UsageError, parse, validate
from course_utils.train import run

STEPS = 4


def tiny_model() -> nn.Module:
    """Two layers whose matrices are all wider than 2 (PowerSGD then orthogonalizes by QR)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 4))


def loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank, each step: other data
    x, target = torch.randn(6, 30, generator=g), torch.randn(6, 4, generator=g)
    return (model(x) - target).pow(2).mean()


def compressed_steps(make_state, hook) -> dict:
    """STEPS backward passes of a DDP model on fixed weights (no optimizer step), with ``hook``:
    this rank's own gradients (taken before DDP sees them), the averaged ones and the residuals
    after each step, by parameter; and the bytes the hook counted."""
    me = launch.worker()
    model = tiny_model()
    trained = DistributedDataParallel(model)
    tally = make_state()
    trained.register_comm_hook(tally, hook)
    params = list(model.parameters())
    steps = []
    for step in range(STEPS):
        own = torch.autograd.grad(loss(model, step, me.rank), params)  # the module, not DDP
        trained.zero_grad(set_to_none=True)
        loss(trained, step, me.rank).backward()
        residual = getattr(tally, "residual", {})
        zero = [torch.zeros_like(p) for p in params]
        steps.append(
            {
                "own": [g.clone() for g in own],
                "out": [p.grad.clone() for p in params],
                "residual": [
                    residual[p].clone() if p in residual else z for p, z in zip(params, zero)
                ],
            }
        )
    return {"steps": steps, "sent": tally.sent}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def shapes(ranks) -> list[torch.Size]:
    return [g.shape for g in ranks[0]["steps"][0]["own"]]


def per_param(vector: torch.Tensor, like) -> list[torch.Tensor]:
    return [piece.view_as(t) for piece, t in zip(vector.split([t.numel() for t in like]), like)]


def assert_steps(ranks, definition, exact=True):
    """Every step's averaged gradients and residuals on both ranks equal ``definition(v)``'s,
    where v = own gradient + the residual the definition kept from the step before."""
    kept = [torch.zeros(flat(ranks[0]["steps"][0]["own"]).numel()) for _ in ranks]
    for step in range(STEPS):
        mine = [r["steps"][step] for r in ranks]
        v = [flat(m["own"]) + e for m, e in zip(mine, kept)]
        out, kept = definition(v)
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-7}
        for m, e in zip(mine, kept):
            torch.testing.assert_close(flat(m["out"]), out, **tolerance)
            torch.testing.assert_close(flat(m["residual"]), e, **tolerance)
    return kept


def test_topk_sends_the_largest_values_and_keeps_the_rest_as_its_residual():
    fraction = 0.1
    ranks = launch.run(
        compressed_steps, 2, lambda: compression.TopK(fraction), compression.topk, timeout=120
    )
    n = flat(ranks[0]["steps"][0]["own"]).numel()
    k = math.ceil(fraction * n)

    def definition(v):
        sent = []
        for vector in v:
            largest = vector.abs().argsort(descending=True)[:k]
            s = torch.zeros_like(vector)
            s[largest] = vector[largest]
            sent.append(s)
        return (sent[0] + sent[1]) / 2, [vector - s for vector, s in zip(v, sent)]

    kept = assert_steps(ranks, definition)
    assert all(e.abs().sum() > 0 for e in kept)  # something was held back
    assert ranks[0]["sent"] == [8 * k] * STEPS  # k float32 values and k int32 positions: one bucket
    assert compression.payload_bytes(f"topk:{fraction}", shapes(ranks)) == 8 * k


def test_sign_sends_one_bit_a_value_and_one_scale_and_keeps_what_it_lost():
    ranks = launch.run(compressed_steps, 2, compression.Feedback, compression.sign, timeout=120)
    n = flat(ranks[0]["steps"][0]["own"]).numel()

    def definition(v):
        sent = [torch.where(vector >= 0, 1.0, -1.0) * vector.abs().mean() for vector in v]
        return (sent[0] + sent[1]) / 2, [vector - s for vector, s in zip(v, sent)]

    assert_steps(ranks, definition, exact=False)  # the mean's sum runs in the bucket's order
    assert ranks[0]["sent"] == [4 + math.ceil(n / 8)] * STEPS
    assert compression.payload_bytes("sign", shapes(ranks)) == 4 + math.ceil(n / 8)


def test_bf16_is_the_average_of_the_gradients_rounded_to_bf16():
    ranks = launch.run(compressed_steps, 2, compression.Tally, compression.bf16, timeout=120)
    for step in range(STEPS):
        own = [flat(r["steps"][step]["own"]) for r in ranks]
        halves = [(g.bfloat16() / 2) for g in own]  # PyTorch's hook divides, then all-reduces
        expected = (halves[0] + halves[1]).float()  # a bfloat16 sum: one rounding
        for r in ranks:
            torch.testing.assert_close(flat(r["steps"][step]["out"]), expected, rtol=0, atol=0)
        exact = (own[0] + own[1]) / 2
        assert not torch.equal(expected, exact)  # the rounding is real
        bound = 2**-8 * (own[0].abs() + own[1].abs())  # 8 bits: 2^-9 a rounding, three of them
        assert ((expected - exact).abs() <= bound).all()
    n = flat(ranks[0]["steps"][0]["own"]).numel()
    assert ranks[0]["sent"] == [2 * n] * STEPS
    assert compression.payload_bytes("bf16", shapes(ranks)) == 2 * n


def powersgd_state(rank: int):
    return lambda: compression.PowerSGD(rank, min_compression_rate=0)  # every matrix


@pytest.mark.parametrize("rank", [1, 8])
def test_powersgd_keeps_what_it_did_not_send_and_at_full_rank_sends_the_average(rank):
    ranks = launch.run(compressed_steps, 2, powersgd_state(rank), compression.powersgd, timeout=120)
    shapes = [g.shape for g in ranks[0]["steps"][0]["own"]]
    kept = [torch.zeros(flat(ranks[0]["steps"][0]["own"]).numel()) for _ in ranks]
    for step in range(STEPS):
        mine = [r["steps"][step] for r in ranks]
        own = [flat(m["own"]) for m in mine]
        out = flat(mine[0]["out"])
        torch.testing.assert_close(flat(mine[1]["out"]), out, rtol=0, atol=0)  # one gradient
        if step < 2:  # start_iter: DDP regroups its buckets after the first step
            torch.testing.assert_close(out, (own[0] + own[1]) / 2, rtol=1e-6, atol=1e-8)
            continue
        for m, g, e in zip(mine, own, kept):  # error feedback: e = (g + e before) - what arrived
            torch.testing.assert_close(flat(m["residual"]), g + e - out, rtol=1e-5, atol=1e-6)
        kept = [flat(m["residual"]) for m in mine]
        average = (own[0] + own[1]) / 2
        if rank >= min(min(s) for s in shapes if len(s) == 2):  # R >= every min(n, m): exact
            torch.testing.assert_close(out, average, rtol=1e-4, atol=1e-6)
        else:  # a rank-1 view of each weight matrix, not the average
            for piece, shape in zip(per_param(out, mine[0]["out"]), shapes):
                if len(shape) == 2:
                    assert torch.linalg.matrix_rank(piece) == 1
            assert (out - average).abs().max() > 1e-3
    values = 0  # P (n x R) and Q (m x R) of every gradient viewed as n x m (a bias: m = 1)
    for shape in shapes:
        n, m = shape[0], math.prod(shape[1:])
        values += (n + m) * min(n, m, rank)
    n = flat(ranks[0]["steps"][0]["own"]).numel()
    assert ranks[0]["sent"] == [4 * n, 4 * n, 4 * values, 4 * values]
    every = compression.payload_bytes(f"powersgd:{rank}", shapes, min_compression_rate=0)
    assert every == 4 * values
    by_default = compression.payload_bytes(f"powersgd:{rank}", shapes)  # gains 2x or plain
    assert by_default < 4 * n if rank == 1 else by_default == 4 * n  # full rank gains nothing


def test_packed_signs_unpack_to_themselves():
    positive = torch.rand(21) > 0.5
    packed = compression.pack_signs(positive)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(compression.unpack_signs(packed, 21), positive)


def losses(**kwargs) -> list[float]:
    cfg = RunConfig(model="cnn", batch_size=32, steps=8, **kwargs)
    validate(cfg)
    return run(cfg, progress=False)["losses"]


def test_the_command_line_trains_with_every_hook_and_none_is_plain_ddp():
    single = losses()
    plain = losses(parallel="ddp", nproc=2, compress="none")
    torch.testing.assert_close(plain, single, rtol=1e-4, atol=0)  # DDP's own all-reduce
    bf16 = losses(parallel="ddp", nproc=2, compress="bf16")
    torch.testing.assert_close(bf16, single, rtol=2e-2, atol=0)  # rounded, not another path
    assert bf16 != plain
    for compress in ("powersgd:2", "topk:0.05", "sign"):
        trained = losses(parallel="ddp", nproc=2, compress=compress)
        plain_steps = 3 if compress.startswith("powersgd") else 1  # it all-reduces 2 steps first
        assert trained[:plain_steps] == pytest.approx(plain[:plain_steps], rel=1e-4), compress
        assert trained != plain, compress  # compressed
        assert sum(trained[-3:]) < sum(trained[:3]), (compress, trained)  # and learning


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compress", "zip"], "--compress zip: use none, bf16, powersgd:R"),
        (["--compress", "powersgd"], "--compress powersgd: use"),
        (["--compress", "powersgd:0"], "--compress powersgd:0: use"),
        (["--compress", "topk:1.5"], "--compress topk:1.5: use"),
        (["--compress", "sign:3"], "--compress sign:3: use"),
        (["--parallel", "fsdp", "--compress", "bf16"], "this run is --parallel fsdp"),
        (
            ["--tp", "2", "--nproc", "4", "--model", "transformer"],
            "this run is --parallel ddp --tp 2",
        ),
        (["--nproc", "1"], "needs 2 or more DDP replicas"),
        (["--checkpoint", "CK"], "checkpoints don't save"),
    ],
)
def test_compression_is_refused_in_one_line_where_it_cannot_run(args, message, tmp_path):
    argv = ["--parallel", "ddp", "--nproc", "2", "--compress", "sign", *args]
    argv = [str(tmp_path / "ck") if a == "CK" else a for a in argv]
    with pytest.raises(UsageError, match=None) as refused:
        validate(parse(argv))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_refuses_compression_with_fsdp_before_anything_starts(cli):
    done = cli("--parallel", "fsdp", "--nproc", "2", "--compress", "bf16", "--steps", "1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--compress is for --parallel ddp alone" in done.stderr


def test_bf16_keeps_nothing_between_steps_and_may_checkpoint(tmp_path):
    cfg = parse(["--parallel", "ddp", "--nproc", "2", "--compress", "bf16"])
    cfg.checkpoint = str(tmp_path / "ck")
    validate(cfg)  # no residuals: a resumed run continues exactly
    assert cfg.record()["compress"] == "bf16"  # and a checkpoint remembers it
