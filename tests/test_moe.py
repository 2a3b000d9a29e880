"""The mixture of experts (lesson 10) on one process: gating, capacity and which choices are
dropped, the balancing loss against its definition, the layer against its experts run by hand,
and the model's forward, backward and training."""

import copy

import pytest
import torch
import torch.nn.functional as F

import course_utils as cu
from course_utils import moe


def test_gate_takes_the_top_k_and_renormalises_only_several():
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.05, 0.05, 0.5]], requires_grad=True)
    weights, chosen = moe.gate(probs, 1)
    assert chosen.tolist() == [[1], [3]]
    torch.testing.assert_close(weights, torch.tensor([[0.6], [0.5]]))  # the probability itself
    weights.sum().backward()  # so the task loss reaches the router
    assert probs.grad[0, 1] == 1 and probs.grad[1, 3] == 1
    weights, chosen = moe.gate(probs, 2)
    assert chosen.tolist() == [[1, 2], [3, 0]]  # best first
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25], [0.5 / 0.9, 0.4 / 0.9]]))


def test_capacity_is_the_ceiling_of_factor_times_an_even_share():
    assert moe.capacity(tokens=128, experts=4, top_k=1, capacity_factor=1.25) == 40
    assert moe.capacity(tokens=10, experts=4, top_k=2, capacity_factor=1.0) == 5
    assert moe.capacity(tokens=7, experts=4, top_k=1, capacity_factor=1.0) == 2  # 1.75 -> 2
    assert moe.capacity(tokens=100, experts=2, top_k=1, capacity_factor=1.1) == 55  # not 56
    assert moe.capacity(tokens=100, experts=8, top_k=2, capacity_factor=0.5) == 13  # 12.5


def test_the_first_choices_in_token_order_are_kept():
    chosen = torch.tensor([[0], [0], [1], [0], [2], [0]])
    keep = moe.keep_mask(chosen, experts=3, capacity=2)
    assert keep.flatten().tolist() == [True, True, True, False, True, False]
    earlier = moe.keep_mask(chosen, experts=3, capacity=2, before=torch.tensor([1, 0, 2]))
    assert earlier.flatten().tolist() == [True, False, True, False, False, False]
    # top-2: token 0's two choices, then token 1's, ...: expert 0 is full at token 2
    two = moe.keep_mask(torch.tensor([[0, 1], [1, 0], [0, 2]]), experts=3, capacity=2)
    assert two.tolist() == [[True, True], [True, True], [False, True]]
    counts = torch.tensor([[3, 1, 1], [2, 2, 0]])  # two ranks' choices per expert
    assert moe.kept_counts(counts, capacity=4).tolist() == [[3, 1, 1], [1, 2, 0]]


def test_ranks_that_know_the_earlier_counts_drop_what_one_process_drops():
    torch.manual_seed(0)
    chosen = torch.multinomial(torch.tensor([0.5, 0.3, 0.15, 0.05]), 64, True).view(32, 2)
    whole = moe.keep_mask(chosen, experts=4, capacity=9)
    parts = chosen.chunk(4)  # four ranks' tokens, in the global order
    counts = torch.stack([torch.bincount(p.flatten(), minlength=4) for p in parts])
    kept = moe.kept_counts(counts, capacity=9)
    for rank, part in enumerate(parts):
        mine = moe.keep_mask(part, experts=4, capacity=9, before=counts[:rank].sum(0))
        assert torch.equal(mine, whole[8 * rank : 8 * (rank + 1)]), rank
        kept_here = torch.bincount(part[mine], minlength=4)
        assert torch.equal(kept_here, kept[rank]), rank
    assert not whole.all() and (kept.sum(0) <= 9).all()


def test_the_balancing_loss_is_its_definition_and_one_when_even():
    even = torch.stack([torch.tensor([0.7, 0.1, 0.1, 0.1]).roll(i) for i in range(8)])
    routed = torch.bincount(even.argmax(1), minlength=4)  # 2 each
    assert moe.balancing_loss(even, routed).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)  # every token to expert 0
    routed = torch.bincount(skewed.argmax(1), minlength=4)
    assert moe.balancing_loss(skewed, routed).item() == pytest.approx(4 * 0.7)
    torch.manual_seed(0)
    probs = F.softmax(torch.randn(10, 5), dim=1).requires_grad_()
    routed = torch.tensor([4, 0, 3, 2, 1])
    loss = moe.balancing_loss(probs, routed)
    f, P = routed / routed.sum(), probs.mean(0)
    assert loss.item() == pytest.approx(5 * (f * P).sum().item())
    loss.backward()  # through P only: d loss / d probs[i, e] = experts * f_e / N
    torch.testing.assert_close(probs.grad, (5 * f / 10).expand(10, 5))
    layer = moe.MoE(8, 16)
    torch.nn.init.zeros_(layer.router.weight)
    torch.nn.init.zeros_(layer.router.bias)
    layer(torch.randn(3, 5, 8))  # a perfectly uniform router
    assert layer.aux_loss.item() == pytest.approx(1.0)


