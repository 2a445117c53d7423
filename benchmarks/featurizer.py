"""DeepImageFeaturizer throughput through Spark vs a bare single-process Keras ``predict``.

Both sides run the same model, input size, batch size and weights on the same images, in one
run. The baseline is the fastest thing a user could write without Spark: the images already
decoded and resized in memory, then ``model.predict(preprocess_input(x), batch_size=...)``.
The Spark side starts from image structs cached in memory and includes everything the stage
does (struct -> RGB tensor, resize, Arrow transfer, preprocess_input, predict, vector
conversion). Each side runs once to warm up (TensorFlow import, model build), then ``--repeats``
timed runs; medians are compared. The ratio is Spark images/s over baseline images/s.

    python benchmarks/featurizer.py --input out/images --model InceptionV3 --size 75

Spark workers and TensorFlow threads: ``--partitions`` tasks run at once, each in its own Python
worker holding its own model; ``--threads`` caps TensorFlow's intra-op threads per worker
(0 = TensorFlow's default, all cores). On 2 cores, 2 partitions x 1 thread avoids the
oversubscription of 2 workers x 2 threads each; see docs/transfer.md for measured figures.
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

    from pipelines.featurizer import DeepImageFeaturizer
    from pipelines.keras_models import build_model, preprocess_fn
    from pipelines.tensors import to_batch

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

        # Baseline: one process, TensorFlow's default threads, images already resized in memory.
        model = build_model(args.model, args.size, "none")
        preprocess = preprocess_fn(args.model)
        t = time.perf_counter()
        x, _ = to_batch(structs, "struct", args.size, args.size, 3, "bilinear")
        prep_s = time.perf_counter() - t
        model.predict(preprocess(x[: args.batch]), batch_size=args.batch, verbose=0)
        base = _timed(lambda: model.predict(preprocess(x), batch_size=args.batch, verbose=0),
                      args.repeats)

        featurizer = DeepImageFeaturizer(
            modelName=args.model, inputSize=args.size, weights="none", batchSize=args.batch,
            threads=args.threads,
        )
        out = featurizer.transform(df).select(F.col("features"))
        cold = _timed(lambda: out.write.format("noop").mode("overwrite").save(), 1)[0]
        warm = _timed(lambda: out.write.format("noop").mode("overwrite").save(), args.repeats)
    finally:
        spark.stop()

    base_rate = n / statistics.median(base)
    spark_rate = n / statistics.median(warm)
    print(f"model={args.model} input={args.size}x{args.size} batch={args.batch} images={n} "
          f"partitions={args.partitions} threads/worker={args.threads} weights=none")
    print(f"baseline Keras predict (1 process, TF default threads): "
          f"{base_rate:8.1f} images/s  (median of {args.repeats}; decode+resize beforehand "
          f"took {prep_s:.2f}s, not counted)")
    print(f"Spark DeepImageFeaturizer (warm workers):            "
          f"{spark_rate:8.1f} images/s  (median of {args.repeats}; first run with model "
          f"builds {n / cold:.1f} images/s)")
    print(f"ratio Spark / baseline: {spark_rate / base_rate:.2f}x (target >= 0.85x)")
    return 0


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _images(spark, path: str, count: int):
    from pipelines.images import IMAGE_STRUCT, array_to_struct

    if os.path.exists(path):
        from pipelines.ingest import read_images

        return read_images(spark, path).filter("split = 'test'").select("image").limit(count)
    from pyspark.sql.types import StructField, StructType

    rng = np.random.default_rng(0)
    rows = [(array_to_struct(rng.integers(0, 256, (28, 28), dtype=np.uint8)),)
            for _ in range(count)]
    return spark.createDataFrame(rows, StructType([StructField("image", IMAGE_STRUCT)]))


if __name__ == "__main__":
    sys.exit(main())
