"""A second ``transform`` with another ``batchSize`` vs one that must build a new model.

Before the worker-side model cache, any Param change (even ``batchSize`` or ``handleInvalid``)
made every Python worker build the Keras model again. This script measures, in one run and on
the same images, the two things a user now sees:

* **param change**: the same featurizer with another ``batchSize`` and ``handleInvalid``
  (the model is found in the workers' cache);
* **rebuild (baseline)**: the same featurizer with another ``inputSize``, a different network
  that every worker must build, which is what a ``batchSize`` change cost before.

Timed runs alternate the two kinds so load changes hit both alike; reported: the median seconds
of each and the median of the per-pair ratios rebuild / param change.

    python benchmarks/model_cache.py --model InceptionV3 --size 75 --images 16 --repeats 3
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
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--model", default="InceptionV3")
    p.add_argument("--size", type=int, default=75, help="first input height = width")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql.types import IntegerType, StructField, StructType

    from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct
    from pipelines.ml.featurizer import DeepImageFeaturizer

    spark = (SparkSession.builder.master("local[2]").appName("bench-model-cache")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(args.images, 28, 28), dtype=np.uint8)
        schema = StructType([StructField("id", IntegerType()), StructField("image", IMAGE_STRUCT)])
        df = spark.createDataFrame([(i, array_to_struct(p)) for i, p in enumerate(pixels)],
                                   schema).coalesce(1).cache()
        df.count()
        featurizer = DeepImageFeaturizer(modelName=args.model, inputSize=args.size,
                                         weights="none", batchSize=8)

        def run() -> float:
            start = time.perf_counter()
            # A noop write computes every column (count() would prune the features away).
            featurizer.transform(df).write.format("noop").mode("overwrite").save()
            return time.perf_counter() - start

        run()  # warm-up: TensorFlow import and the first build in the worker
        changed, rebuilt = [], []
        for i in range(args.repeats):
            featurizer.setInputSize(args.size)
            featurizer.setBatchSize(4 + i % 2 * 4).setHandleInvalid(["skip", "error"][i % 2])
            changed.append(run())
            featurizer.setInputSize(args.size + 1 + i)  # a network no worker has built yet
            rebuilt.append(run())
        ratios = [r / c for r, c in zip(rebuilt, changed, strict=True)]
        print(f"{args.model} {args.size}x{args.size}, {args.images} images, "
              f"{args.repeats} pairs")
        print(f"param change (cached model): median {statistics.median(changed):.2f} s "
              f"{[round(t, 2) for t in changed]}")
        print(f"rebuild (new inputSize):     median {statistics.median(rebuilt):.2f} s "
              f"{[round(t, 2) for t in rebuilt]}")
        print(f"rebuild / param change: median ratio {statistics.median(ratios):.1f}x")
        return 0
    finally:
        spark.stop()


if __name__ == "__main__":
    sys.exit(main())
