"""Pipeline schedules on paper: which stage does what, when, and how much of the time it waits.

A pipeline of ``num_stages`` stages trains one global batch as ``num_microbatches`` microbatches.
Each stage runs a forward ``F`` and a backward ``B`` for every microbatch; a schedule is the
*order* in which each stage runs them (lesson 06):

- **GPipe** (Huang et al., 2019, arXiv:1811.06965): every forward, then every backward. A stage
  holds the activations of all ``m`` microbatches at once.
- **1F1B** (PipeDream-Flush, Narayanan et al., 2021, arXiv:2006.09503): stage ``s`` runs
  ``num_stages - s`` forwards to fill the pipe, then alternates one backward, one forward. Same
  bubble as GPipe, but at most ``num_stages - s`` microbatches in flight.

Both orders are those of ``torch.distributed.pipelining``'s ``ScheduleGPipe`` and
``Schedule1F1B`` (backwards in microbatch order 0, 1, ...), so a simulated timeline can be put
beside a measured one. The zero-bubble schedules (ZB-H1, ZB-V, DualPipeV) split the backward into
``B`` (the input's gradient) and ``W`` (the weights'): their orders are in
:mod:`course_utils.pipeline.zero_bubble`, and :func:`simulate` plays them too. Pure Python: no
torch, no processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_utils.pipeline import zero_bubble
from course_utils.pipeline.zero_bubble import SPLIT_SCHEDULES, V_SCHEDULES

SCHEDULES = ("gpipe", "1f1b")
SIMULATED = (*SCHEDULES, *SPLIT_SCHEDULES)  # what simulate() plays

Op = tuple[str, int]  # ("F", "B" or "W", microbatch)


@dataclass(frozen=True)
class Event:
    """One piece of work on the timeline: ``kind`` of ``microbatch`` on ``stage``: "F" forward,
    "B" backward (of the inputs only, when a zero-bubble schedule splits it), "W" the weights'
    gradients of a split backward. ``rank``: the worker that ran it, where it holds several
    stages (the V schedules); None when the rank is the stage."""

    stage: int
    kind: str
    microbatch: int
    start: float
    end: float
    rank: int | None = None

    @property
    def row(self) -> int:
        """The worker's row in a timeline: its rank, or its stage when they are the same."""
        return self.stage if self.rank is None else self.rank


def stage_order(schedule: str, num_stages: int, num_microbatches: int, stage: int) -> list[Op]:
    """The order in which ``stage`` runs its forwards and backwards under ``schedule`` (for
    ZB-H1 its weight-gradient steps ``("W", i)`` too; a V schedule's ranks: :func:`rank_orders`)."""
    m = num_microbatches
    if schedule == "zbh1":
        return [(kind, i) for kind, _, i in zero_bubble.zbh1_order(num_stages, m, stage)]
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(m, num_stages - stage)  # fill the pipe: the last stage starts 1F1B at once
        order: list[Op] = [("F", i) for i in range(warmup)]
        for i in range(m):  # steady state: one backward, then the next forward (if any left)
            order.append(("B", i))
            if warmup + i < m:
                order.append(("F", warmup + i))
        return order
    raise ValueError(f"unknown schedule {schedule!r}: choose from {SCHEDULES + ('zbh1',)}")


def orders(schedule: str, num_stages: int, num_microbatches: int) -> list[list[Op]]:
    """:func:`stage_order` of every stage."""
    return [stage_order(schedule, num_stages, num_microbatches, s) for s in range(num_stages)]


def rank_orders(schedule: str, num_stages: int, num_microbatches: int) -> list[list[tuple]]:
    """Every rank's tasks ``(kind, stage, microbatch)`` in order: one stage per rank, or, for
    the V schedules, ``num_stages`` stages two per rank."""
    if schedule in V_SCHEDULES:
        return zero_bubble.rank_orders(schedule, num_stages, num_microbatches)
    plan = orders(schedule, num_stages, num_microbatches)
    return [[(kind, s, i) for kind, i in order] for s, order in enumerate(plan)]


def _per_stage(value, num_stages: int) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [float(value)] * num_stages


