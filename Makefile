# Every target sets up .venv itself on first use (torch pinned by constraints.txt).
# OpenMP threads that sleep instead of spinning while they wait: set before any kernel loads torch
# (course_utils sets it too, when it is imported before torch; lesson 01 shows why it matters).
export OMP_WAIT_POLICY ?= PASSIVE
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: lab test lint unit e2e notebooks notebooks-spawn notebooks-full course site bench clean \
    cluster-up cluster-status cluster-down cluster-test

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@

# Extra flags for JupyterLab, e.g. make lab LAB_ARGS="--port 8899 --no-browser". As root (a
# container), JupyterLab refuses to start without --allow-root, so it is added there.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

# What CI runs (.ci/run): lint, unit tests, the browser test (tests/e2e; skipped, with the
# reason, where Chromium is missing) and every notebook under nbval, in fast mode, with the
# notebook's functions sent to its (forked) workers by value, as spawned workers get them.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	COURSE_FAST=1 $(BIN)/pytest --durations=15 tests --ignore=tests/cluster
	COURSE_FAST=1 COURSE_SEND_BY_VALUE=1 $(BIN)/pytest --nbval-lax --durations=5 notebooks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: $(STAMP)
	COURSE_FAST=1 $(BIN)/pytest tests --ignore=tests/e2e --ignore=tests/cluster

# A cluster on one machine (as root): nodes in network namespaces, a rate-limited link between
# them (scripts/README.md). make cluster-up CLUSTER_ARGS="--nodes 3 --rate 100mbit"
CLUSTER_ARGS ?= --nodes 2 --rate 1gbit
cluster-up: $(STAMP)
	scripts/cluster up $(CLUSTER_ARGS)
cluster-status: $(STAMP)
	scripts/cluster status
cluster-down: $(STAMP)
	scripts/cluster down

# Every test on the cluster (CI runs it after make test, as root): up and down leaving nothing,
# the link's rate, torchrun across the nodes, SLURM (Debian's slurm-wlm and munge), failures.
# Without root, or without SLURM, they skip and say why.
cluster-test: $(STAMP)
	COURSE_FAST=1 $(BIN)/pytest -v --durations=10 tests/cluster

# The widgets as a learner uses them: JupyterLab in headless Chromium, driven by Playwright
# (Debian's `chromium` package; no browser download). Screenshots go to build/e2e/.
e2e: $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	    { echo "make e2e needs Chromium on PATH (Debian/Ubuntu: apt-get install chromium)" >&2; exit 1; }
	COURSE_FAST=1 $(BIN)/pytest -v --durations=5 tests/e2e

notebooks: $(STAMP)
	COURSE_FAST=1 COURSE_SEND_BY_VALUE=1 $(BIN)/pytest --nbval-lax notebooks

# Lessons with every worker spawned (fresh interpreters, the notebook's functions sent by value)
# instead of forked: how they run where fork is missing or unsafe. A spawned worker costs ~2 s of
# imports, so CI spawns one lesson, the one with the most workers written in its cells
# (collectives), to stay within its time now that the cluster's tests run too; make test already
# sends every lesson's functions by value. SPAWN_LESSONS="notebooks/*.ipynb" spawns them all
# (SPAWN_LESSONS="notebooks/04*.ipynb notebooks/06*.ipynb notebooks/11*.ipynb": CI's three until
# the cluster came).
SPAWN_LESSONS ?= notebooks/04_communication.ipynb
notebooks-spawn: $(STAMP)
	COURSE_FAST=1 COURSE_START_METHOD=spawn $(BIN)/pytest --nbval-lax $(SPAWN_LESSONS)

# Lessons in full mode, as learners run them (CI runs these after make test): a tolerance or a
# size tuned in fast mode alone can't hide there. FULL_LESSONS="notebooks/*.ipynb" runs them all.
# One quick one by default (lesson 02, half a minute; lesson 04 was the second until lessons 14
# and 15 came to the cluster), to keep CI within its time; make course runs all of them.
FULL_LESSONS ?= notebooks/02_rnn_single_device.ipynb
notebooks-full: $(STAMP)
	COURSE_FAST=0 $(BIN)/pytest --nbval-lax --durations=5 $(FULL_LESSONS)

# The browsable book: build/course/ (from `make course`) as HTML pages in build/site/.
site: $(STAMP)
	$(BIN)/python book/build.py --notebooks build/course --out build/site

# Execute every notebook in full mode into build/course/, for readers without Jupyter.
course: $(STAMP)
	mkdir -p build/course
	COURSE_FAST=0 $(BIN)/jupyter nbconvert --to notebook --execute \
	    --ExecutePreprocessor.timeout=3600 --output-dir build/course notebooks/*.ipynb

# Measure (ratios within one run) and write benchmarks/results/*.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf build .pytest_cache .ruff_cache
