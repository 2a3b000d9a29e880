"""The article's CNN and RNN, corrected, and an RNN written straight from its formula.

The source article's code had three bugs, fixed here. The course numbers them once, and lessons 01
(bugs 1 and 2, the CNN) and 02 (bug 3, the RNN) use the same numbers:

1. it calls ``F.relu`` without ``import torch.nn.functional as F`` (a NameError on first use);
2. it applies ReLU to the CNN's output layer: logits must be free to be negative, and a ReLU there
   zeroes every negative score (and its gradient), so some classes can stop learning;
3. its RNN cannot run: (a) it builds the initial state as ``(hidden_size, batch)``, where
   ``nn.RNN`` wants ``(num_layers, batch, hidden_size)``; (b) it sets ``input_size=10``, where an
   MNIST row has 28 pixels.

The CNN's ``x.view(-1, 64 * 7 * 7)`` is not counted as a bug (it is right for 28x28 images), but it
turns a wrongly sized input into a wrong batch size without an error; ``flatten(1)`` fails loudly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F  # bug 1: the article forgot this import

from course_utils.data import as_sequence


class CNN(nn.Module):
    """The article's CNN: two 5x5 conv + ReLU + 2x2 max-pool blocks, then one linear layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=1, out_channels=32, kernel_size=5, stride=1, padding=2)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(in_channels=32, out_channels=64, kernel_size=5, stride=1, padding=2)
        self.fc = nn.Linear(in_features=64 * 7 * 7, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # (B, 1, 28, 28) -> (B, 32, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # -> (B, 64, 7, 7)
        x = x.flatten(1)  # -> (B, 3136); the article's view(-1, 3136) hides a wrong input shape
        return self.fc(x)  # bug 2 fixed: logits, no ReLU


class RNN(nn.Module):
    """The article's RNN classifier: an ``nn.RNN`` over the rows, a linear layer on the last state."""

    def __init__(self, input_size: int = 28, hidden_size: int = 128, output_size: int = 10):
        super().__init__()
        self.hidden_size = hidden_size
        self.rnn = nn.RNN(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, input_size). Bug 3 fixed: h0 is (num_layers, B, hidden_size).
        h0 = torch.zeros(self.rnn.num_layers, x.size(0), self.hidden_size, device=x.device)
        out, _ = self.rnn(x, h0)  # out: (B, T, hidden_size)
        return self.fc(out[:, -1, :])  # (B, output_size), from the last time step


class FormulaRNN(nn.Module):
    """h_t = tanh(W x_t + U h_{t-1} + b), one time step after another (lesson 02).

    Parameters are named and shaped like ``nn.RNN``'s (``weight_ih_l0`` is W, ``weight_hh_l0`` is U,
    and the formula's b is ``bias_ih_l0 + bias_hh_l0``), so the same state dict loads into both.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        k = hidden_size**-0.5  # nn.RNN's initialisation: U(-1/sqrt(H), 1/sqrt(H))
        self.weight_ih_l0 = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-k, k))
        self.weight_hh_l0 = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-k, k))
        self.bias_ih_l0 = nn.Parameter(torch.empty(hidden_size).uniform_(-k, k))
        self.bias_hh_l0 = nn.Parameter(torch.empty(hidden_size).uniform_(-k, k))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        """x: (B, T, input_size) → (outputs (B, T, H), h_T (1, B, H)), as ``nn.RNN(batch_first=True)``."""
        W, U = self.weight_ih_l0, self.weight_hh_l0
        b = self.bias_ih_l0 + self.bias_hh_l0
        h = x.new_zeros(x.size(0), self.hidden_size) if h0 is None else h0[0]  # (B, H)
        outputs = []
        for t in range(x.size(1)):  # time steps depend on each other: this loop can't be parallel
            h = torch.tanh(x[:, t] @ W.T + h @ U.T + b)  # (B, H)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h.unsqueeze(0)


MODELS = {"cnn": CNN, "rnn": RNN}


def build(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model by name (``"cnn"`` or ``"rnn"``), its weights drawn from ``seed`` when given."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose from {sorted(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name]()


def prepare_input(name: str, X: torch.Tensor) -> torch.Tensor:
    """Images as the model wants them: (N, 1, 28, 28) for the CNN, (N, 28, 28) rows for the RNN."""
    return as_sequence(X) if name == "rnn" else X


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
