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
beside a measured one. Pure Python: no torch, no processes.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b")

Op = tuple[str, int]  # ("F" or "B", microbatch)


@dataclass(frozen=True)
class Event:
    """One piece of work on the timeline: ``kind`` of ``microbatch`` on ``stage``: "F" forward,
    "B" backward (of the inputs only, when a zero-bubble schedule splits it), "W" the weights'
    gradients of a split backward."""

    stage: int
    kind: str
    microbatch: int
    start: float
    end: float


def stage_order(schedule: str, num_stages: int, num_microbatches: int, stage: int) -> list[Op]:
    """The order in which ``stage`` runs its forwards and backwards under ``schedule``."""
    m = num_microbatches
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
    raise ValueError(f"unknown schedule {schedule!r}: choose from {SCHEDULES}")


def orders(schedule: str, num_stages: int, num_microbatches: int) -> list[list[Op]]:
    """:func:`stage_order` of every stage."""
    return [stage_order(schedule, num_stages, num_microbatches, s) for s in range(num_stages)]


def _per_stage(value, num_stages: int) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [float(value)] * num_stages


def simulate(
    schedule: str,
    num_stages: int,
    num_microbatches: int,
    forward: float | list[float] = 1.0,
    backward: float | list[float] = 2.0,
    comm: float = 0.0,
) -> list[Event]:
    """Timeline of one training step: each op starts when its stage is free and its input has
    arrived (``comm`` seconds after the producing op ends). ``forward``/``backward``: cost of one
    microbatch on each stage (a number for all stages, or one per stage)."""
    f, b = _per_stage(forward, num_stages), _per_stage(backward, num_stages)
    plan = orders(schedule, num_stages, num_microbatches)
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> end time
    free = [0.0] * num_stages  # when each stage finishes its previous op
    nxt = [0] * num_stages  # index of each stage's next op
    events: list[Event] = []
    while any(nxt[s] < len(plan[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            while nxt[s] < len(plan[s]):
                kind, i = plan[s][nxt[s]]
                if kind == "F":  # needs the previous stage's activation
                    dep = ("F", s - 1, i) if s > 0 else None
                else:  # needs the next stage's gradient (the last stage: its own forward)
                    dep = ("B", s + 1, i) if s < num_stages - 1 else ("F", s, i)
                if dep is not None and dep not in done:
                    break  # wait for another stage
                ready = 0.0 if dep is None else done[dep] + (comm if dep[1] != s else 0.0)
                start = max(free[s], ready)
                end = start + (f[s] if kind == "F" else b[s])
                done[(kind, s, i)] = free[s] = end
                events.append(Event(s, kind, i, start, end))
                nxt[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks")  # never for the two above
    return sorted(events, key=lambda e: (e.start, e.stage))


def makespan(events: list[Event]) -> float:
    """Time from the first op's start to the last op's end."""
    return max(e.end for e in events) - min(e.start for e in events)


def bubble_fraction(events: list[Event], num_stages: int | None = None) -> float:
    """Share of stage-time spent idle: 1 - busy / (num_stages × makespan)."""
    num_stages = num_stages or len({e.stage for e in events})
    busy = sum(e.end - e.start for e in events)
    return 1.0 - busy / (num_stages * makespan(events))


def bubble_formula(num_stages: int, num_microbatches: int) -> float:
    """The bubble of GPipe and 1F1B with equal stage times: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def speedup_bound(num_stages: int, num_microbatches: int) -> float:
    """Best throughput of p equal stages over one device doing it all: m·p / (m + p - 1)."""
    return num_microbatches * num_stages / (num_microbatches + num_stages - 1)


def table(schedule: str, num_stages: int, num_microbatches: int) -> list[list[str]]:
    """A (stages × time slots) grid of labels such as "F3", "B0", "" (idle), with forward and
    backward each taking one slot: the picture of a schedule, as text."""
    events = simulate(schedule, num_stages, num_microbatches, forward=1, backward=1)
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
    """Microbatches whose activations a stage holds after each op (forward done, backward not)."""
    count, counts = 0, []
    for kind, _ in order:
        count += 1 if kind == "F" else -1
        counts.append(count)
    return counts


def peak_in_flight(schedule: str, num_stages: int, num_microbatches: int) -> list[int]:
    """Most microbatches of activations each stage holds at once (GPipe: m; 1F1B: p - stage)."""
    return [max(in_flight(o)) for o in orders(schedule, num_stages, num_microbatches)]
