"""environment.yml mirrors pyproject.toml's dependencies, and the torch pin is the same."""

import re

import tomllib
from conftest import ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_section = lines[lines.index("  - pip:") + 1 :]
    listed = {
        _name(line.split("- ", 1)[1])
        for line in pip_section
        if line.strip().startswith("- ") and not line.strip().startswith("- --")  # pip options
    }
    listed.discard("-e")
    assert listed == wanted


def test_torch_pin_agrees():
    pin = (ROOT / "constraints.txt").read_text()
    version = re.search(r"^torch==(\S+)", pin, re.M).group(1)
    assert f"torch=={version}" in (ROOT / "environment.yml").read_text()
