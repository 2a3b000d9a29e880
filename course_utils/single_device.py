"""Lessons 01 and 02's sweeps on one device: settings measured in turns, read as paired ratios.

- :func:`throughput_sweep`: training samples/s for every (batch size, threads) setting, all
  settings measured in turns (:func:`course_utils.measure.interleaved`) with a progress bar;
- :func:`phase_sweep`: the forward, backward and optimizer milliseconds of a step
  (:func:`course_utils.measure.step_phases`) at several batch sizes, in turns;
- :func:`neighbour_ratios`: how a measurement grew from each size of a sweep to the next, as
  paired ratios of the repeats of the same round (lesson 02's doublings of T and of the batch).

The lessons print what these return through :mod:`course_utils.readout`; the figures are
:func:`course_utils.plots.thread_sweep` and :func:`course_utils.plots.step_phases`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from course_utils.measure import Spread, interleaved, ratios, spread, step_phases, throughput

__all__ = ["throughput_sweep", "phase_sweep", "neighbour_ratios", "PHASES"]

PHASES = ("forward", "backward", "optimizer")


def throughput_sweep(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_sizes: Sequence[int],
    thread_counts: Sequence[int],
    num_steps: int,
    repeats: int,
    measure: Callable[..., float] = throughput,
) -> dict[int, dict[int, Spread]]:
    """``{batch size: {threads: Spread of samples/s}}``; every setting once per round, in turns,
    so the repeats of one round pair up (:func:`course_utils.measure.ratios`)."""
    settings = {
        (b, t): (lambda b=b, t=t: measure(model, X, y, b, threads=t, num_steps=num_steps))
        for b in batch_sizes
        for t in thread_counts
    }
    spreads = interleaved(settings, repeats, progress="samples/s at (batch, threads)")
    return {b: {t: spreads[b, t] for t in thread_counts} for b in batch_sizes}


def phase_sweep(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_sizes: Sequence[int],
    repeats: int,
    lr: float = 0.01,
    steps_per_repeat: int = 1,
) -> tuple[dict[int, dict[str, Spread]], dict[int, Spread]]:
    """``(phases, step)``: ``phases[b][name]`` the milliseconds of each phase at batch ``b``,
    ``step[b]`` those of the whole step, per repeat; batch sizes measured in turns. A throwaway
    SGD optimizer steps the model given (pass a copy if its weights matter)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rounds: dict[int, list[dict[str, float]]] = {b: [] for b in batch_sizes}
    with tqdm(total=repeats * len(batch_sizes), desc="step phases", leave=False) as bar:
        for _ in range(repeats):
            for b in batch_sizes:
                seconds = step_phases(model, optimizer, X[:b], y[:b], steps_per_repeat)
                rounds[b].append({name: 1e3 * s for name, s in seconds.items()})
                bar.update()
    phases = {b: {n: spread(r[n] for r in rs) for n in PHASES} for b, rs in rounds.items()}
    step = {b: spread(sum(r.values()) for r in rs) for b, rs in rounds.items()}
    return phases, step


def neighbour_ratios(spreads: dict) -> dict[tuple, Spread]:
    """``{(x1, x2): Spread of a_i / b_i}`` for each neighbouring pair of an interleaved sweep
    (keys in order): how the measurement grew from one size to the next, round by round."""
    keys = list(spreads)
    return {(a, b): ratios(spreads[b], spreads[a]) for a, b in zip(keys, keys[1:])}
