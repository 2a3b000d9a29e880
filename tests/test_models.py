import pytest
import torch

import course_utils as cu


@pytest.mark.parametrize("name, shape", [("cnn", (5, 1, 28, 28)), ("rnn", (5, 28, 28))])
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
        cu.models.build("transformer")


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
