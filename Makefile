# `make run`: the whole loop on the offline embedded default. `make test`: every test tier CI can run.
# Both create .venv and install with the pinned constraints first when needed.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run test test-fast data ui-prefect ui-mlflow bench clean team-up team-down

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt torch==2.13.0 -e ".[dev]"   # the CPU torch here; see README for CUDA
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true   # what pip byte-compiles (one file at a time), on every core; like pip, it skips the one file written for Python 3.12
	touch $@

data: install
	@test -f data/raw/interior_qa.csv || dvc pull -q data/raw/interior_qa.csv.dvc
	@test -d data/docs || dvc pull -q data/docs.dvc
	@test -f data/raw/copy_briefs.csv || dvc pull -q data/raw/copy_briefs.csv.dvc

run: data
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} loraops run

# The suite starts a few hundred Python processes: they keep the compiled loraops modules (git-ignored __pycache__)
# even where the environment says PYTHONDONTWRITEBYTECODE, instead of compiling src/ again in each (0.2 s apiece).
test: data
	PYTHONDONTWRITEBYTECODE= HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu" -n 3 --dist loadfile --no-loadscope-reorder --durations=30

test-fast: data
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

ui-mlflow: install
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the model-training view)"
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

ui-prefect: install
	prefect server start --host 127.0.0.1 --port 4200

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py --quick
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_throughput.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/retrieval.py

clean:
	rm -rf data/prepared models metrics reports

team-up: install
	$(PY) scripts/team_stack.py up          # PostgreSQL, SeaweedFS (S3), MLflow, Prefect on loopback; then: source .loraops/stack/stack.env

team-down:
	$(PY) scripts/team_stack.py down
