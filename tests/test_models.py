import pytest
import torch

import course_utils as cu


@pytest.mark.parametrize(
    "name, shape",
    [("cnn", (5, 1, 28, 28)), ("rnn", (5, 28, 28)), ("transformer", (5, 1, 28, 28))],
)
def test_model_output_shapes(name, shape):
    model = cu.models.build(name, seed=0)
    logits = model(torch.randn(shape))
    assert logits.shape == (5, 10)
    # prepare_input turns the images of cu.data into what each model expects
    X, _ = cu.data.mnist("test", limit=5)
    assert model(cu.models.prepare_input(name, X)).shape == (5, 10)


def test_cnn_logits_can_be_negative():
    """The article put ReLU on the logits; the corrected CNN must not."""
    logits = cu.models.build("cnn", seed=0)(torch.randn(64, 1, 28, 28))
    assert (logits < 0).any()


def test_build_is_seeded_and_rejects_unknown_models():
    a, b = cu.models.build("cnn", seed=3), cu.models.build("cnn", seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="unknown model"):
        cu.models.build("resnet")


def test_the_course_rnn_starts_from_a_zero_state_of_the_shape_nn_rnn_wants():
    """The article's h0 of shape (hidden, batch) makes nn.RNN raise; the corrected RNN builds
    (num_layers, batch, hidden) zeros for whatever batch it is given."""
    model = cu.models.build("rnn", seed=0)
    x = torch.randn(4, 28, 28)
    with pytest.raises(RuntimeError):
        model.rnn(x, torch.zeros(model.hidden_size, 4))  # the article's shape
    out, h = model.rnn(x, torch.zeros(1, 4, model.hidden_size))
    assert out.shape == (4, 28, model.hidden_size) and h.shape == (1, 4, model.hidden_size)
    torch.testing.assert_close(model(x), model.fc(out[:, -1]))  # logits from the last step
    torch.testing.assert_close(model(x[:1]), model(x)[:1])  # one state per sample, any batch


def test_the_transformer_reads_16_patches_and_its_attention_is_standard():
    model = cu.models.build("transformer", seed=0)
    X = torch.randn(3, 1, 28, 28)
    tokens = model.tokens(X)  # 16 patches of 7x7, each embedded, plus its position
    assert tokens.shape == (3, 16, model.dim)
    patch = X[0, 0, 7:14, 14:21].reshape(-1)  # row 1, column 2 of the patch grid: token 6
    expected = model.embed(patch) + model.pos[0, 6]
    torch.testing.assert_close(tokens[0, 6], expected)
    # the course's attention equals PyTorch's nn.MultiheadAttention with the same weights
    attn = model.blocks[0].attn
    mha = torch.nn.MultiheadAttention(model.dim, model.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    torch.testing.assert_close(attn(tokens), mha(tokens, tokens, tokens)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        cu.models.build("transformer", dim=64, heads=5)


def test_make_optimizer_is_sgd_with_momentum_or_adamw_over_a_module_or_its_tensors():
    model = cu.models.build("cnn", seed=0)
    sgd = cu.models.make_optimizer(model, 0.1)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["foreach"]) == (
        0.1,
        0.9,
        True,
    )
    assert len(sgd.param_groups[0]["params"]) == len(list(model.parameters()))
    shards = list(model.parameters())[:2]  # ZeRO passes the tensors it owns, not a module
    adamw = cu.models.make_optimizer(shards, 1e-3, "adamw")
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    assert adamw.param_groups[0]["params"] == shards
    assert cu.models.OPTIMIZERS == ("sgd", "adamw")
    with pytest.raises(ValueError, match="one of sgd, adamw, got 'adam'"):
        cu.models.make_optimizer(model, 0.1, "adam")
