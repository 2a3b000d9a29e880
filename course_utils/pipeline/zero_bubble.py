"""Zero-bubble schedules on paper: the backward split in two, and the orders that use it.

A stage's backward computes two things: the gradient of its *input* (``B``), which the stage
before waits for, and the gradient of its *weights* (``W``), which nobody waits for until the
optimizer step. Zero-bubble schedules (Qi et al. 2023, "Zero Bubble Pipeline Parallelism",
arXiv:2401.10241) run them as separate steps, and move the ``W`` s into the pipeline's idle time:

- **ZB-H1** (the paper's section 3): 1F1B's order, each backward split into ``B`` then ``W``;
  stage ``s`` runs only the ``B`` of its first ``s`` microbatches and defers their ``W`` to the
  end, where 1F1B leaves it idle while the last gradients climb back. Idle time per stage
  ``(p - 1)(F + B - W)`` instead of ``(p - 1)(F + B + W)``: a third when ``F = B = W``, with the
  same peak memory as 1F1B's first stage. (The order of PaddlePaddle's ``ZBH1`` pass.)
- **ZB-V** (section 6): ``2p`` stages on ``p`` ranks in a V: rank ``r`` holds stage ``r`` on the
  way down and stage ``2p - 1 - r`` on the way back, so rank 0 holds the first and the last
  stage and the pipe fills from both ends. The order of ``torch.distributed.pipelining``'s
  ``ScheduleZBVZeroBubble``.
- **DualPipeV** (DeepSeek-V3, arXiv:2412.19437; ``ScheduleDualPipeV``): the same V, with a
  forward of one stage paired with a backward of the other in the steady state, and the
  backward split into ``B`` and ``W`` only in the warm-up and the drain; elsewhere a backward is
  whole (a ``B`` with no ``W``).

A task is ``(kind, stage, microbatch)``. Pure Python: no torch, no processes.
"""

from __future__ import annotations

V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank, in a V
SPLIT_SCHEDULES = ("zbh1", *V_SCHEDULES)  # schedules whose backward is split into B and W

Task = tuple[str, int, int]  # ("F", "B" or "W", stage, microbatch)


def zbh1_order(num_stages: int, num_microbatches: int, stage: int) -> list[Task]:
    """The order of ``stage`` under ZB-H1: 1F1B's, with the ``W`` of its first ``stage``
    microbatches deferred to the end (stage 0 defers none: it has no bubble to fill there)."""
    m, s = num_microbatches, stage
    warmup = min(m, num_stages - s)  # as 1F1B: fill the pipe
    deferred = min(s, m)
    order: list[Task] = [("F", s, i) for i in range(warmup)]
    for i in range(m):
        order.append(("B", s, i))  # the input's gradient first: the stage before waits for it
        if i >= deferred:
            order.append(("W", s, i))
        if warmup + i < m:
            order.append(("F", s, warmup + i))
    return order + [("W", s, i) for i in range(deferred)]  # the drain's idle time, filled


def v_stages(num_ranks: int, rank: int) -> tuple[int, int]:
    """The two stages of ``rank`` in a V: going down, and coming back."""
    return rank, 2 * num_ranks - 1 - rank


def zbv_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Task]:
    """The order of ``rank`` under ZB-V, as ``ScheduleZBVZeroBubble`` builds it."""
    p, m = num_ranks, num_microbatches
    down, up = v_stages(p, rank)
    n = max(2 * p - 1, m)  # enough microbatches to fill the V; those beyond m are dropped
    order: list[Task] = []
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (p - rank) - 1):  # warm-up: the way down
        order.append(("F", down, f0))
        f0 += 1
    for _ in range(rank):
        order += [("F", up, f1), ("F", down, f0)]
        f0, f1 = f0 + 1, f1 + 1
    for _ in range(p - rank):  # the way back starts: its backwards, whole
        order += [("F", up, f1), ("B", up, b1), ("W", up, b1)]
        f1, b1 = f1 + 1, b1 + 1
    while f1 < f0 or f0 < n:  # steady state: F B W on each leg in turn
        if f0 < n:
            order.append(("F", down, f0))
            f0 += 1
        order += [("B", down, b0), ("W", down, b0), ("F", up, f1), ("B", up, b1), ("W", up, b1)]
        b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
    w0, w1 = b0, b1  # drain: input gradients first, the weights' where the V waits
    for _ in range(rank):
        order += [("B", down, b0), ("B", up, b1)]
        b0, b1 = b0 + 1, b1 + 1
    for _ in range(p - rank):
        order += [("B", down, b0), ("W", down, w0)]
        b0, w0 = b0 + 1, w0 + 1
    order += [("W", up, i) for i in range(w1, b1)] + [("W", down, i) for i in range(w0, b0)]
    return [t for t in order if t[2] < m]


