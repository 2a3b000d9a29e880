"""cu.models.FormulaRNN (h_t = tanh(W x_t + U h_{t-1} + b), lesson 02) against torch.nn.RNN."""

import pytest
import torch

import course_utils as cu


def _pair(input_size: int, hidden_size: int, seed: int = 0):
    """A FormulaRNN and an nn.RNN(batch_first=True) holding the same weights."""
    torch.manual_seed(seed)
    reference = torch.nn.RNN(input_size, hidden_size, batch_first=True)
    formula = cu.models.FormulaRNN(input_size, hidden_size)
    formula.load_state_dict(reference.state_dict())  # same names, same shapes
    return formula, reference


@pytest.mark.parametrize("B, T, input_size, hidden_size", [(4, 28, 28, 16), (3, 5, 7, 11)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_formula_rnn_matches_nn_rnn(B, T, input_size, hidden_size, with_h0):
    formula, reference = _pair(input_size, hidden_size)
    torch.manual_seed(1)
    x = torch.randn(B, T, input_size)
    h0 = torch.randn(1, B, hidden_size) if with_h0 else None
    x_f, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_f, h_f = formula(x_f, h0)
    out_r, h_r = reference(x_r, h0)
    assert out_f.shape == (B, T, hidden_size) and h_f.shape == (1, B, hidden_size)
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(h_f, h_r)

    # The same loss through both: every parameter's gradient and the input's gradient agree.
    weights = torch.randn(B, T, hidden_size)
    ((out_f * weights).sum() + h_f.sum()).backward()
    ((out_r * weights).sum() + h_r.sum()).backward()
    grads_r = dict(reference.named_parameters())
    for name, p in formula.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, msg=f"gradient of {name}")
    torch.testing.assert_close(x_f.grad, x_r.grad)


def test_formula_rnn_state_dict_loads_into_nn_rnn():
    formula = cu.models.FormulaRNN(28, 8)
    reference = torch.nn.RNN(28, 8, batch_first=True)
    reference.load_state_dict(formula.state_dict())
    x = torch.randn(2, 6, 28)
    torch.testing.assert_close(formula(x)[0], reference(x)[0])


def test_course_rnn_reads_rows_and_returns_logits():
    model = cu.models.RNN()
    logits = model(torch.randn(5, 28, 28))  # (B, T=28 rows, 28 features)
    assert logits.shape == (5, 10)
    X, _ = cu.data.mnist("test", limit=3)
    assert model(cu.data.as_sequence(X)).shape == (3, 10)


def test_lesson_02_rnn_by_hand_is_formula_rnn():
    # The loop lesson 02 writes by hand (its cell `def rnn_by_hand`) computes what the package's
    # FormulaRNN computes, with the same W, U and b = bias_ih + bias_hh.
    import json

    from conftest import ROOT

    cells = json.loads((ROOT / "notebooks" / "02_rnn_single_device.ipynb").read_text())["cells"]
    source = next(
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and "".join(c["source"]).startswith("def rnn_by_hand")
    )
    namespace = {"torch": torch}
    exec(source, namespace)
    formula, _ = _pair(7, 5, seed=3)
    x = torch.randn(3, 6, 7)
    b = formula.bias_ih_l0 + formula.bias_hh_l0
    states = namespace["rnn_by_hand"](x, formula.weight_ih_l0, formula.weight_hh_l0, b)
    out, h_T = formula(x)
    torch.testing.assert_close(states, out)
    torch.testing.assert_close(states[:, -1], h_T[0])
