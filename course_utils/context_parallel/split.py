"""How a sequence is divided over the context-parallel ranks, and which (query, key) pairs each
rank's attention computes.

A rank holds some tokens (its *positions*) and computes attention for their queries against
every key of the sequence, one rank's block of keys at a time. With a causal mask, query ``i``
sees key ``j`` only when ``j <= i``, so some pairs of a query chunk and a key chunk are hidden
whole and cost nothing: the ring skips them (:func:`plan`).

- **contiguous**: rank r holds chunk r of ``cp``. The first rank's queries see only their own
  chunk; the last rank's see the whole sequence. Under a causal mask the last rank does ``cp``
  times the first rank's work, and everyone waits for it.
- **zigzag**: the sequence cut in ``2 cp`` chunks; rank r holds chunk r (from the front) and
  chunk ``2 cp - 1 - r`` (from the back). Each rank pairs a cheap chunk with an expensive one,
  and every rank does the same work (Brandon et al. 2023, "Striped Attention", arXiv:2311.09431,
  for the idea of balancing; the zigzag form is Llama 3's, arXiv:2407.21783).

:func:`work` counts the score pairs each rank computes with exactly the plan the ring runs, so
the lesson can show the last contiguous rank doing the most and zigzag's ranks level.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

LAYOUTS = ("zigzag", "contiguous")


def chunks(seq_len: int, cp: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The chunks rank ``rank`` holds, as global (start, stop) ranges, in increasing order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not one of {cp} context-parallel ranks")
    pieces = 2 * cp if layout == "zigzag" else cp
    if seq_len % pieces:
        raise ValueError(
            f"a sequence of {seq_len} tokens does not divide into {pieces} equal chunks "
            f"({layout} split over {cp} ranks)"
        )
    size = seq_len // pieces
    held = [rank, 2 * cp - 1 - rank] if layout == "zigzag" else [rank]
    return [(c * size, (c + 1) * size) for c in held]


def positions(seq_len: int, cp: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """The global positions rank ``rank`` holds (a LongTensor, increasing): for ``contiguous``
    chunk ``rank`` of ``cp``; for ``zigzag`` chunks ``rank`` and ``2 cp - 1 - rank`` of ``2 cp``."""
    return torch.cat([torch.arange(a, b) for a, b in chunks(seq_len, cp, rank, layout)])


def layout_of(held: torch.Tensor, cp: int, rank: int) -> str:
    """Which layout gave rank ``rank`` the positions ``held`` (one rank's tokens of a sequence
    of ``cp * len(held)``). From it every rank knows every other rank's positions without a
    message. At ``cp = 1`` both layouts hold the whole sequence: zigzag is named, whose two
    chunks let the ring skip the hidden quarter of the scores."""
    seq_len, held = cp * len(held), held.tolist()
    for layout in LAYOUTS:
        try:
            if positions(seq_len, cp, rank, layout).tolist() == held:
                return layout
        except ValueError:
            continue
    raise ValueError(
        f"rank {rank} of {cp} holds positions {held[:4]}...: neither a zigzag nor a "
        f"contiguous split of {seq_len} tokens"
    )


class Piece(NamedTuple):
    """One rectangle of scores: local query rows ``rows`` against local key columns ``cols`` of
    one block. ``diagonal``: rows and columns are the same chunk of the sequence, so each query
    sees the keys up to its own position (causal within the square); otherwise it sees them all."""

    rows: slice
    cols: slice
    diagonal: bool


@lru_cache(maxsize=4096)
def plan(
    seq_len: int, cp: int, rank: int, owner: int, layout: str = "zigzag", causal: bool = True
) -> tuple[Piece, ...]:
    """The rectangles of scores rank ``rank``'s queries compute against the key block of rank
    ``owner``. Without a causal mask: the whole block. With one, chunk by chunk: the chunks are
    equal and aligned, so a key chunk lies before a query chunk (seen whole), is the same chunk
    (its diagonal, causal within) or lies after it (hidden whole: skipped, no arithmetic).
    Neighbouring query chunks that see the same keys share one rectangle."""
    mine, theirs = chunks(seq_len, cp, rank, layout), chunks(seq_len, cp, owner, layout)
    n_local = seq_len // cp
    if not causal:
        return (Piece(slice(0, n_local), slice(0, n_local), False),)
    pieces: list[Piece] = []
    row = 0
    for q_start, q_stop in mine:
        rows = slice(row, row + q_stop - q_start)
        row, col, before, same = rows.stop, 0, None, None
        for k_start, k_stop in theirs:  # in increasing order: the chunks before are a prefix
            if k_stop <= q_start:
                before = slice(0, col + k_stop - k_start)
            elif k_start == q_start:
                same = slice(col, col + k_stop - k_start)
            col += k_stop - k_start
        if before:
            last = pieces[-1] if pieces else None
            if last and not last.diagonal and last.cols == before and last.rows.stop == rows.start:
                pieces[-1] = Piece(slice(last.rows.start, rows.stop), before, False)
            else:
                pieces.append(Piece(rows, before, False))
        if same:
            pieces.append(Piece(rows, same, True))
    return tuple(pieces)


def work(seq_len: int, cp: int, layout: str = "zigzag", causal: bool = True) -> list[int]:
    """Per rank, the (query, key) score pairs its attention computes over all ``cp`` key
    blocks, by the ring's own :func:`plan` (whole hidden chunk pairs skipped)."""
    return [
        sum(
            (p.rows.stop - p.rows.start) * (p.cols.stop - p.cols.start)
            for owner in range(cp)
            for p in plan(seq_len, cp, rank, owner, layout, causal)
        )
        for rank in range(cp)
    ]
