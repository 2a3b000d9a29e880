"""Expert parallelism (lesson 10): the experts split over ranks, tokens dispatched and combined by
all-to-all with uneven splits, equal to one process on the global batch: outputs, which choices
are dropped, the balancing loss and the gradients; and the configurations it refuses."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import course_utils as cu
from course_utils import expert_parallel, moe

SIZES = dict(dim=32, heads=4, hidden=32, depth=2, experts=4)
BIAS = torch.tensor([1.5, 0.5, 0.0, -1.0])  # a router that favours expert 0: uneven splits
IMAGES = 8  # the global batch: 8 images of 16 tokens


def build(top_k: int, capacity_factor: float) -> moe.MoETransformer:
    torch.manual_seed(0)
    model = moe.MoETransformer(**SIZES, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        for layer in moe.moe_layers(model):
            layer.router.bias.copy_(BIAS)
    return model


def forward_backward(model, X, y) -> dict:
    logits = model(X)
    loss = F.cross_entropy(logits, y) + moe.auxiliary_loss(model)
    loss.backward()
    layers = moe.moe_layers(model)
    return {
        "logits": logits.detach(),
        "loss": loss.item(),
        "aux": [layer.aux_loss.item() for layer in layers],
        "keep": [layer.routing.keep for layer in layers],
        "stats": [
            {k: torch.as_tensor(v).tolist() for k, v in layer.stats.items()} for layer in layers
        ],
    }


def one_process(top_k: int, capacity_factor: float) -> tuple[dict, dict]:
    model = build(top_k, capacity_factor)
    out = forward_backward(model, *cu.data.mnist("train", limit=IMAGES))
    return out, {name: p.grad for name, p in model.named_parameters()}


def expert_parallel_worker(dp: int, ep: int, top_k: int, capacity_factor: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    model = expert_parallel.apply(build(top_k, capacity_factor), mesh)
    rank = mesh["dp"].get_local_rank() * ep + mesh["ep"].get_local_rank()  # its data rank
    X, y = cu.data.mnist("train", limit=IMAGES)
    mine = cu.data.shard(torch.arange(IMAGES), rank, dp * ep)  # its slice of the global batch
    calls = expert_parallel.COMM["calls"]
    out = forward_backward(model, X[mine], y[mine])
    out["calls"] = expert_parallel.COMM["calls"] - calls
    layer = moe.moe_layers(model)[0]
    out["local_experts"] = layer.w1.to_local().shape[0]
    out["rank"] = rank
    # data parallel's part (DDP over all data ranks): every parameter but the experts, which
    # apply() averaged over the ranks that hold the same experts
    experts = {id(p) for p in expert_parallel.expert_parameters(model)}
    for param in model.parameters():
        if id(param) not in experts:
            dist.all_reduce(param.grad)
            param.grad /= dp * ep
    out["grads"] = {
        name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for name, p in model.named_parameters()
    }
    return out


@pytest.mark.filterwarnings("ignore:4 workers on")  # 4 ranks on fewer cores: still exact
@pytest.mark.parametrize(
    "dp, ep, top_k", [(1, 2, 1), (2, 2, 2)], ids=["ep 2, top-1", "dp 2 x ep 2, top-2"]
)
def test_expert_parallel_equals_one_process_with_choices_dropped(dp, ep, top_k):
    capacity_factor = 0.75  # small enough that the favourite expert drops choices
    one, grads = one_process(top_k, capacity_factor)
    args = (dp, ep, top_k, capacity_factor)
    results = cu.launch.run(
        expert_parallel_worker, dp * ep, *args, device="cpu", threads=1, oversubscribe=True
    )
    results = sorted(results, key=lambda r: r["rank"])
    for stats in one["stats"]:
        assert stats["dropped"] > 0  # the test would not see dropping otherwise
        assert len(set(stats["kept"])) > 1  # nor uneven splits
    logits = torch.cat([r["logits"] for r in results])
    torch.testing.assert_close(logits, one["logits"], rtol=1e-4, atol=1e-5)
    for i in range(SIZES["depth"]):  # which choices each layer dropped: exactly one process's
        assert torch.equal(torch.cat([r["keep"][i] for r in results]), one["keep"][i]), i
    for r in results:
        assert r["stats"] == one["stats"]  # the whole batch's counts, known on every rank
        assert r["local_experts"] == SIZES["experts"] // ep
        assert r["calls"] == 4 * SIZES["depth"]  # dispatch, combine; and both in backward
        for name, g in grads.items():  # averaged over the data ranks, the experts gathered
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    mean = torch.tensor([r["aux"] for r in results]).mean(0)  # what data parallel averages
    torch.testing.assert_close(mean, torch.tensor(one["aux"]), rtol=1e-5, atol=0)
    loss = sum(r["loss"] for r in results) / len(results)
    assert loss == pytest.approx(one["loss"], rel=1e-5)


def uneven_exchange() -> tuple:
    """An uneven all-to-all and its gradient (:class:`expert_parallel.AllToAll`): rank 0 sends
    one row to itself and one to rank 1, rank 1 two rows to itself and none to rank 0; then a
    rank with nothing to send (every choice dropped) still takes part."""
    rank = dist.get_rank()
    send = [0, 2] if rank == 1 else [1, 1]
    recv = [1, 0] if rank == 0 else [1, 2]
    x = torch.arange(sum(send) * 3, dtype=torch.float32).view(-1, 3) + 100 * rank
    x.requires_grad_()
    before = dict(expert_parallel.COMM)
    out = expert_parallel.AllToAll.apply(x, send, recv, None)
    (out * (1 + torch.arange(len(out))[:, None])).sum().backward()
    sent = {k: expert_parallel.COMM[k] - before[k] for k in ("calls", "bytes")}
    nothing = torch.ones(0 if rank == 0 else 2, 3)
    received = expert_parallel.all_to_all(nothing, [0, 0] if rank == 0 else [1, 1], [0, 1], None)
    return out.detach().tolist(), x.grad.tolist(), sent, len(received)


def test_an_uneven_all_to_all_and_its_gradient_go_both_ways():
    results = cu.launch.run(uneven_exchange, 2, device="cpu", threads=1)
    (out0, grad0, sent0, got0), (out1, grad1, sent1, got1) = results
    assert out0 == [[0.0, 1.0, 2.0]]  # rank 0's first row, kept
    assert out1 == [[3.0, 4.0, 5.0], [100.0, 101.0, 102.0], [103.0, 104.0, 105.0]]
    # each row's gradient comes back from where it went: its position there, plus 1
    assert grad0 == [[1.0] * 3, [1.0] * 3] and grad1 == [[2.0] * 3, [3.0] * 3]
    # one row of 3 float32 left each rank: rank 0's going forward, its gradient coming back
    assert sent0 == sent1 == {"calls": 2, "bytes": 12}
    assert got0 == got1 == 1


def test_bad_expert_parallel_settings_are_one_line(monkeypatch):
    monkeypatch.setitem(cu.models.MODELS, "moe", moe.MoETransformer)
    error = expert_parallel.config_error
    assert error("moe", 2, 4) is None
    assert error("moe", 4, 4, experts=8, top_k=2) is None
    assert "has no mixture-of-experts layers (--ep needs: moe)" in error("transformer", 2, 2)
    assert "not a multiple of the expert-parallel size 3" in error("moe", 3, 4)
    assert "4 experts do not divide among 3" in error("moe", 3, 3)
    assert "top-k 5 must be between 1 and the number of experts (4)" in error("moe", 2, 2, top_k=5)