def by_hand(layer: moe.MoE, x: torch.Tensor):
    """The layer's output, token after token: each kept choice's expert run on the token alone,
    weighted; and the choices each expert kept."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = F.softmax(layer.router(tokens), dim=1)
    cap = moe.capacity(len(tokens), layer.experts, layer.top_k, layer.capacity_factor)
    taken, outputs = [0] * layer.experts, []
    for token, p in zip(tokens, probs):
        top = p.topk(layer.top_k)
        out = torch.zeros_like(token)
        weights = top.values if layer.top_k == 1 else top.values / top.values.sum()
        for weight, e in zip(weights, top.indices.tolist()):
            if taken[e] < cap:
                taken[e] += 1
                hidden = F.gelu(token @ layer.w1[e] + layer.b1[e])
                out = out + weight * (hidden @ layer.w2[e] + layer.b2[e])
        outputs.append(out)
    return torch.stack(outputs).view_as(x), taken


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_layer_equals_its_experts_run_by_hand_with_choices_dropped(top_k):
    torch.manual_seed(0)
    layer = moe.MoE(8, 16, experts=4, top_k=top_k, capacity_factor=0.6)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([1.5, 0.5, 0.0, -1.0]))  # a favourite expert
    x = torch.randn(3, 10, 8)
    y = layer(x)
    expected, taken = by_hand(layer, x)
    torch.testing.assert_close(y, expected)
    assert layer.stats["kept"].tolist() == taken
    assert layer.stats["routed"].sum() == 30 * top_k
    assert layer.stats["dropped"] == 30 * top_k - sum(taken) > 0
    assert layer.stats["capacity"] == moe.capacity(30, 4, top_k, 0.6)
    signal = torch.randn_like(y)
    grads = torch.autograd.grad((y * signal).sum(), list(layer.parameters()))
    hand = torch.autograd.grad((expected * signal).sum(), list(layer.parameters()))
    for (name, _), g, h in zip(layer.named_parameters(), grads, hand):
        torch.testing.assert_close(g, h, msg=name)


def test_bad_layers_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        moe.MoE(8, 16, experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.MoE(8, 16, capacity_factor=0.0)


def test_the_model_runs_forward_and_backward_and_adds_its_balancing_losses():
    X, y = cu.data.mnist("train", limit=16)
    plain = cu.models.build("transformer", seed=0)
    plain(X)
    assert moe.auxiliary_loss(plain) == 0.0  # no mixture of experts: nothing to add
    torch.manual_seed(0)
    model = moe.MoETransformer(depth=2, top_k=2, aux_weight=0.05)
    assert moe.auxiliary_loss(model) == 0.0  # before any forward
    logits = model(X)
    assert logits.shape == (16, 10)
    layers = moe.moe_layers(model)
    assert len(layers) == 2 and all(not hasattr(b.mlp, "fc1") for b in model.blocks)
    aux = moe.auxiliary_loss(model)
    assert aux.item() == pytest.approx(0.05 * sum(layer.aux_loss.item() for layer in layers))
    (F.cross_entropy(logits, y) + aux).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
    for layer in layers:
        stats = layer.stats
        assert stats["routed"].sum() == 16 * 16 * 2  # 16 images x 16 tokens x 2 choices
        assert (stats["kept"] <= stats["capacity"]).all()
        assert stats["dropped"] == (stats["routed"] - stats["kept"]).sum()
        assert layer.router.weight.grad.abs().sum() > 0
    copy.deepcopy(model)  # the last forward's graph is not part of the model


def test_the_model_learns_mnist():
    X, y = cu.data.mnist("train", limit=2000)
    torch.manual_seed(0)
    model = moe.MoETransformer(depth=2)
    optimizer = cu.models.make_optimizer(model, lr=2e-3, kind="adamw")

    def step(model, optimizer, X, y):
        optimizer.zero_grad(set_to_none=True)
        logits = model(X)
        loss = F.cross_entropy(logits, y)
        (loss + moe.auxiliary_loss(model)).backward()
        optimizer.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    batches = cu.data.batches(X, y, batch_size=64, num_steps=60)
    history = cu.loop.fit(model, optimizer, batches, 60, step_fn=step, progress=False)
    first, last = history.losses[:10], history.losses[-10:]
    assert sum(last) < 0.6 * sum(first), (first, last)
