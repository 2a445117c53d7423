# Two commands do everything on a fresh machine:  make run   and   make test
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

# Reinstalls only when pyproject.toml changed (the package itself is installed editable).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

run: install
	$(PY) jobs/ingest_mnist.py --config $(CONFIG)
	$(PY) jobs/visualize.py --config $(CONFIG)
	$(PY) jobs/transfer.py --config $(CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pipelines jobs tests benchmarks

bench: install
	$(PY) benchmarks/ingest_mnist.py
	$(PY) benchmarks/featurizer.py --input out/images

clean:
	rm -rf out out-test spark-warehouse .pytest_cache