def simulate(
    schedule: str,
    num_stages: int,
    num_microbatches: int,
    forward: float | list[float] = 1.0,
    backward: float | list[float] = 2.0,
    comm: float = 0.0,
    weight: float | list[float] | None = None,
) -> list[Event]:
    """Timeline of one training step: each op starts when its rank is free and its input has
    arrived (``comm`` seconds after the producing op ends, when another rank produced it).
    ``forward``/``backward``: cost of one microbatch on each stage (a number for all stages, or
    one per stage), the backward whole. A zero-bubble schedule runs a backward in two steps: its
    ``W`` costs ``weight`` (default: half the backward), its ``B`` the rest. The V schedules put
    ``num_stages`` stages two per rank, and their events carry the rank."""
    f, b = _per_stage(forward, num_stages), _per_stage(backward, num_stages)
    w = _per_stage([x / 2 for x in b] if weight is None else weight, num_stages)
    plan = rank_orders(schedule, num_stages, num_microbatches)
    split = {(s, i) for order in plan for kind, s, i in order if kind == "W"}  # B, then W

    def cost(kind: str, s: int, i: int) -> float:
        if kind == "F":
            return f[s]
        if kind == "W":
            return w[s]
        return b[s] - w[s] if (s, i) in split else b[s]

    def rank(s: int) -> int:
        return zero_bubble.rank_of(schedule, num_stages, s)

    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> end time
    free = [0.0] * len(plan)  # when each rank finishes its previous op
    nxt = [0] * len(plan)  # index of each rank's next op
    events: list[Event] = []
    while any(nxt[r] < len(plan[r]) for r in range(len(plan))):
        progressed = False
        for r, order in enumerate(plan):
            while nxt[r] < len(order):
                kind, s, i = order[nxt[r]]
                if kind == "F":  # needs the previous stage's activation
                    dep = ("F", s - 1, i) if s > 0 else None
                elif kind == "B":  # the next stage's gradient (the last stage: its own forward)
                    dep = ("B", s + 1, i) if s < num_stages - 1 else ("F", s, i)
                else:  # W: the output's gradient, which its own B received
                    dep = ("B", s, i)
                if dep is not None and dep not in done:
                    break  # wait for another rank
                ready = 0.0 if dep is None else done[dep] + (comm if rank(dep[1]) != r else 0.0)
                start = max(free[r], ready)
                done[(kind, s, i)] = free[r] = end = start + cost(kind, s, i)
                events.append(Event(s, kind, i, start, end, r if schedule in V_SCHEDULES else None))
                nxt[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks")  # never for those above
    return sorted(events, key=lambda e: (e.start, e.row))


def makespan(events: list[Event]) -> float:
    """Time from the first op's start to the last op's end."""
    return max(e.end for e in events) - min(e.start for e in events)


def bubble_fraction(events: list[Event], num_stages: int | None = None) -> float:
    """Share of stage-time spent idle: 1 - busy / (num_stages × makespan). ``num_stages``: the
    timeline's rows (the ranks, where a rank holds several stages); by default, those seen."""
    num_stages = num_stages or len({e.row for e in events})
    busy = sum(e.end - e.start for e in events)
    return 1.0 - busy / (num_stages * makespan(events))


def bubble_formula(num_stages: int, num_microbatches: int) -> float:
    """The bubble of GPipe and 1F1B with equal stage times: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def speedup_bound(num_stages: int, num_microbatches: int) -> float:
    """Best throughput of p equal stages over one device doing it all: m·p / (m + p - 1)."""
    return num_microbatches * num_stages / (num_microbatches + num_stages - 1)


def table(schedule: str, num_stages: int, num_microbatches: int) -> list[list[str]]:
    """A (stages × time slots) grid of labels such as "F3", "B0", "W2", "" (idle), with a
    forward, a backward and (ZB-H1) a weights' gradient each taking one slot: the picture of a
    schedule, as text (one stage per rank)."""
    if schedule in V_SCHEDULES:
        raise ValueError(f"{schedule} holds 2 stages per rank: draw it with a Gantt chart")
    whole = schedule not in SPLIT_SCHEDULES  # F, B: one slot each; or F, B, W one each
    events = simulate(
        schedule, num_stages, num_microbatches, forward=1, backward=1 if whole else 2, weight=1
    )
    width = int(makespan(events))
    grid = [[""] * width for _ in range(num_stages)]
    for e in events:
        grid[e.stage][int(e.start)] = f"{e.kind}{e.microbatch}"
    return grid


def format_table(grid: list[list[str]]) -> str:
    """The grid of :func:`table` as aligned text, one line per stage ("." = idle)."""
    return "\n".join(
        f"stage {s}: " + " ".join(f"{cell or '.':>3}" for cell in row) for s, row in enumerate(grid)
    )


def in_flight(order: list[Op]) -> list[int]:
    """Microbatches whose activations a stage holds after each op: forward done, backward not
    (where the backward is split, not until its ``W``: the weights' gradient needs them too)."""
    split = {i for kind, i in order if kind == "W"}
    count, counts = 0, []
    for kind, i in order:
        if kind == "F":
            count += 1
        elif kind == "W" or i not in split:  # the microbatch's last backward step frees it
            count -= 1
        counts.append(count)
    return counts


def peak_in_flight(schedule: str, num_stages: int, num_microbatches: int) -> list[int]:
    """Most microbatches of activations each stage holds at once (GPipe: m; 1F1B: p - stage;
    ZB-H1: min(p, m) on every stage, as many as 1F1B's first)."""
    return [max(in_flight(o)) for o in orders(schedule, num_stages, num_microbatches)]
