"""Lesson 05's measurements of data-parallel speed (sections 7 and 8): a sweep of real training
runs (strong and weak scaling over 1..N workers, and one process using every core's threads),
measured in turns, and what synchronising the gradients costs beside the alpha-beta model.

Every run is the course's training entry point (:func:`course_utils.train.run`), so what is
measured is what ``python -m course_utils.train`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

from course_utils import collectives, ddp, launch, loop, measure, models
from course_utils.config import RunConfig


def settings(
    model_names: Sequence[str],
    world_sizes: Sequence[int],
    strong_batch: int,
    weak_batch: int,
    cores: int,
) -> dict[str, tuple]:
    """The sweep's runs: name ("cnn strong 2", "cnn weak 2", "cnn all cores") -> (model, workers,
    global batch, threads per worker). Strong: the global batch fixed; weak: ``weak_batch`` per
    worker; all cores: one process with ``cores`` threads on the strong batch."""
    out = {}
    for model in model_names:
        for n in world_sizes:
            out[f"{model} strong {n}"] = (model, n, strong_batch, 1)
            out[f"{model} weak {n}"] = (model, n, weak_batch * n, 1)
        out[f"{model} all cores"] = (model, 1, strong_batch, cores)
    return out


def throughput(model: str, nproc: int, batch_size: int, threads: int, steps: int) -> float:
    """Samples per second of one real training run (the first step excluded): DDP on ``nproc``
    CPU workers of one thread, or, with ``threads`` > 1, one process right here with that many
    intra-op threads (a worker forked from a kernel whose OpenMP threads have worked can't start
    threads of its own: the GNU OpenMP runtime hangs)."""
    from course_utils import train  # train imports this package's ddp: import it when used

    parallel = "ddp" if threads == 1 else "none"
    cfg = RunConfig(model=model, parallel=parallel, nproc=nproc, batch_size=batch_size,
                    steps=steps, threads=threads, device="cpu")  # fmt: skip
    with loop.num_threads(threads):  # restores this process's thread count afterwards
        return train.run(cfg, progress=False)["samples_per_s"]


def sweep(runs: dict[str, tuple], steps: int, repeats: int) -> dict[str, measure.Spread]:
    """Every run of :func:`settings` once per round, in turns, ``repeats`` rounds (a progress bar
    shows which): samples per second, as a Spread per run."""
    measures = {name: lambda s=s: throughput(*s, steps) for name, s in runs.items()}
    return measure.interleaved(measures, repeats, progress="training runs, in turns")


def speedup(rate: dict[str, measure.Spread], model: str, kind: str, n: int) -> measure.Spread:
    """The paired speedups (round by round) of ``n`` workers over 1 in a :func:`sweep`'s result;
    ``kind`` "strong" or "weak" (weak: over 1 worker with the per-worker batch)."""
    return measure.ratios(rate[f"{model} {kind} {n}"], rate[f"{model} {kind} 1"])


def sync_costs(
    model_names: Sequence[str],
    batch_size: int,
    steps: int,
    repeats: int,
    fit: collectives.AlphaBeta,
) -> dict[str, dict]:
    """What synchronising costs a 2-worker DDP step (:func:`course_utils.ddp.time_sync`), the
    models in turns for ``repeats`` rounds, beside the alpha-beta ``fit``'s prediction for one
    all-reduce of the model's gradients. Per model: ``bytes`` of gradients, ``step_ms`` (a synced
    step), ``sync_ms`` (synced step - no_sync step, at least 0) and ``predicted_ms``, and the
    ``measured``/``predicted`` shares of a step in % (Spreads, but ``bytes`` and ``predicted_ms``)."""
    timings: dict[str, list] = {name: [] for name in model_names}

    def timed(name: str):
        def run() -> float:
            t = launch.run(ddp.time_sync, 2, name, batch_size, steps, threads=1)[0]
            timings[name].append(t)
            return t["synced_s"]

        return run

    measure.interleaved({name: timed(name) for name in model_names}, repeats, progress="DDP steps")
    out = {}
    for name, runs in timings.items():
        grad_bytes = 4 * models.count_parameters(models.build(name, seed=0))
        predicted_s = float(fit.predict(grad_bytes))
        synced = [t["synced_s"] for t in runs]
        cost = [max(t["synced_s"] - t["no_sync_s"], 0.0) for t in runs]
        out[name] = {
            "bytes": grad_bytes,
            "predicted_ms": 1e3 * predicted_s,
            "step_ms": measure.spread(1e3 * s for s in synced),
            "sync_ms": measure.spread(1e3 * c for c in cost),
            "measured": measure.spread(100 * c / s for c, s in zip(cost, synced)),
            "predicted": measure.spread(100 * predicted_s / s for s in synced),
        }
    return out
