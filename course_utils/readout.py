"""One printed line per conclusion: a measurement, its spread, and what the noise lets us say.

Every lesson's verdicts go through here, so that the noise rule, the formatting of spreads and
the verbs are written (and tested) once:

- :func:`ratio`: a ratio (a speedup, a share of a bound) against a reference value, "clearly
  faster", "clearly slower" or "within the noise";
- :func:`compare`: two measurements of the same kind (throughputs, times), paired when they were
  measured in turns (:func:`course_utils.measure.interleaved`);
- :func:`trend`: a sweep read as "rises", "falls", "flat within the noise", or where it turns;
- :func:`against`: a measurement as a fraction of what a model or bound predicts;
- :func:`value`: one measurement with its spread, no verdict; :func:`table`: a few rows;
- :func:`busy`: how busy the machine was, from a :class:`course_utils.measure.Watch`.

The noise rule (:func:`verdict`): with two or more repeats, a measurement is *clearly* above a
reference only when every repeat is above it (its lowest repeat is), clearly below only when every
repeat is below (and the median is more than :data:`MIN_EFFECT` away: three repeats of equal
things all land on one side a quarter of the time); otherwise it is *within the noise*. Two spreads measured apart (not in turns) are
clearly different only when their ranges do not overlap. A single repeat has no spread to judge
by: it counts as clearly different only beyond :data:`ONE_SAMPLE_MARGIN`, and the line says it
was one run. The rule is conservative on purpose: a course that says "clearly" must be right.

Each function returns a :class:`Reading`: it prints as its line (also as the last expression of a
notebook cell) and keeps the ``verdict`` and the numbers for code and tests. Pure Python, no
plotting, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from course_utils.measure import Spread, Watch, spread

__all__ = [
    "ONE_SAMPLE_MARGIN",
    "MIN_EFFECT",
    "Reading",
    "verdict",
    "differ",
    "number",
    "span",
    "ratio",
    "compare",
    "trend",
    "against",
    "value",
    "table",
    "busy",
    "show",
]

ONE_SAMPLE_MARGIN = 0.10  # one run alone: "clearly" only when more than 10% away from the reference
MIN_EFFECT = 0.02  # and never for a median within 2% of it: a laptop can't resolve that much

ABOVE, BELOW, WITHIN = "above", "below", "within"


@dataclass(frozen=True)
class Reading:
    """One conclusion: ``line`` (what is printed), ``verdict`` ("above", "below", "within", or
    a trend's "rises", "falls", "flat", "turns"), and the numbers it was drawn from."""

    line: str
    verdict: str = ""
    numbers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.line

    def __repr__(self) -> str:  # a Reading left as a cell's last expression shows its line
        return self.line

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.line)


def _as_spread(x: Spread | float | Iterable[float]) -> Spread:
    if isinstance(x, Spread):
        return x
    if isinstance(x, (int, float)):
        return spread([x])
    return spread(x)


def number(x: float) -> str:
    """Three significant digits (1.00, 0.918, 12.5), thousands grouped (1,850)."""
    if x != x:
        return "nan"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:#.3g}".rstrip(".")


def span(s: Spread | float | Iterable[float], unit: str = "") -> str:
    """``median unit (low-high unit)``, or just ``median unit`` for one run."""
    s = _as_spread(s)
    if len(s.samples) == 1:
        return f"{number(s.median)}{unit}"
    dash = " to " if s.low < 0 else "-"  # (-6.00 to 1.20%), not (-6.00-1.20%)
    return f"{number(s.median)}{unit} ({number(s.low)}{dash}{number(s.high)}{unit})"


def verdict(s: Spread | float | Iterable[float], reference: float) -> str:
    """The noise rule against a fixed reference: "above" when every repeat is above it, "below"
    when every repeat is below, else "within"; a median within ``MIN_EFFECT`` of the reference
    is always "within". One repeat: beyond ``ONE_SAMPLE_MARGIN``."""
    s = _as_spread(s)
    if len(s.samples) == 1:
        x = s.median
        if x > reference * (1 + ONE_SAMPLE_MARGIN):
            return ABOVE
        if x < reference * (1 - ONE_SAMPLE_MARGIN):
            return BELOW
        return WITHIN
    if s.low > reference and s.median > reference * (1 + MIN_EFFECT):
        return ABOVE
    if s.high < reference and s.median < reference * (1 - MIN_EFFECT):
        return BELOW
    return WITHIN


