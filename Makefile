# The two commands a newcomer needs (each sets everything up first):
#   make run    the whole pipeline on the embedded default (tiny gpt-oss, bundled data, CPU, no network)
#   make test   the test suite (unit + integration, step images on a real Docker engine; GPU tests skip without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=

.PHONY: setup run test system-deps

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/finetune run $(RUN_ARGS)

# The integration tests build and run the step images: a Docker engine (images/build.sh starts one when none runs)
# and debootstrap for the local base image (no registry needed). tests/test_stack.py starts PostgreSQL (initdb refuses
# root: it runs as the package's `postgres` user) and validates infra/compose/compose.yaml with docker-compose.
# Installed from Debian's packages when missing.
system-deps:
	@missing=""; \
	command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -z "$$missing" ] || { \
		[ "$$(id -u)" = 0 ] || { echo "make test needs$$missing: apt-get install$$missing" >&2; exit 1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
	[ "$$(id -u)" != 0 ] || id -u postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres

test: setup system-deps
	$(PY) -m pytest -m "not gpu and not sglang" $(PYTEST_ARGS)
