"""Expert parallelism (lesson 10): the experts of every mixture-of-experts layer
(:mod:`course_utils.moe`) split over ranks, and each token sent to the rank of its expert and
back, with two all-to-alls per layer (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch,
Fedus et al. 2021, arXiv:2101.03961).

The ranks form a 2-D mesh ("dp", "ep"). Every rank reads different tokens of the global batch:
all of them are data ranks, data rank ``dp_index x ep + ep_index``, in the global batch's order.
The ``ep`` ranks of one data-parallel index share the experts out between them: expert e lives on
ep rank ``e // (experts / ep)``, its weights a ``Shard(0)`` DTensor over ``mesh["ep"]``. The
attention, the norms and the routers are whole on every rank, as under data parallelism.

One layer's forward on one rank (:func:`dispatch`):

1. **the counts first**: how many choices each data rank routes to each expert, gathered from
   every data rank (a few integers each). From them every rank knows the global capacity, which
   of its own choices the global token order keeps (exactly what one process on the whole batch
   drops, :func:`course_utils.moe.keep_mask`), and how many rows it sends to and receives from
   each rank of its ``ep`` group: the all-to-all's split sizes, uneven as the router makes them;
2. **dispatch**: its kept tokens, sorted by expert, to their experts' ranks (``all_to_all_single``);
3. **experts**: its own experts on what arrived (their local shards, ``to_local()``);
4. **combine**: the outputs back to the tokens' ranks (the reverse all-to-all), then added to
   their tokens, weighted, on the rank that holds the token.

Both all-to-alls are autograd Functions whose backward is the reverse all-to-all
(:class:`AllToAll`), so backward sends the gradients the same way back.

**Gradients.** An expert's gradient on its rank sums the contributions of every token it served,
from all ``ep`` ranks of its group: the gradient of the sum of their losses. Every other
parameter's gradient is of the rank's own loss only, to be averaged over the data ranks. The
expert weights' gradients are therefore divided by ``ep`` on the way back (:class:`ScaleGradient`):
then *every* tensor's gradient is averaged over the ranks that hold a copy of it, and the step is
one process's on the global batch. This room averages the experts' over ``mesh["dp"]`` (the ranks
with the same experts) as soon as backward has produced each one; data parallel averages every
other parameter over all data ranks, and leaves the experts out (:func:`expert_parameters`).

**The balancing loss.** Each rank computes ``experts x sum_e f_e x P_e`` with ``f_e`` from the
global counts (the same on every rank, no gradient through counts) and ``P_e`` from its own
tokens. Data parallel averages the ranks' losses and gradients:
``mean_r experts x sum_e f_e P_e^r = experts x sum_e f_e mean_r P_e^r``, and with the same number
of tokens on every rank ``mean_r P_e^r`` is the global batch's ``P_e``: one process's loss.
"""

from __future__ import annotations

import inspect
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.profiler import record_function

from course_utils import models, moe

COMM = {"calls": 0, "bytes": 0, "seconds": 0.0}  # all-to-alls in this process, both directions


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows ``send[r]`` of ``x`` (in order) to rank r of ``group``, ``recv[r]`` rows from it:
    (sum(send), ...) -> (sum(recv), ...). Counts the call, the bytes that leave this rank (not
    the rows it keeps) and the seconds in :data:`COMM`."""
    start = time.perf_counter()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    row_bytes = x[0].numel() * x.element_size() if len(x) else 0
    COMM["calls"] += 1
    COMM["bytes"] += (sum(send) - send[dist.get_rank(group)]) * row_bytes
    COMM["seconds"] += time.perf_counter() - start
    return out


class AllToAll(torch.autograd.Function):
    """:func:`all_to_all` going forward; the reverse all-to-all (the sizes swapped) of the
    gradient going backward: each row's gradient goes back to the rank the row came from."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ScaleGradient(torch.autograd.Function):
    """The identity going forward; the gradient times ``scale`` going backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def exchange_counts(mesh, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every data rank's choices per expert (R, experts), rows in data-rank order, and this
    rank's row: all-gathered over ``mesh["ep"]``, then over ``mesh["dp"]``."""
    rows = counts  # (experts,)
    for name in ("ep", "dp"):  # the inner axis first: the rows end up dp-major
        axis = mesh[name]
        parts = [rows]  # an axis of one rank has nothing to gather
        if axis.size() > 1:
            parts = [torch.empty_like(rows) for _ in range(axis.size())]
            with record_function("moe: counts"):
                dist.all_gather(parts, rows.contiguous(), group=axis.get_group())
        rows = torch.stack(parts)  # (ep, experts), then (dp, ep, experts)
    rank = mesh["dp"].get_local_rank() * mesh["ep"].size() + mesh["ep"].get_local_rank()
    return rows.reshape(-1, counts.shape[-1]), rank


