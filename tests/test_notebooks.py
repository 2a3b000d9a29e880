"""The committed notebooks themselves (nbval executes them; these check what it cannot)."""

import ast
import json
import re

import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_cells(path):
    return [
        "".join(c["source"])
        for c in json.loads(path.read_text())["cells"]
        if c["cell_type"] == "code"
    ]


def launches(source: str):
    """The text of every ``cu.launch.run(...)`` call in a cell."""
    for match in re.finditer(r"cu\.launch\.run\(", source):
        depth = 0
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        yield source[match.start() : end + 1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    dirty = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"] is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs (clear them before committing)"


def test_workers_with_cpu_tensors_are_launched_as_cpu_workers():
    # On a machine with GPUs, cu.launch.run gives its workers NCCL and a GPU each: a worker that
    # keeps its tensors on the CPU then fails ("no GPU tensor" in NCCL), and a speedup over a CPU
    # baseline would compare a GPU with a CPU. Lessons 06-12 write such workers throughout, and
    # lesson 05 the ones it defines itself: they must ask for CPU workers (device="cpu"). (Lesson
    # 04's workers put their tensors on cu.launch.worker().device and run on either.)
    missing = []
    for path in NOTEBOOKS:
        cells = code_cells(path)
        defined = {name for cell in cells for name in re.findall(r"^def (\w+)\(", cell, re.M)}
        for cell in cells:
            for call in launches(cell):
                named = re.match(r"cu\.launch\.run\(\s*([\w.]+)", call)
                worker = named.group(1) if named else call  # run(*args, ...): checked as a whole
                cpu_only = path.stem[:2] in ("06", "07", "08", "09", "10", "11", "12") or (
                    path.stem[:2] == "05" and worker in defined
                )
                if cpu_only and 'device="cpu"' not in call:
                    missing.append(f"{path.name}: cu.launch.run({worker}, ...)")
    assert not missing, "\n".join(missing)


# --- one sitting per lesson (issue 22): the limits a learner can read in -------------------------

MAX_CELL_LINES = 40  # a cell, blank and comment lines included
MAX_CODE_LINES = 650  # about 600 lines of code per lesson (comments and blank lines not counted)
MAX_MARKDOWN_WORDS = 5000
MAX_SENTENCE_SHARE = 0.12  # over all lessons: code lines that only compose sentences


def _words(node) -> int:
    return max(
        (
            len(sub.value.split())
            for sub in ast.walk(node)
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
        ),
        default=0,
    )


def _composes(st) -> bool:
    """A statement that only builds a sentence: a print, assignment or return holding a string
    of three or more words, or an ``if`` whose branches all do only that."""
    if isinstance(st, (ast.Expr, ast.Assign, ast.AugAssign, ast.Return, ast.AnnAssign)):
        return _words(st) >= 3
    if isinstance(st, ast.If):
        return all(_composes(s) or isinstance(s, ast.Pass) for s in st.body + st.orelse)
    return False


def _composing_lines(stmts, out: set) -> None:
    for st in stmts:
        if _composes(st):
            out.update(range(st.lineno, st.end_lineno + 1))
            continue
        for name in ("body", "orelse", "finalbody"):
            sub = getattr(st, name, None)
            if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                _composing_lines(sub, out)
        for handler in getattr(st, "handlers", []) or []:
            _composing_lines(handler.body, out)


def readability(path):
    """Code lines, the longest cell, composing lines and markdown words of one lesson."""
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    words = sum(len("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    lines = composing = 0
    for src in code:
        kept = [
            ln
            for ln in src.splitlines()
            if ln.strip() and not ln.strip().startswith(("#", "%", "!"))
        ]
        lines += len(kept)
        clean = "\n".join("pass" if ln.strip()[:1] in ("%", "!") else ln for ln in src.splitlines())
        out: set = set()
        _composing_lines(ast.parse(clean).body, out)
        rows = clean.splitlines()
        composing += sum(
            1 for i in out if rows[i - 1].strip() and not rows[i - 1].strip()[0] == "#"
        )
    longest = max((len(src.splitlines()) for src in code), default=0)
    return {"code": lines, "longest": longest, "composing": composing, "words": words}


LESSONS = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_a_lesson_fits_one_sitting(path):
    r = readability(path)
    assert r["longest"] <= MAX_CELL_LINES, f"{path.name}: a cell of {r['longest']} lines"
    assert r["code"] <= MAX_CODE_LINES, f"{path.name}: {r['code']} lines of code"
    assert r["words"] <= MAX_MARKDOWN_WORDS, f"{path.name}: {r['words']} words of markdown"


def test_the_lessons_say_their_conclusions_through_the_readout():
    total = [readability(p) for p in LESSONS]
    share = sum(r["composing"] for r in total) / sum(r["code"] for r in total)
    assert share <= MAX_SENTENCE_SHARE, f"{share:.0%} of the code lines compose sentences"
