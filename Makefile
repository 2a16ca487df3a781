# fmbseg: the two Quickstart commands (`make demo`, `make test`) and a few helpers.
# Everything installs into .venv on first use; `make install` forces it.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# Any recent torch/torchvision pair works; on the project's CI machines pip's constraint file pins
# them to the builds on disk (torch 2.14.1 / torchvision 0.29.1).
TORCH  ?= "torch>=2.3" "torchvision>=0.18"
PYTEST_ARGS ?=
# `make test` and `make test-fast` run on this many pytest-xdist workers (one per core of the 2-core CI
# machine; 0 = in pytest's own process), each worker running whole test files (a file's module-scoped
# fixtures are built once)
TEST_WORKERS ?= 2
XDIST  := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install test test-fast test-standins demo ui app lint bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -m "not standins" $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not standins" $(XDIST) $(PYTEST_ARGS)

# `fmbseg weights train-demo` reproduces the bundled stand-in files (both retrained side by side, ~10 min)
test-standins: install
	$(PY) -m pytest -m standins $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/fmbseg demo

# the MLflow store of a project folder: `make ui` (this one), `make ui STORE=demo` (the demo's)
STORE ?= .
ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(STORE))/mlflow.db \
	    --default-artifact-root $(abspath $(STORE))/mlartifacts --host 127.0.0.1 --port 5000

# the web page: try the model, review the Stage 1 store (`make app MODEL=runs:/<id>`; default: the champion)
MODEL ?=
app: install
	$(VENV)/bin/fmbseg app $(if $(MODEL),--model $(MODEL)) --port 7860

lint: install
	$(VENV)/bin/ruff check components demoworld flows tests bench

bench: install
	$(PY) bench/models.py --profile demo

clean-demo:
	rm -rf demo