def dispatch(layer: moe.MoE, mesh, x: torch.Tensor, routing: moe.Routing) -> torch.Tensor:
    """:meth:`course_utils.moe.MoE.dispatch` over ``mesh["ep"]``: this rank's kept tokens to
    their experts' ranks, its own experts on what arrives, the outputs back (N, dim)."""
    ep, me, group = mesh["ep"].size(), mesh["ep"].get_local_rank(), mesh["ep"].get_group()
    per_rank = layer.experts // ep
    mine = slice(me * per_rank, (me + 1) * per_rank)  # this rank's experts
    first = routing.rank - me  # the data rank of ep rank 0 in this rank's group
    kept = moe.kept_counts(routing.counts, routing.capacity)[first : first + ep]  # (ep, experts)
    send = kept[me].view(ep, per_rank).sum(1).tolist()  # to each rank: rows for its experts
    arrived = kept[:, mine]  # (ep, per_rank): from each rank, rows for each of my experts
    recv = arrived.sum(1).tolist()
    token, _, weight = routing.kept()  # sorted by expert: the rows for ep rank 0 first
    with record_function("moe: dispatch"):
        inputs = AllToAll.apply(x[token], send, recv, group)  # by source rank, then expert
    # the rows arrive grouped by source rank: regroup them by expert, run, put them back
    local = torch.arange(per_rank, device=x.device).repeat(ep)
    by_expert = local.repeat_interleave(arrived.flatten()).argsort(stable=True)
    shards = [getattr(layer, name).to_local() for name in moe.EXPERT_PARAMS]  # my experts'
    shards = [ScaleGradient.apply(shard, 1 / ep) for shard in shards]  # see the docstring
    with record_function("moe: experts"):
        outputs = moe.run_experts(inputs[by_expert], arrived.sum(0).tolist(), *shards)
    outputs = outputs[by_expert.argsort()]  # back in arrival order
    with record_function("moe: combine"):
        returned = AllToAll.apply(outputs, recv, send, group)  # (kept, dim), as sent
    return moe.combine(returned, token, weight, len(x))


def apply(model: nn.Module, mesh) -> nn.Module:
    """Expert parallel over ``mesh`` (dims "dp", "ep"), in place: every mixture-of-experts
    layer's experts sharded over ``mesh["ep"]`` (``Shard(0)`` DTensors, this rank's experts
    local), its counts exchanged over all data ranks, its tokens dispatched by all-to-all, and
    its experts' gradients averaged over ``mesh["dp"]`` when backward has produced them."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep, dp = mesh["ep"], mesh["dp"]
    for layer in moe.moe_layers(model):
        if layer.experts % ep.size():
            raise ValueError(f"{layer.experts} experts do not divide among {ep.size()} ranks")
        for name in moe.EXPERT_PARAMS:
            shard = nn.Parameter(distribute_tensor(getattr(layer, name).detach(), ep, [Shard(0)]))
            if dp.size() > 1:
                shard.register_post_accumulate_grad_hook(partial(_average, group=dp.get_group()))
            setattr(layer, name, shard)
        layer.exchange_counts = partial(exchange_counts, mesh)
        layer.dispatch = partial(dispatch, layer, mesh)
    return model


def _average(param: nn.Parameter, group) -> None:
    grad = param.grad.to_local()  # this rank's experts (a view of the DTensor's shard)
    dist.all_reduce(grad, group=group)
    grad /= dist.get_world_size(group)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The experts' weights of every mixture-of-experts layer: the parameters that data parallel
    leaves to this room (:func:`apply` averages them over the ranks that hold them)."""
    return [getattr(layer, name) for layer in moe.moe_layers(model) for name in moe.EXPERT_PARAMS]


def config_error(model_name: str, ep: int, nproc: int, **sizes) -> str | None:
    """The one line that says why ``--ep`` can't split this model's experts over these ranks,
    or None. ``sizes``: the model's constructor arguments that differ from its defaults."""
    with_experts = sorted(
        name
        for name, cls in models.MODELS.items()
        if isinstance(cls, type) and issubclass(cls, moe.MoETransformer)
    )
    if model_name not in with_experts:
        choices = ", ".join(with_experts) or "none registered"
        return f"--model {model_name} has no mixture-of-experts layers (--ep needs: {choices})"
    if ep < 1 or nproc % ep:
        return f"--nproc {nproc} is not a multiple of the expert-parallel size {ep}"
    defaults = inspect.signature(models.MODELS[model_name]).parameters
    experts, top_k = (sizes.get(k, defaults[k].default) for k in ("experts", "top_k"))
    if not 1 <= top_k <= experts:
        return f"top-k {top_k} must be between 1 and the number of experts ({experts})"
    if experts % ep:
        return f"the {experts} experts do not divide among {ep} expert-parallel ranks"
    return None
