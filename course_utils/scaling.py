"""How much faster can N workers be? Amdahl's and Gustafson's laws, and the Karp-Flatt metric
(lesson 03). Pure functions of numbers: no torch, no plotting.

A program's run time on one worker is split into a part that only one worker can do (the serial
fraction, ``1 - p``) and a part that can be split among workers (the parallel fraction, ``p``).

- Amdahl (1967): the *problem size is fixed*; N workers shrink only the parallel part, so
  ``speedup = 1 / ((1 - p) + p / N)``, which can never exceed ``1 / (1 - p)``.
- Gustafson (1988): the *time is fixed* and the problem grows with N (e.g. a bigger global batch
  with more data-parallel workers); ``scaled speedup = (1 - p) + p * N``, unbounded.
- Karp and Flatt (1990): from a *measured* speedup on N workers, the serial fraction that would
  explain it under Amdahl's law, ``e = (1 / S - 1 / N) / (1 - 1 / N)``.
"""

from __future__ import annotations

import numpy as np


def _check_fraction(p) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"the parallel fraction p must be in [0, 1], got {p}")
    return p


def _check_workers(n) -> np.ndarray:
    n = np.asarray(n, dtype=float)
    if np.any(n < 1):
        raise ValueError(f"the number of workers n must be at least 1, got {n}")
    return n


def amdahl(p, n):
    """Amdahl's speedup on ``n`` workers of a fixed-size job whose parallel fraction is ``p``.

    Works on scalars or arrays (broadcast); ``n`` may be ``inf`` (the limit ``1 / (1 - p)``)."""
    p, n = _check_fraction(p), _check_workers(n)
    with np.errstate(divide="ignore"):  # p = 1 and n = inf: an infinite speedup, not a warning
        speedup = 1.0 / ((1.0 - p) + p / n)
    return float(speedup) if speedup.ndim == 0 else speedup


def gustafson(p, n):
    """Gustafson's scaled speedup on ``n`` workers: the work grows with ``n``, the time does not.

    ``p`` is the parallel fraction of the time measured *on the n workers*."""
    p, n = _check_fraction(p), _check_workers(n)
    speedup = (1.0 - p) + p * n
    return float(speedup) if speedup.ndim == 0 else speedup


def max_speedup(p):
    """Amdahl's ceiling, the speedup with infinitely many workers: ``1 / (1 - p)``."""
    p = _check_fraction(p)
    with np.errstate(divide="ignore"):
        limit = 1.0 / (1.0 - p)
    return float(limit) if limit.ndim == 0 else limit


def serial_fraction_from_speedup(speedup, n):
    """The Karp-Flatt metric: the serial fraction ``1 - p`` implied by a measured ``speedup`` on
    ``n > 1`` workers (the inverse of :func:`amdahl`). Above 0 when the speedup falls short of
    ``n``; it rises with ``n`` when the overhead (communication, start-up) grows with the workers."""
    speedup, n = np.asarray(speedup, dtype=float), _check_workers(n)
    if np.any(n <= 1):
        raise ValueError("the Karp-Flatt metric needs n > 1 workers")
    if np.any(speedup <= 0):
        raise ValueError(f"a speedup must be positive, got {speedup}")
    e = (1.0 / speedup - 1.0 / n) / (1.0 - 1.0 / n)
    return float(e) if e.ndim == 0 else e


def efficiency(speedup, n):
    """Parallel efficiency: speedup per worker, 1.0 when N workers are N times as fast."""
    return np.asarray(speedup, dtype=float) / _check_workers(n)


def laws(p: float, max_workers: int) -> dict:
    """Both laws for 1..``max_workers`` workers at one ``p`` (the widget's pure function).

    Returns ``workers`` (N,), ``amdahl`` (N,), ``gustafson`` (N,), and the scalar ``limit``
    (Amdahl's ceiling, ``inf`` when ``p = 1``)."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    workers = np.arange(1, int(max_workers) + 1)
    return {
        "workers": workers,
        "amdahl": amdahl(p, workers),
        "gustafson": gustafson(p, workers),
        "limit": max_speedup(p),
    }
