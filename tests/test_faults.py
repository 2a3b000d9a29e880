"""The fault suite: faults and bad inputs, tried on purpose; nothing lost, nothing silent. One
file per area, ``tests/test_faults_*.py``, sharing ``tests/faults.py``:

- ``usage``: bad input to the entry point: exit 2, one line, before any worker starts, nothing
  written;
- ``input``: what would fail only at a run's end (a learning rate that vanishes in float32, an
  output path through a link or onto a FIFO, data files that can't be read), checked before it
  starts;
- ``training``: a diverging loss stops the run with one line naming the step; never a NaN in a
  JSON file;
- ``resume``: a corrupt checkpoint refused (the previous one used), a pipeline resumed exactly,
  half-written files cleaned, a run killed with SIGKILL resumed to the last bit;
- ``checkpoint``: checkpoints and output files that can't be turned against their user: a planted
  payload never runs, no temporary name can be guessed, one run per folder, a full disk;
- ``workers``: a worker that raises, dies, hangs; results that can't come back; two launches
  racing;
- ``signals``: a caller interrupted, terminated, hung up or killed leaves no worker behind;
- ``launch``: what a job on one machine listens on (loopback only), and the rank a timed-out
  collective waited for.

docs/command_line.md states how many cases they try; the test below keeps the two in step.
"""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_docs_state_how_many_faults_the_suite_tries():
    suite = sorted(str(p) for p in Path(__file__).parent.glob("test_faults*.py"))
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *suite],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    cases = sum(1 for line in listed.splitlines() if "::" in line) - 1  # less this test
    stated = re.search(
        r"\*\*(\d+) faults and bad inputs\*\*", (ROOT / "docs" / "command_line.md").read_text()
    )
    assert stated and int(stated.group(1)) == cases, f"docs/command_line.md should say {cases}"
