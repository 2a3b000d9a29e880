"""The course's training loop against a bare PyTorch loop: same model, data, batches and threads.

    python benchmarks/bench_loop.py [--steps 60] [--repeats 5]

The two loops run alternately (A B A B ...) in one process so that a noisy machine affects both
alike; the figure reported is the median ratio of their throughputs (course / bare), per model.
Writes benchmarks/results/loop_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import course_utils as cu

RESULTS = Path(__file__).resolve().parent / "results"


def bare_loop(model, optimizer, X, y, batch_size: int, num_steps: int, seed: int) -> float:
    """The plainest loop a tutorial would write; returns samples/s over steps after the first."""
    start = None
    for step in range(num_steps):
        if step == 1:
            start = time.perf_counter()
        idx = cu.data.batch_indices(len(X), batch_size, step, seed)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        loss.item()  # a tutorial prints the loss: the same sync the course loop does
    return batch_size * (num_steps - 1) / (time.perf_counter() - start)


def course_loop(model, optimizer, X, y, batch_size: int, num_steps: int, seed: int) -> float:
    batches = cu.data.batches(X, y, batch_size, num_steps, seed=seed)
    history = cu.loop.fit(model, optimizer, batches, num_steps, progress=False)
    return history.samples_per_s


def measure(name: str, batch_size: int, num_steps: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    X, y = cu.data.mnist("train")
    X = cu.models.prepare_input(name, X)
    ratios, course, bare = [], [], []
    for r in range(repeats):
        rates = {}
        for label, fn in (("course", course_loop), ("bare", bare_loop)):
            model = cu.models.build(name, seed=r)
            optimizer = cu.models.make_optimizer(model, lr=0.01)
            rates[label] = fn(model, optimizer, X, y, batch_size, num_steps, seed=r)
        course.append(rates["course"])
        bare.append(rates["bare"])
        ratios.append(rates["course"] / rates["bare"])
    return {
        "model": name,
        "batch_size": batch_size,
        "threads": threads,
        "steps": num_steps,
        "repeats": repeats,
        "course_samples_per_s": statistics.median(course),
        "bare_samples_per_s": statistics.median(bare),
        "ratio_course_over_bare": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=cu.hardware.num_cores())
    args = p.parse_args()
    rows = [
        measure("cnn", 64, args.steps, args.repeats, args.threads),
        measure("rnn", 64, args.steps * 4, args.repeats, args.threads),
    ]
    out = {"machine": f"{platform.machine()}, {cu.hardware.num_cores()} cores", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loop_overhead.json").write_text(json.dumps(out, indent=1))
    for row in rows:
        print(
            f"{row['model']}: course {row['course_samples_per_s']:.0f} samples/s, "
            f"bare {row['bare_samples_per_s']:.0f} samples/s, "
            f"ratio {row['ratio_course_over_bare']:.3f} (median of {row['repeats']})"
        )


if __name__ == "__main__":
    main()
