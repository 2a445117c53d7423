"""Distributed training benchmark: 2 executor workers x 1 core vs 1 worker x 1 core vs the driver.

All three train the same model (``--architecture``, default ``default``) on the same real MNIST
train rows with the same global batch, through :class:`KerasImageEstimator`:

* ``numWorkers=2`` on ``local-cluster[2,1,...]``: two executor JVMs of one core each, one
  training process per task with one TensorFlow thread pool of ``spark.task.cpus`` = 1 thread,
  gradients all-reduced every step (``MultiWorkerMirroredStrategy``, batch split 2 x half);
* ``numWorkers=1`` on the same cluster: one such worker, the whole batch (the baseline);
* ``numWorkers=0``: Keras ``fit`` in the driver process, TensorFlow's default threads (all cores).

Every training process is bound to its one core (``--bind always``, the Spark conf
``spark.pipelines.training.bindCores``): unbound, a lone one-thread worker also used the idle
core for TensorFlow's helper threads (118-127 % CPU), so "1 worker x 1 core" was not one core.

Throughput is training images per second over the epochs after the first (the first holds
graph tracing), taken from each run's own epoch timer (no validation in the runs); the fit's
wall time (task start to model returned, including TensorFlow start-up) is printed beside it.
Runs are interleaved; medians over ``--repeats``. The last epoch's training loss of each run is
printed beside it (the runs train the same model the same way; a few hundred steps are too few
for the default CNN's batch-norm moving statistics to settle, so test accuracy after such short
runs says nothing and is not printed). Target: 2 workers >= 1.7x 1 worker.

    PYTHONPATH=. python benchmarks/distributed_training.py --rows 12000 --epochs 3 --repeats 2 \
        --modes 2,1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

from pipelines.config import load_config  # noqa: E402
from pipelines.ml.distributed import BIND_CORES_CONF  # noqa: E402
from pipelines.ml.estimator import KerasImageEstimator  # noqa: E402
from pipelines.stages.ingest import mnist_frame  # noqa: E402
from pipelines.stages.mnist import MnistArrays, fetch_mnist, load_mnist  # noqa: E402


def images_per_second(summary: dict, rows: int) -> float:
    epochs = summary["epoch_seconds"][1:] or summary["epoch_seconds"]
    return rows / statistics.median(epochs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12000, help="MNIST train rows used")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--architecture", default="default")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--executor-memory", default="2048", help="MiB per executor")
    parser.add_argument("--modes", default="2,1,0", help="numWorkers values, in turn")
    parser.add_argument("--bind", default="always", choices=("always", "auto", "never"),
                        help="spark.pipelines.training.bindCores: always gives every worker "
                             "exactly its core (the baseline too); auto leaves a lone worker "
                             "unbound, so it also uses the idle core for TensorFlow's helper "
                             "threads")
    args = parser.parse_args(argv)

    from pyspark.sql import SparkSession

    config = load_config(ROOT / "conf" / "test.yaml", [f"mnist.cache_dir={ROOT / 'data/mnist'}"])
    arrays = load_mnist(fetch_mnist(config.mnist))
    train = MnistArrays(arrays.train_images[:args.rows], arrays.train_labels[:args.rows],
                        arrays.test_images, arrays.test_labels)
    spark = (SparkSession.builder.master(f"local-cluster[2,1,{args.executor_memory}]")
             .appName("bench-distributed-training")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "2g")
             .config(BIND_CORES_CONF, args.bind)
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    frame = mnist_frame(spark, train, 0).where("split = 'train'").cache()
    rows = frame.count()
    models = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    modes = [int(m) for m in args.modes.split(",")]
    results: dict[int, list[dict]] = {m: [] for m in modes}
    print(f"{rows} train rows, {args.architecture}, {args.epochs} epochs, global batch "
          f"{args.batch_size}, modes {modes}, {args.repeats} repeats, bindCores={args.bind}",
          flush=True)
    for repeat in range(args.repeats):
        for workers in modes:
            estimator = KerasImageEstimator(
                architecture=args.architecture, epochs=args.epochs, batchSize=args.batch_size,
                numWorkers=workers, seed=repeat, modelDir=str(models), numClasses=10)
            started = time.perf_counter()
            model = estimator.fit(frame)
            wall = time.perf_counter() - started
            summary = model.trainingSummary
            run = {"images_s": images_per_second(summary, rows), "wall": wall,
                   "epochs": [round(s, 2) for s in summary["epoch_seconds"]],
                   "loss": summary["history"]["loss"][-1],
                   "digests": len(set(summary.get("digests") or [summary["digest"]])),
                   "cores": summary.get("cores")}
            results[workers].append(run)
            print(f"repeat {repeat + 1} numWorkers={workers}: {run['images_s']:.0f} images/s, "
                  f"epochs {run['epochs']} s, fit wall {wall:.1f} s, last loss "
                  f"{run['loss']:.4f}, distinct final weights {run['digests']}, rank 0 bound "
                  f"to CPUs {run['cores']}", flush=True)
    spark.stop()

    median = {m: statistics.median(r["images_s"] for r in results[m]) for m in modes}
    walls = {m: statistics.median(r["wall"] for r in results[m]) for m in modes}
    print("\nmedians:")
    for m in modes:
        name = {0: "driver (all cores)", 1: "1 worker x 1 core", 2: "2 workers x 1 core"}.get(
            m, f"{m} workers")
        print(f"  {name:>20}: {median[m]:8.0f} images/s, fit wall {walls[m]:6.1f} s, last loss "
              f"{statistics.median(r['loss'] for r in results[m]):.4f}")
    if 1 in median and 2 in median:
        print(f"2 workers / 1 worker: {median[2] / median[1]:.2f}x throughput "
              f"(target >= 1.7x), {walls[1] / walls[2]:.2f}x fit wall time")
        pairs = [a["images_s"] / b["images_s"] for a, b in zip(results[2], results[1],
                                                                   strict=True)]
        print(f"  per repeat: {', '.join(f'{p:.2f}x' for p in pairs)}")
    if 0 in median and 2 in median:
        print(f"2 workers / driver: {median[2] / median[0]:.2f}x throughput, "
              f"{walls[0] / walls[2]:.2f}x fit wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