def dualpipev_order(num_ranks: int, num_microbatches: int, rank: int) -> list[Task]:
    """The order of ``rank`` under DualPipeV, as ``ScheduleDualPipeV`` builds it. Its paired
    "forward of one stage + backward of the other" runs here as the forward, then the backward
    (one thread per rank overlaps nothing); a whole backward is a ``B`` with no ``W``."""
    p, m = num_ranks, num_microbatches
    s0, s1 = v_stages(p, rank)
    count = {(s, k): 0 for s in (s0, s1) for k in "FB"}
    order: list[Task] = []
    pending: list[tuple[int, int]] = []  # (stage, microbatch) whose W is still to run

    def add(stage: int, kind: str, split: bool = False) -> None:
        i = count[stage, kind]
        count[stage, kind] = i + 1
        order.append((kind, stage, i))
        if split:
            pending.append((stage, i))

    def weight() -> None:
        if pending:
            order.append(("W", *pending.pop(0)))

    for _ in range(2 * (p - rank - 1)):  # 1: forwards on the way down
        add(s0, "F")
    for _ in range(rank + 1):  # 2: both legs
        add(s0, "F")
        add(s1, "F")
    for _ in range(p - rank - 1):  # 3: zero bubble on the way back
        add(s1, "B", split=True)
        weight()
        add(s1, "F")
    for _ in range(m - 2 * p + rank + 1):  # 4: the main loop, forward + whole backward pairs
        add(s0, "F")
        add(s1, "B")
        add(s1, "F")
        add(s0, "B")
    for _ in range(p - rank - 1):  # 5
        add(s1, "B")
        add(s1, "F")
        add(s0, "B")
    split = False
    for i in range(rank + 1):  # 6: the drain, split from half-way
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        add(s1, "B", split)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        add(s0, "B", split)
    for _ in range(p - rank - 1):  # 7
        weight()
        add(s0, "B", split)
    for _ in range(rank + 1):  # 8: the weights left
        weight()
    return order


def rank_orders(schedule: str, num_stages: int, num_microbatches: int) -> list[list[Task]]:
    """Every rank's tasks in order. ZB-H1: one stage per rank; V schedules: ``num_stages`` must
    be even, two per rank."""
    if schedule == "zbh1":
        return [zbh1_order(num_stages, num_microbatches, s) for s in range(num_stages)]
    if schedule in V_SCHEDULES:
        if num_stages % 2:
            raise ValueError(f"{schedule} puts 2 stages on each rank: num_stages must be even")
        build = zbv_order if schedule == "zbv" else dualpipev_order
        return [build(num_stages // 2, num_microbatches, r) for r in range(num_stages // 2)]
    raise ValueError(f"unknown zero-bubble schedule {schedule!r}: choose from {SPLIT_SCHEDULES}")


def rank_of(schedule: str, num_stages: int, stage: int) -> int:
    """The rank that holds ``stage``: itself, or in a V the rank whose way back it is."""
    if schedule in V_SCHEDULES:
        return stage if stage < num_stages // 2 else num_stages - 1 - stage
    return stage


def bubble_formula(num_stages: int, num_microbatches: int, forward=1.0, backward=2.0, weight=1.0):
    """ZB-H1's bubble with equal stages: idle ``(p - 1)(F + B - W)`` per stage (``B`` the input
    gradient, ``backward - weight``) over a step of ``m (F + B + W)`` plus that idle time. Exact
    (the simulation gives it) for ``m >= p`` while ``W <= F`` and ``W <= B``; with ``F = B = W``,
    (p-1)/(3m+p-1): about a third of 1F1B's (p-1)/(m+p-1)."""
    p, m, b = num_stages, num_microbatches, backward - weight
    idle = (p - 1) * (forward + b - weight)
    return idle / (m * (forward + backward) + idle)
