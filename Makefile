# Two commands do everything on a fresh machine:  make run   and   make test
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean chromium dist

install: $(STAMP)

# Reinstalls only when pyproject.toml changed (the package itself is installed editable).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

# The whole pipeline; a second run skips every stage whose manifest still matches.
run: install
	$(PY) jobs/run_pipeline.py --config $(CONFIG)
	@$(PY) -c "import os; from pipelines.config import load_config as c; \
	p = c('$(CONFIG)').report.output + '/index.html'; \
	print('Report:', p if ':/' in p else 'file://' + os.path.abspath(p))"
	@$(PY) -c "from pipelines.config import load_config as c; from pipelines.run.tracking import \
	store_uri; k = c('$(CONFIG)'); k.tracking.enabled and print('MLflow: mlflow ui', \
	'--backend-store-uri', store_uri(k))"

# Headless Chromium renders the HTML report in the tests (Debian's package; we run as root).
chromium:
	@test -x /usr/bin/chromium || (apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

test: install chromium
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pipelines jobs tests benchmarks
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/ingest_mnist.py
	$(PY) benchmarks/export_png.py
	$(PY) benchmarks/augment.py
	$(PY) benchmarks/featurizer.py
	$(PY) benchmarks/model_cache.py
	$(PY) benchmarks/cnn.py --images out/images
	$(PY) benchmarks/cnn_architectures.py --images out/images --architectures seed,default --rows 3072 --rounds 3

# For clusters: the wheel, and a packed virtualenv holding it and every dependency, for
# spark-submit --archives dist/env.tar.gz#environment (see docs/cluster.md).
DIST_ENV := build/env
dist: install
	rm -rf dist $(DIST_ENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dist]'
	$(PY) -m build --wheel --outdir dist .
	$(PYTHON) -m venv $(DIST_ENV)
	$(DIST_ENV)/bin/pip install --disable-pip-version-check -q dist/*.whl
	$(VENV)/bin/venv-pack -q -p $(DIST_ENV) -o dist/env.tar.gz
	@ls -lh dist

clean:
	rm -rf out out-test spark-warehouse .pytest_cache build dist