def differ(a: Spread | Iterable[float], b: Spread | Iterable[float], paired: bool = True) -> str:
    """The noise rule for two measurements: "above" when ``a`` is clearly higher than ``b``,
    "below" when clearly lower, else "within". Paired (measured in turns, as many repeats): the
    ratios ``a_i / b_i`` against 1. Unpaired: their ranges must not overlap."""
    a, b = _as_spread(a), _as_spread(b)
    if paired and len(a.samples) == len(b.samples) and min(b.samples) > 0:
        return verdict([x / y for x, y in zip(a.samples, b.samples)], 1.0)
    if len(a.samples) == 1 and len(b.samples) == 1:
        return verdict(a.median / b.median, 1.0) if b.median > 0 else WITHIN
    if a.low > b.high:
        return ABOVE
    if a.high < b.low:
        return BELOW
    return WITHIN


def _one_run(s: Spread) -> str:
    return ", one run" if len(s.samples) == 1 else ""


def ratio(
    label: str,
    measured: Spread | float | Iterable[float],
    reference: float = 1.0,
    *,
    words: tuple[str, str] = ("faster", "slower"),
    baseline: str | None = None,
    unit: str = "x",
) -> Reading:
    """A ratio (e.g. paired speedups) against ``reference``: "label: 1.84x (1.71-1.93x), clearly
    faster than 1.00x". ``words`` are the verbs for above and below; ``baseline`` names the
    reference ("one process")."""
    s = _as_spread(measured)
    v = verdict(s, reference)
    base = baseline or f"{number(reference)}{unit}"
    if v == ABOVE:
        said = f"clearly {words[0]} than {base}"
    elif v == BELOW:
        said = f"clearly {words[1]} than {base}"
    else:
        said = f"within the noise of {base}"
    line = f"{label}: {span(s, unit)}, {said}{_one_run(s)}"
    return Reading(line, v, {"median": s.median, "low": s.low, "high": s.high, "ref": reference})


def compare(
    label: str,
    a: Spread | float | Iterable[float],
    b: Spread | float | Iterable[float],
    *,
    names: tuple[str, str] = ("A", "B"),
    unit: str = "",
    words: tuple[str, str] = ("higher", "lower"),
    paired: bool = True,
) -> Reading:
    """Two measurements of one kind: "label: A 778/s (760-790) vs B 693/s (650-720): A/B 1.12x
    (1.03-1.20x, paired), clearly higher". Paired ratios when both were measured in turns with
    as many repeats (the ratio printed is then the median of the per-round ratios, not the ratio
    of the medians); otherwise the ratio of medians, and the ranges decide."""
    a, b = _as_spread(a), _as_spread(b)
    v = differ(a, b, paired)
    pair = paired and len(a.samples) == len(b.samples) and len(a.samples) > 1 and b.low > 0
    if pair:
        r = spread(x / y for x, y in zip(a.samples, b.samples))
        how = f"{span(r, 'x')} paired"
    elif b.median:
        r = spread([a.median / b.median])
        how = f"{number(r.median)}x"
    else:  # nothing to divide by: the difference says it
        r = spread([float("nan")])
        how = f"difference {number(a.median - b.median)}{unit}"
    said = {ABOVE: f"clearly {words[0]}", BELOW: f"clearly {words[1]}", WITHIN: "within the noise"}
    runs = ", one run each" if len(a.samples) == 1 and len(b.samples) == 1 else ""
    line = (
        f"{label}: {names[0]} {span(a, unit)} vs {names[1]} {span(b, unit)}: "
        f"{how if not b.median else names[0] + '/' + names[1] + ' ' + how}, {said[v]}{runs}"
    )
    return Reading(line, v, {"a": a.median, "b": b.median, "ratio": r.median})


