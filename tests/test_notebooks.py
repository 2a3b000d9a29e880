"""The committed notebooks themselves (nbval executes them; these check what it cannot)."""

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
    # baseline would compare a GPU with a CPU. Lessons 06-11 write such workers throughout, and
    # lesson 05 the ones it defines itself: they must ask for CPU workers (device="cpu"). (Lesson
    # 04's workers put their tensors on cu.launch.worker().device and run on either.)
    missing = []
    for path in NOTEBOOKS:
        cells = code_cells(path)
        defined = {name for cell in cells for name in re.findall(r"^def (\w+)\(", cell, re.M)}
        for cell in cells:
            for call in launches(cell):
                worker = re.match(r"cu\.launch\.run\(\s*([\w.]+)", call).group(1)
                cpu_only = path.stem[:2] in ("06", "07", "08", "09", "10", "11", "12") or (
                    path.stem[:2] == "05" and worker in defined
                )
                if cpu_only and 'device="cpu"' not in call:
                    missing.append(f"{path.name}: cu.launch.run({worker}, ...)")
    assert not missing, "\n".join(missing)
