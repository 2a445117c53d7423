# Two commands do everything on a fresh machine:  make run   and   make test
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/local.yaml
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist), each file whole on one of them (its
# module fixtures, a local-cluster run or a pipeline run, are built once), in the order
# tests/conftest.py gives them (the longest first). 0 or 1: one process.
TEST_WORKERS ?= 2

.PHONY: install run test lint bench clean chromium dist FORCE

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
	$(PY) -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) \
	  $(PYTEST_ARGS)

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

# For clusters: the wheel, and a packed virtualenv holding it and what executors import, for
# spark-submit --archives dist/env.tar.gz#environment (see docs/cluster.md). Rebuilt only when
# the package, pyproject.toml or the options below changed.
#   DIST_PYSPARK=1            also pack pyspark and py4j (~490 MB unpacked). Left out by default:
#                             a cluster's Spark puts its own on the Python workers' path.
#   DIST_PYTHON_PREFIX=/usr   where Python 3.11 is on the nodes (the archive's bin/python links
#                             to <prefix>/bin/python3.11); default: this machine's interpreter.
#   DIST_COMPRESS_LEVEL=1     gzip level, 0-9. 1 packs in ~40 s here, 10 % larger than venv-pack's
#                             default 4 (~70 s); executors unpack either as fast.
DIST_ENV := build/env
DIST_PYSPARK ?= 0
DIST_PYTHON_PREFIX ?=
DIST_COMPRESS_LEVEL ?= 1
DIST_OPTIONS := pyspark=$(DIST_PYSPARK) prefix=$(DIST_PYTHON_PREFIX) python=$(PYTHON) \
  compress=$(DIST_COMPRESS_LEVEL)
# uv installs the archive's packages at the test environment's versions (its freeze is the
# constraints file), so executors run what `make test` passed with; it installs from its cache
# and compiles in parallel (~55 s here where pip took ~130 s). uv reads its own index settings
# (UV_DEFAULT_INDEX, UV_INDEX, uv.toml), not pip.conf. dist/constraints.txt is the same list
# without pyspark and py4j, for docker/Dockerfile, which pins pyspark to its image's Spark.
UV := $(VENV)/bin/uv
UV_DIST := --quiet --python $(DIST_ENV)/bin/python
DIST_SOURCES := pyproject.toml $(shell find pipelines -type f -not -path '*/__pycache__/*')

dist: dist/env.tar.gz

build/dist-options: FORCE
	@mkdir -p build
	@echo '$(DIST_OPTIONS)' | cmp -s - $@ || echo '$(DIST_OPTIONS)' > $@

dist/env.tar.gz: $(STAMP) $(DIST_SOURCES) build/dist-options
	rm -rf dist $(DIST_ENV) build/lib build/bdist.*
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dist]'
	$(PY) -m build --wheel --outdir dist .
	$(UV) pip freeze -q --python $(PY) --exclude-editable > build/constraints.txt
	grep -Ev '^(pyspark|py4j)==' build/constraints.txt > dist/constraints.txt
	$(PYTHON) -m venv --without-pip $(DIST_ENV)
	$(UV) pip install $(UV_DIST) --compile-bytecode -c build/constraints.txt dist/*.whl
	@if [ "$(DIST_PYSPARK)" != 1 ]; then $(UV) pip uninstall $(UV_DIST) pyspark py4j; fi
	$(VENV)/bin/venv-pack -q -p $(DIST_ENV) -o dist/env.tar.gz --compress-level $(DIST_COMPRESS_LEVEL) \
	  $(if $(DIST_PYTHON_PREFIX),--python-prefix $(DIST_PYTHON_PREFIX))
	chmod 0644 dist/env.tar.gz
	@base=$$($(DIST_ENV)/bin/python -c 'import sys; print(sys.base_prefix)'); \
	if [ -z "$(DIST_PYTHON_PREFIX)" ]; then case "$$base" in /home/*|/root/*) \
	  echo "WARNING: the archive's python links to $$base/bin/python3.11, in a home" \
	       "directory: nodes need Python 3.11 there. Set DIST_PYTHON_PREFIX=<prefix on the nodes>.";; \
	esac; fi
	@echo "dist/env.tar.gz: $$(du -m dist/env.tar.gz | cut -f1) MB packed," \
	  "$$(du -sm $(DIST_ENV) | cut -f1) MB unpacked on each executor"

FORCE:

clean:
	rm -rf out out-test spark-warehouse .pytest_cache build dist