def trend(
    label: str,
    xs: Sequence,
    ys: Sequence[Spread | float | Iterable[float]],
    *,
    x_name: str = "",
    unit: str = "",
) -> Reading:
    """A sweep read as one word: "rises", "falls", "flat" (within the noise from end to end) or
    "turns" (a clear peak or dip inside the sweep, named with where it is)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a trend needs the same number of x and y values, at least two")
    ys = [_as_spread(y) for y in ys]
    meds = [y.median for y in ys]
    lo_i, hi_i = meds.index(min(meds)), meds.index(max(meds))
    ends = differ(ys[-1], ys[0], paired=False)
    at = f"{x_name} " if x_name else ""

    def point(i: int) -> str:
        return f"{span(ys[i], unit)} at {at}{xs[i]}"

    peak = 0 < hi_i < len(xs) - 1 and all(
        differ(ys[hi_i], ys[j], paired=False) == ABOVE for j in (0, len(xs) - 1)
    )
    dip = 0 < lo_i < len(xs) - 1 and all(
        differ(ys[lo_i], ys[j], paired=False) == BELOW for j in (0, len(xs) - 1)
    )
    if peak or dip:
        i = hi_i if peak else lo_i
        kind = "a peak" if peak else "a dip"
        line = f"{label}: turns, {kind} of {point(i)} (from {point(0)} to {point(-1)})"
        return Reading(line, "turns", {"turn": xs[i], "medians": meds})
    if ends == ABOVE:
        line = f"{label}: rises, from {point(0)} to {point(-1)}"
        return Reading(line, "rises", {"medians": meds})
    if ends == BELOW:
        line = f"{label}: falls, from {point(0)} to {point(-1)}"
        return Reading(line, "falls", {"medians": meds})
    line = f"{label}: flat within the noise, from {point(0)} to {point(-1)}"
    return Reading(line, "flat", {"medians": meds})


def against(
    label: str,
    measured: Spread | float | Iterable[float],
    model: float,
    *,
    model_name: str = "the model",
    unit: str = "",
) -> Reading:
    """A measurement as a fraction of a model's prediction or a bound: "label: 84% (81-87%) of
    the bound m·p/(m+p-1) = 1.78x". The verdict says whether it is clearly above the model,
    clearly below it, or within the noise of it."""
    s = _as_spread(measured)
    if model == 0:
        raise ValueError("against() divides by the model's value: it can't be 0")
    frac = spread(x / model for x in s.samples)
    pct = span(spread(100 * f for f in frac.samples), "%")
    v = verdict(frac, 1.0)
    said = {
        ABOVE: "clearly above it",
        BELOW: "clearly below it",
        WITHIN: "within the noise of it",
    }[v]
    line = f"{label}: {pct} of {model_name} = {number(model)}{unit}, {said}{_one_run(s)}"
    return Reading(line, v, {"fraction": frac.median, "low": frac.low, "high": frac.high})


def value(
    label: str, measured: Spread | float | Iterable[float], unit: str = "", computed: bool = False
) -> Reading:
    """One measurement and its spread, no verdict: "label: 693 samples/s (650-720)". A single
    timing says ", one run"; a ``computed`` number (a fit, an exact error) says nothing of runs."""
    s = _as_spread(measured)
    sep = " " if unit and unit[0].isalnum() and unit != "x" else ""  # 12 ms, 1.10x
    runs = "" if computed else _one_run(s)
    return Reading(f"{label}: {span(s, sep + unit)}{runs}", "", {"median": s.median})


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> Reading:
    """A few rows as aligned text columns (floats as :func:`number`, spreads as :func:`span`)."""

    def cell(x) -> str:
        if isinstance(x, Spread):
            return span(x)
        if isinstance(x, float):
            return number(x)
        if isinstance(x, int) and not isinstance(x, bool):
            return f"{x:,}"  # 819,752, as number() groups large floats
        return str(x)

    body = [[cell(x) for x in row] for row in rows]
    if any(len(r) != len(headers) for r in body):
        raise ValueError("every row needs one value per header")
    widths = [max([len(str(h))] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return Reading("\n".join(lines), "", {"rows": body})


def busy(watch: Watch) -> Reading:
    """How busy the machine was while a block was measured (:meth:`Watch.note`)."""
    return Reading(watch.note(), "quiet" if watch.quiet else "busy", {"others": watch.others})


def show(*readings: Reading | str) -> None:
    """Print several readings, one line each."""
    for r in readings:
        print(r)
