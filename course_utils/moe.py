"""A mixture of experts (lesson 10): the transformer block's MLP replaced by several MLPs, the
*experts*, and a router that sends each token to ``top_k`` of them. The model holds ``experts``
times the MLP's parameters, but each token pays for only ``top_k`` MLPs: more parameters for the
same arithmetic per token (Shazeer et al. 2017, arXiv:1701.06538; the Switch Transformer, Fedus
et al. 2021, arXiv:2101.03961).

Three things make it work, and each one is a function here that a test checks by hand:

- **gating** (:func:`gate`): the router's softmax probabilities, the ``top_k`` largest per token;
- **capacity** (:func:`capacity`, :func:`keep_mask`): each expert takes at most
  ``ceil(capacity_factor x tokens x top_k / experts)`` choices per batch, so that one popular
  expert cannot hold up the others (its work, and under expert parallelism its rank's, is
  bounded). Choices beyond it are *dropped*, first come first served in token order: a dropped
  token gets nothing from that expert and the block's residual carries it through unchanged;
- **balance** (:func:`balancing_loss`): the Switch Transformer's auxiliary loss, lowest when the
  router spreads the tokens evenly, which the training loop adds (:func:`auxiliary_loss`).

Experts are *stacked* parameters, ``w1`` of shape (experts, dim, hidden) and so on, not one module
per expert: expert parallelism (:mod:`course_utils.expert_parallel`) shards them along their
first dimension as DTensors, and the whole-model gather and the checkpoints see four ordinary
tensors either way. The experts' work goes through one method, :meth:`MoE.dispatch`, and the
batch's counts through :meth:`MoE.exchange_counts`: expert parallelism replaces both, and the
rest of the layer is the same on one process and on many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from course_utils import models

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")  # expert e: gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]
AUX_WEIGHT = 0.01  # the balancing loss's weight in the training loss (the Switch paper's)


def gate(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts: (weights, chosen), both (N, top_k), best first.

    With one expert per token the weight is the router's probability itself (Switch): scaling
    the expert's output by it is what carries the task loss's gradient back to the router
    (renormalised, it would always be 1). With several, the weights are renormalised to sum to 1,
    so that a token's output stays one convex mix of experts, of the same size whatever ``top_k``
    is, while their ratios still carry the router's preference and its gradient."""
    weights, chosen = probs.topk(top_k, dim=-1)  # (N, top_k) each
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def capacity(tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """The most choices one expert takes from a batch of ``tokens`` tokens: ``capacity_factor``
    times an even share, ``ceil(capacity_factor x tokens x top_k / experts)``. Rounded to 6
    decimals before the ceiling, so that 1.1 x 100 / 2 is 55, not 56."""
    return math.ceil(round(capacity_factor * tokens * top_k / experts, 6))


def keep_mask(
    chosen: torch.Tensor, experts: int, capacity: int, before: torch.Tensor | None = None
) -> torch.Tensor:
    """Which choices (N, top_k) their experts take: the first ``capacity`` choices of each
    expert, in token order (token i's choices before token i+1's). ``before``: per expert, the
    choices that came earlier in the global batch (other ranks' tokens), which take its places
    first."""
    flat = chosen.flatten()  # (N * top_k,), in priority order
    onehot = F.one_hot(flat, experts)  # (N * top_k, experts)
    place = (onehot.cumsum(0) * onehot).sum(1) - 1  # earlier choices of the same expert
    if before is not None:
        place = place + before[flat]
    return (place < capacity).view_as(chosen)


def kept_counts(counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """The choices each expert takes from each rank's tokens (R, experts), given every rank's
    choices per expert (R, experts), ranks in token order: what :func:`keep_mask` keeps, known
    on every rank from the counts alone."""
    before = counts.cumsum(0) - counts  # (R, experts): earlier ranks' choices
    return (capacity - before).clamp(min=0).minimum(counts)


def balancing_loss(probs: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss, ``experts x sum_e f_e x P_e``: ``f_e`` the
    fraction of choices routed to expert e (before any are dropped; ``routed``: the choices per
    expert), ``P_e`` the mean router probability of e over the tokens ``probs`` (N, experts).
    It is 1.0 when both are even, and grows as the router favours some experts. ``f`` counts
    arg-max decisions and has no gradient: the router learns balance through ``P``, by lowering
    the probability of the experts that got more than their share."""
    f = routed.to(probs.dtype) / routed.sum()  # (experts,)
    return probs.shape[-1] * (f * probs.mean(dim=0)).sum()


@dataclass
class Routing:
    """Where one forward sends its tokens: each token's ``chosen`` experts and their
    ``weights`` (N, top_k), the choices the experts ``keep``, and every data rank's choices per
    expert ``counts`` (R, experts; R = 1 on one process) with this rank's row ``rank``, and the
    ``capacity`` per expert."""

    weights: torch.Tensor
    chosen: torch.Tensor
    keep: torch.Tensor
    counts: torch.Tensor
    rank: int
    capacity: int

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept choices sorted by expert, each expert's in token order: their (token,
        expert, weight), each (kept,)."""
        top_k = self.chosen.shape[1]
        index = self.keep.flatten().nonzero().squeeze(1)  # kept choices, in priority order
        index = index[self.chosen.flatten()[index].argsort(stable=True)]  # grouped by expert
        return index // top_k, self.chosen.flatten()[index], self.weights.flatten()[index]


def run_experts(x: torch.Tensor, counts: list[int], w1, b1, w2, b2) -> torch.Tensor:
    """The experts on their tokens: ``x`` (n, dim) grouped by expert, ``counts[e]`` rows for
    expert e of the stacked weights (``w1`` (experts, dim, hidden) ...) -> (n, dim), same order."""
    with record_function("moe: experts"):
        parts = x.split(counts)
        return torch.cat(
            [F.gelu(part @ w1[e] + b1[e]) @ w2[e] + b2[e] for e, part in enumerate(parts)]
        )


def combine(outputs: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int):
    """Each token's output (num_tokens, dim): the sum of its kept experts' ``outputs`` (kept,
    dim), scaled by their weights; zero for a token whose every choice was dropped."""
    weighted = outputs * weight[:, None]
    return outputs.new_zeros(num_tokens, outputs.shape[1]).index_add(0, token, weighted)


class MoE(nn.Module):
    """A mixture-of-experts layer in place of a block's MLP (:class:`models.MLP`): a router
    (``nn.Linear(dim, experts)``) and ``experts`` MLPs dim -> hidden -> dim, GELU between,
    stacked. After each forward it keeps ``aux_loss`` (the balancing loss, with its gradient),
    ``stats`` (choices per expert before and after capacity, ``routed`` and ``kept``, the
    number ``dropped`` and the ``capacity``, over the whole global batch) and ``routing``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        experts: int = 4,
        top_k: int = 1,
        capacity_factor: float = 1.25,
    ):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be between 1 and the {experts} experts, got {top_k}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.experts, self.top_k, self.capacity_factor = experts, top_k, capacity_factor
        self.router = nn.Linear(dim, experts)
        # nn.Linear's initialisation, uniform in +-1/sqrt(fan_in), for each expert's two layers
        self.w1 = nn.Parameter(_uniform((experts, dim, hidden), dim))
        self.b1 = nn.Parameter(_uniform((experts, hidden), dim))
        self.w2 = nn.Parameter(_uniform((experts, hidden, dim), hidden))
        self.b2 = nn.Parameter(_uniform((experts, dim), hidden))
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict = {}
        self.routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, shape[-1])  # (N, dim): the batch's tokens, in order
        probs = F.softmax(self.router(x), dim=-1)  # (N, experts)
        weights, chosen = gate(probs, self.top_k)  # (N, top_k) each
        mine = torch.bincount(chosen.flatten(), minlength=self.experts)  # (experts,)
        counts, rank = self.exchange_counts(mine)  # (R, experts): every data rank's
        tokens = int(counts.sum()) // self.top_k  # the global batch's tokens
        cap = capacity(tokens, self.experts, self.top_k, self.capacity_factor)
        keep = keep_mask(chosen, self.experts, cap, before=counts[:rank].sum(0))
        routing = Routing(weights, chosen, keep, counts, rank, cap)
        routed, kept = counts.sum(0), kept_counts(counts, cap).sum(0)
        self.aux_loss = balancing_loss(probs, routed)
        self.stats = {
            "routed": routed,
            "kept": kept,
            "dropped": int((routed - kept).sum()),
            "capacity": cap,
        }
        self.routing = replace(routing, weights=weights.detach())
        return self.dispatch(x, routing).view(shape)

    def exchange_counts(self, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every data rank's choices per expert (R, experts), and this rank's row. One process
        holds the whole batch: its own counts, row 0."""
        return counts[None], 0

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts' work, (N, dim) -> (N, dim): the kept choices sorted by expert, each
        expert run on its tokens, the outputs added back to their tokens, weighted."""
        token, expert, weight = routing.kept()
        counts = torch.bincount(expert, minlength=self.experts).tolist()
        outputs = run_experts(x[token], counts, self.w1, self.b1, self.w2, self.b2)
        return combine(outputs, token, weight, len(x))

    def __getstate__(self) -> dict:
        # the last forward's loss sits in its autograd graph: a copy (deepcopy, pickle) of the
        # layer starts without it, as a fresh layer does
        return super().__getstate__() | {"aux_loss": None}


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = fan_in**-0.5
    return torch.empty(shape).uniform_(-bound, bound)


class MoETransformer(models.Transformer):
    """The course's transformer (:class:`models.Transformer`) with every block's MLP replaced
    by a mixture of ``experts`` experts (:class:`MoE`). ``aux_weight``: how much the balancing
    loss counts in the training loss (:func:`auxiliary_loss`)."""

    def __init__(
        self,
        dim: int = 64,
        heads: int = 4,
        hidden: int = 128,
        depth: int = 4,
        experts: int = 4,
        top_k: int = 1,
        capacity_factor: float = 1.25,
        aux_weight: float = AUX_WEIGHT,
    ):
        super().__init__(dim, heads, hidden, depth)
        for block in self.blocks:
            block.mlp = MoE(dim, hidden, experts, top_k, capacity_factor)
        self.aux_weight = aux_weight


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every mixture-of-experts layer in ``model`` (or in the model a wrapper holds)."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | float:
    """What the training loop adds to the loss: the balancing losses of the last forward, summed
    over the layers, times the model's ``aux_weight`` (:data:`AUX_WEIGHT` if it has none); 0.0
    for a model without mixture-of-experts layers."""
    losses = [layer.aux_loss for layer in moe_layers(model) if layer.aux_loss is not None]
    if not losses:
        return 0.0
    weights = (m.aux_weight for m in model.modules() if hasattr(m, "aux_weight"))
    return next(weights, AUX_WEIGHT) * torch.stack(losses).sum()


models.MODELS["moe"] = MoETransformer  # --model moe: registered here, where it is built
