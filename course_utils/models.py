"""The article's CNN and RNN, corrected, an RNN written straight from its formula, and a small
transformer (lessons 06-09: many identical blocks, the model that pipeline and tensor parallelism
are made for); and how the course trains them (:func:`make_optimizer`: SGD with momentum, or
AdamW).

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
        h0 = torch.zeros(
            self.rnn.num_layers, x.size(0), self.hidden_size, device=x.device, dtype=x.dtype
        )
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


class Attention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections, so that
    tensor parallelism can split it by heads (lesson 09): each rank computes some heads. The
    number of heads is read from the projections' width, so the same code runs whole or split.
    ``causal``: each token attends to itself and the tokens before it only. ``attend``: the
    attention of (q, k, v), each (B, heads, T, head_dim); None for PyTorch's own. Context
    parallelism puts ring attention there (lesson 10), over the tokens a rank holds."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not divide into {heads} heads")
        self.head_dim, self.causal = dim // heads, causal
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attend = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, dim)
        q, k, v = (
            f(x).view(B, T, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        if self.attend is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = self.attend(q, k, v)  # (B, heads, T, head_dim)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    """The block's feed-forward part: dim -> hidden -> dim, GELU between."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (B, T, hidden) in between


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, causal)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small vision transformer for MNIST: 7x7 patches as 16 tokens, a learned position per
    token, ``depth`` pre-norm blocks, the tokens' mean, a linear head (Dosovitskiy et al. 2020,
    "An Image is Worth 16x16 Words", arXiv:2010.11929, at the size of a laptop).

    Context parallelism (lesson 10) gives each rank some of the tokens: ``positions`` (None: all
    of them) picks which, and ``pool`` (None: the mean over the tokens) turns the rank's tokens
    into one vector per image, summing over the ranks that hold the others."""

    def __init__(
        self,
        dim: int = 64,
        heads: int = 4,
        hidden: int = 256,
        depth: int = 4,
        patch: int = 7,
        causal: bool = False,
    ):
        super().__init__()
        if 28 % patch:
            raise ValueError(f"patch {patch} does not tile a 28x28 image")
        self.patch, self.dim, self.heads = patch, dim, heads
        self.seq_len = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, self.seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, causal) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)
        self.positions: torch.Tensor | None = None
        self.pool = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> embedded patches with their positions (B, T, dim), row by
        row (raster order); only those at ``positions`` when set."""
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)  # (B, T, p*p)
        if self.positions is None:
            return self.embed(patches) + self.pos
        return self.embed(patches[:, self.positions]) + self.pos[:, self.positions]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.head(h.mean(dim=1) if self.pool is None else self.pool(h))  # (B, 10)


class PixelTransformer(Transformer):
    """MNIST as a long sequence (lesson 10): the image read row by row in 2x2 patches, 196
    tokens, with causal attention (each token sees only the patches above and left of it, as an
    image GPT reads them), then the tokens' mean and a linear head. Attention costs T^2: at 196
    tokens it dominates, where the 16 tokens of :class:`Transformer` hardly count."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2):
        super().__init__(dim, heads, hidden, depth, patch=2, causal=True)


MODELS = {"cnn": CNN, "rnn": RNN, "transformer": Transformer, "pixels": PixelTransformer}


def build(name: str, seed: int | None = None, **sizes) -> nn.Module:
    """A fresh model by name (``"cnn"``, ``"rnn"``, ``"transformer"``, ``"pixels"``), its weights drawn from
    ``seed`` when given; ``sizes`` go to its constructor (e.g. the transformer's ``dim``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose from {sorted(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](**sizes)


def prepare_input(name: str, X: torch.Tensor) -> torch.Tensor:
    """Images as the model wants them: (N, 28, 28) rows for the RNN, (N, 1, 28, 28) otherwise."""
    return as_sequence(X) if name == "rnn" else X


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


OPTIMIZERS = ("sgd", "adamw")  # the choices of --optimizer


def make_optimizer(model, lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
    """The course's optimizers: SGD with momentum 0.9 everywhere by default (the article used
    plain SGD), or AdamW (weight decay 0.05), which transformers train better with. ``model``: a
    module, or the tensors to train (ZeRO's shards)."""
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    # foreach: one call per operation for all tensors together, not one per tensor (PyTorch
    # picks it only on GPUs): on sharded DTensors (FSDP) every call costs a Python dispatch. It
    # can't mix DTensors with plain tensors (tensor parallel leaves the norms whole).
    foreach = len({hasattr(p, "device_mesh") for p in params}) <= 1
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=foreach)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05, foreach=foreach)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
