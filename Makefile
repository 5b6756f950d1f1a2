# Two commands for a new user:  `make demo` (set up + run two real rollouts)  and  `make test`.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/include:$(CURDIR)/plugins
export GX_ANALYTICS_ENABLED := False
export AIRFLOW__CORE__LOAD_EXAMPLES := False
VAR := $(CURDIR)/var
GATEWAY_HOST ?= 127.0.0.1
GATEWAY_PORT ?= 8808
MODEL_DIR ?= $(VAR)/models
DB_URL ?= sqlite:///$(VAR)/predictions.db
RATE ?= 50
DURATION ?= 60

.PHONY: setup test lint demo models gateway simulator airflow bench stack-test clean

# Installs pinned versions: constraints.txt is a `pip freeze` of a working install.
$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check dags plugins include tests benchmarks
	$(VENV)/bin/ruff check --select AIR dags plugins

test: setup lint
	$(VENV)/bin/pytest -q tests

models: setup
	$(PY) -m demo_models.train --out $(MODEL_DIR)

gateway: setup
	@test -n "$$CANARY_GATEWAY_TOKEN" || { echo "set CANARY_GATEWAY_TOKEN (the admin token) first"; exit 2; }
	$(PY) -m gateway --model-dir $(MODEL_DIR) --db-url $(DB_URL) --host $(GATEWAY_HOST) --port $(GATEWAY_PORT)

simulator: setup
	$(PY) -m simulator --url http://$(GATEWAY_HOST):$(GATEWAY_PORT) --model fraud --rate $(RATE) --duration $(DURATION)

demo: setup
	$(PY) -m canary_demo

# Airflow standalone on 127.0.0.1:8080 with the gateway and simulated traffic, for trying the UI form.
airflow: setup
	$(PY) -m airflow_local --gateway-port $(GATEWAY_PORT) --rate $(RATE) $(AIRFLOW_ARGS)

stack-test: setup
	$(VENV)/bin/pytest -q tests/stack

bench: setup
	$(PY) benchmarks/parse_time.py
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/decision_quality.py
	$(PY) benchmarks/analysis_scale.py

clean:
	rm -rf $(VAR) reports
