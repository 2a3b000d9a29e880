"""The package's shape (docs/architecture.md, "Layers" and "The rooms"): one module per idea,
none too long, imports running one way, and settings passed as parameters rather than through
environment variables."""

import ast
import re

import pytest
from conftest import ROOT

PACKAGE = ROOT / "course_utils"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 350  # "a file past ~300 lines is asking to be split" (the project's style guide)

# Layers from the bottom up: a module imports from its own layer or the ones below, never above.
# (notebooks -> widgets -> plots; train -> parallelize -> strategies -> launch, collectives,
# checkpoint -> loop, models, data, hardware.)
LAYERS = [
    {
        "hardware",
        "data",
        "models",
        "moe",
        "loop",
        "precision",
        "measure",
        "readout",
        "scaling",
        "interpret",
    }
    | {"debugging", "single_device"},
    {"launch", "cluster", "collectives", "topology", "compression", "checkpoint", "files"}
    | {"profiling", "overlap"},
    {
        "ddp",
        "sharding",
        "pipeline",
        "tensor_parallel",
        "context_parallel",
        "expert_parallel",
        "tp_timing",
        "long_context",
        "many_machines",
        "slow_link",
        "fsdp_precision",
        "cost_model",
        "challenges",
        "restart",
    },
    {"parallelize", "config", "train", "large_batch", "scaling_runs"},
    {"plots"},
    {"widgets"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
DRAWING = {"matplotlib", "ipywidgets", "IPython"}


def top_module(path) -> str:
    """``course_utils/pipeline/stages.py`` -> ``pipeline``; ``course_utils/data.py`` -> ``data``."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "course_utils":  # from course_utils import data, loop
                found |= {f"course_utils.{alias.name}" for alias in node.names}
    return found


def test_every_module_in_the_package_has_a_place_in_the_layers():
    tops = {top_module(p) for p in MODULES} - {"__init__"}
    assert tops == set(LAYER), "add new modules to LAYERS (and to docs/architecture.md)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_short_and_import_one_way(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it where an idea ends"
    if path.name == "__init__.py" and path.parent == PACKAGE:
        return  # the package's front door lists everything
    mine = LAYER[top_module(path)]
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "course_utils" and len(parts) > 1:
            assert LAYER[parts[1]] <= mine, f"imports {name}, a layer above it"
        if mine < LAYER["plots"]:
            assert parts[0] not in DRAWING, f"imports {name}: only plots and widgets may draw"


ENV_WRITE = re.compile(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(update|setdefault)\(|os\.putenv\(")


def test_settings_travel_as_parameters_not_environment_variables():
    # Read from the environment: COURSE_FAST (CI's fast mode), COURSE_DATA_DIR (a learner's
    # own full MNIST), COURSE_START_METHOD and COURSE_SEND_BY_VALUE (CI's runs of the lessons
    # with spawned workers, and with a notebook's functions sent by value). Written:
    # OMP_WAIT_POLICY (OpenMP reads nothing else, and only when torch loads), and in a launched
    # worker what torchrun would set (RANK, WORLD_SIZE, ...) and gloo's loopback interface.
    writers = []
    for path in MODULES:
        text = path.read_text()
        read = set(re.findall(r"COURSE_[A-Z_]+", text))
        allowed = {"COURSE_FAST", "COURSE_DATA_DIR", "COURSE_START_METHOD", "COURSE_SEND_BY_VALUE"}
        assert read <= allowed, path
        if ENV_WRITE.search(text):
            writers.append(str(path.relative_to(PACKAGE)))
    assert writers == ["__init__.py", "launch/worker.py"]  # OpenMP's wait policy; torchrun's
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert "use_gpu" not in notebook.read_text(), notebook.name


# The strategies (docs/architecture.md, "Rooms"): each applies one axis to a model, with the same
# face, and only the composing module puts them together.
STRATEGIES = {"ddp", "sharding", "tensor_parallel", "context_parallel", "expert_parallel"}
STRATEGIES |= {"pipeline"}
APPLIED = STRATEGIES - {"pipeline"}  # apply(model, mesh) -> the module to train


def test_only_the_composing_module_imports_more_than_one_strategy():
    for path in MODULES:
        if path == PACKAGE / "__init__.py":
            continue  # the package's front door lists everything
        used = {name.split(".")[1] for name in imports(path) if name.startswith("course_utils.")}
        others = (used & STRATEGIES) - {top_module(path)}
        if path == PACKAGE / "parallelize.py":
            assert others == STRATEGIES  # it composes them all
        else:
            assert len(others) <= 1, f"imports {sorted(others)}: compose in parallelize.py"


def test_every_strategy_has_the_same_face():
    import inspect

    import course_utils as cu

    for name in APPLIED:
        apply = getattr(cu, name).apply
        assert list(inspect.signature(apply).parameters)[:2] == ["model", "mesh"], name
    # a pipeline rank holds stages, not the model: its room builds the rank's whole role
    assert list(inspect.signature(cu.pipeline.role).parameters) == ["cfg", "me"]
    for name in ("tensor_parallel", "context_parallel", "expert_parallel", "pipeline"):
        assert callable(getattr(cu, name).config_error), name


def test_the_architecture_page_names_every_module_and_its_layer():
    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d) \| (.+?) \| .+ \|$", page, flags=re.MULTILINE)
    named = {
        int(layer): {name.strip("`/") for name in re.findall(r"`[a-z_/]+`", modules)}
        for layer, modules in rows
    }
    for i, names in enumerate(LAYERS):  # the page's layers count from 1, bottom up
        assert named.get(i + 1) == names, f"layer {i + 1} of docs/architecture.md"
