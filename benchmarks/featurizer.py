"""DeepImageFeaturizer throughput through Spark vs a bare single-process Keras ``predict``.

Both sides run the same model, input size, batch size and weights on the same images, in one
run, and both start from the same stored images held in memory (the baseline from image structs
in a Python list, Spark from a cached DataFrame of them), so the same work is counted on both
sides: struct -> RGB array, resize to the model input, ``preprocess_input``, ``predict``. The
baseline is what a user would write without Spark: ``to_batch`` (decode + resize) then
``model.predict(preprocess_input(x), batch_size=...)`` in one process with TensorFlow's default
threads. Spark adds Arrow transfers, its own scheduling and the vector conversion.

Fairness on a shared, noisy machine: each side runs once to warm up (TensorFlow import, model
build, JIT), then the timed runs alternate baseline, Spark, baseline, Spark... so a change in
the load of other processes hits both sides alike. Reported: median images/s of each side, and
the median of the per-pair ratios Spark / baseline (the figure to quote). Use enough images that
fixed per-query costs (job scheduling, ~0.1-0.3 s) do not dominate: 1024 at 75x75 takes ~10 s.

    python benchmarks/featurizer.py --input out/images --model InceptionV3 --size 75

Spark workers and TensorFlow threads: ``--partitions`` tasks run at once, each in its own Python
worker holding its own model; ``--threads`` caps TensorFlow's intra-op threads per worker
(0 = TensorFlow's default, all cores). On 2 cores, 2 partitions x 1 thread avoids the
oversubscription of 2 workers x 2 threads each; see docs/benchmarks.md for measured figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="out/images", help="image Parquet (ingest output); "
                   "random 28x28 digits when it does not exist")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--model", default="InceptionV3")
    p.add_argument("--size", type=int, default=75, help="input height = width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="TF intra-op threads per Spark worker")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from pipelines.ml.featurizer import DeepImageFeaturizer
    from pipelines.ml.inference import to_batch
    from pipelines.ml.models import build_application, preprocess_fn

    spark = (
        SparkSession.builder.master(f"local[{max(2, args.partitions)}]")
        .appName("bench-featurizer")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "256")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        images = _images(spark, args.input, args.images)
        df = images.repartition(args.partitions).cache()
        n = df.count()
        structs = [r.image.asDict() for r in df.select("image").collect()]

        # Baseline: one process, TensorFlow's default threads, decode + resize + predict.
        model = build_application(args.model, args.size, "none")
        preprocess = preprocess_fn(args.model)

        def baseline():
            x, _ = to_batch(structs, "struct", args.size, args.size, 3, "bilinear")
            model.predict(preprocess(x), batch_size=args.batch, verbose=0)

        featurizer = DeepImageFeaturizer(
            modelName=args.model, inputSize=args.size, weights="none", batchSize=args.batch,
            threads=args.threads,
        )
        out = featurizer.transform(df).select(F.col("features"))

        def through_spark():
            out.write.format("noop").mode("overwrite").save()

        baseline()
        cold = _timed(through_spark, 1)[0]
        base, warm, base_cpu, spark_cpu = [], [], [], []
        for _ in range(args.repeats):
            base += _timed(baseline, 1, base_cpu)
            warm += _timed(through_spark, 1, spark_cpu)
        load = os.getloadavg()
    finally:
        spark.stop()

    base_rate = n / statistics.median(base)
    spark_rate = n / statistics.median(warm)
    ratio = statistics.median(b / w for b, w in zip(base, warm, strict=True))
    print(f"model={args.model} input={args.size}x{args.size} batch={args.batch} images={n} "
          f"partitions={args.partitions} threads/worker={args.threads} weights=none "
          f"load average={load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(f"baseline Keras (1 process, TF default threads, decode+resize+predict): "
          f"{base_rate:8.1f} images/s  (median of {args.repeats}: "
          f"{' '.join(f'{t:.1f}' for t in base)} s)")
    print(f"Spark DeepImageFeaturizer (warm workers):                            "
          f"{spark_rate:8.1f} images/s  (median of {args.repeats}: "
          f"{' '.join(f'{t:.1f}' for t in warm)} s; first run with model builds "
          f"{n / cold:.1f} images/s)")
    print(f"ratio Spark / baseline: {ratio:.2f}x (median of {args.repeats} alternating pairs; "
          f"ratio of medians {spark_rate / base_rate:.2f}x; target >= 0.85x)")
    base_c, spark_c = statistics.median(base_cpu), statistics.median(spark_cpu)
    print(f"CPU seconds per 1000 images (all processes of each side, load-independent): "
          f"baseline {1000 * base_c / n:.1f}, Spark {1000 * spark_c / n:.1f} -> "
          f"Spark needs {spark_c / base_c:.2f}x the CPU of the baseline")
    return 0


def _timed(fn, repeats: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of each of ``repeats`` calls; CPU seconds of this process tree to ``cpu``."""
    times = []
    for _ in range(repeats):
        c, t = tree_cpu(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(cpu_seconds_since(c))
    return times


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system, with reaped children) of a process and each descendant.

    The Spark side runs in the JVM and Python workers below this process, so this counts the
    CPU both sides really used: unlike wall time it does not depend on how much of the machine
    other jobs take. Take the difference of two readings with :func:`cpu_seconds_since`.
    """
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        stats[int(entry)] = (int(fields[1]), ticks / os.sysconf("SC_CLK_TCK"))
    tree = {root}
    changed = True  # pids can wrap, so parents may sort after children: loop to a fixpoint
    while changed:
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def cpu_seconds_since(before: dict[int, float], root: int | None = None) -> float:
    """CPU seconds the process tree used since the :func:`tree_cpu` reading ``before``.

    Per process, so one that ended in between (an idle Python worker Spark stopped) does not
    subtract its whole past from the total; its last ticks are lost unless a process of the
    tree reaped it.
    """
    after = tree_cpu(root)
    return sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items())


def _images(spark, path: str, count: int):
    from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct

    if os.path.exists(path):
        from pipelines.io.image_parquet import read_images

        return read_images(spark, path).filter("split = 'test'").select("image").limit(count)
    from pyspark.sql.types import StructField, StructType

    rng = np.random.default_rng(0)
    rows = [(array_to_struct(rng.integers(0, 256, (28, 28), dtype=np.uint8)),)
            for _ in range(count)]
    return spark.createDataFrame(rows, StructType([StructField("image", IMAGE_STRUCT)]))


if __name__ == "__main__":
    sys.exit(main())
