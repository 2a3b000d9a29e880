"""Training that fails, tried on purpose: a loss that diverges stops the run with one line naming
the step (exit 1), under every strategy, and no JSON file ever holds a NaN. Part of the fault suite
(``tests/test_faults.py``)."""

import json
import re

import pytest
from conftest import run_cli

from course_utils import train


@pytest.mark.parametrize(
    "args",
    [[], ["--parallel", "ddp", "--nproc", "2"], ["--parallel", "pipeline", "--nproc", "2"]],
    ids=["none", "ddp", "pipeline"],
)
def test_a_diverging_loss_stops_the_run_with_one_line_naming_the_step(tmp_path, args):
    out = tmp_path / "out.json"
    proc = run_cli("--lr", "1e6", "--steps", "30", "--json", str(out), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(
        r"train: error: the loss is (nan|inf) at step \d+", lines[0]
    )
    assert not out.exists()  # no half-result, and never a NaN


def test_the_json_is_strict(tmp_path):
    out = tmp_path / "out.json"
    assert run_cli("--steps", "3", "--json", str(out)).returncode == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert len(result["losses"]) == 3
    with pytest.raises(ValueError):
        train.write_json(str(tmp_path / "nan.json"), {"loss": float("nan")})
