"""Reading the stacks a stuck run leaves behind (lesson 11): the frames of a ``faulthandler``
dump, which the launcher collects from every late rank (``LaunchTimeout.stacks[rank]``, from
:mod:`course_utils.launch`). A slow run leaves a trace instead: :mod:`course_utils.profiling.trace`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Frame", "frames"]


@dataclass(frozen=True)
class Frame:
    """One line of a Python stack dump: the file, the line number, the function."""

    path: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{Path(self.path).name}, line {self.line}, in {self.function}"


_FRAME = re.compile(r'^\s*File "(?P<path>.*)", line (?P<line>\d+) in (?P<function>.+)$')


def frames(dump: str) -> list[Frame]:
    """The main thread's frames in a ``faulthandler`` dump (a :class:`LaunchTimeout`'s
    ``stacks[rank]``), innermost first, down to the worker's function: the launcher's own frames
    below it (``child_main`` and what started it) are left out."""
    blocks = [b for b in dump.strip().split("\n\n") if "most recent call first" in b]
    if not blocks:
        return []
    # faulthandler marks the thread that took the signal (the main one) as "Current thread";
    # without the mark, the main thread is the oldest, listed last.
    block = next((b for b in blocks if b.lstrip().startswith("Current thread")), blocks[-1])
    out = []
    for line in block.splitlines():
        match = _FRAME.match(line)
        if match is None:
            continue
        if match["function"] == "child_main":
            break
        out.append(Frame(match["path"], int(match["line"]), match["function"]))
    return out
