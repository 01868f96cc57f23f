# The two commands a newcomer needs (each sets everything up first):
#   make run    the whole pipeline on the embedded default (tiny gpt-oss, bundled data, CPU, no network)
#   make test   the test suite (unit + integration; GPU tests skip without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=

.PHONY: setup run test

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/finetune run $(RUN_ARGS)

test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)
