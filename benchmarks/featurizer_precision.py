"""DeepImageFeaturizer in ``precision="auto"`` vs bare Keras float32 and bfloat16 ``predict``.

At InceptionV3's native 299x299, on the same MNIST test images (gray 28x28, resized to
299x299 RGB on both sides) with the same batch size, in one run:

* **speed**: the featurizer through Spark (``local[2]``, 2 partitions, 1 TensorFlow thread per
  Python worker) in ``auto`` precision, against a bare single-process Keras
  ``model.predict(preprocess_input(x))`` (decode + resize included, TensorFlow's default
  threads) built in float32 and built under ``mixed_bfloat16``. Each side runs once to warm up;
  then the timed runs alternate (float32, bfloat16, Spark) so load changes hit all alike.
  Reported: medians and the median of the per-round ratios.
* **cold start**: the featurizer's first ``transform`` in a fresh session (Python workers start,
  import TensorFlow, build the model and trace it) against its warm median.
* **closeness**: cosine similarity per image between the featurizer's ``auto`` features and
  bare Keras float32 features of the same images.
* **transfer accuracy**: ``LogisticRegression`` on cached features of ``--train`` MNIST training
  images, scored on ``--test`` test images, once with float32 and once with ``auto`` features.

Weights are ``none`` (random initialisation, seeded: every side builds the same network). Speed
does not depend on the weights' values; accuracies are *not* transfer-learning results (no
ImageNet weights on this machine).

    python benchmarks/featurizer_precision.py --mnist data/mnist --images 512 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.featurizer import cpu_seconds_since, tree_cpu  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", default="data/mnist", help="folder with the four MNIST IDX files")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--model", default="InceptionV3")
    p.add_argument("--size", type=int, default=299, help="input height = width")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="TF intra-op threads per Spark worker")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train", type=int, default=500, help="training images for the accuracy check")
    p.add_argument("--test", type=int, default=500, help="test images for the accuracy check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import keras
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.sql import SparkSession

    from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct
    from pipelines.io.idx import read_idx
    from pipelines.ml.featurizer import DeepImageFeaturizer
    from pipelines.ml.inference import to_batch
    from pipelines.ml.model_cache import BUILD_LOG_ENV
    from pipelines.ml.models import build_application, preprocess_fn
    from pipelines.ml.precision import resolve_precision

    test_x = read_idx(os.path.join(args.mnist, "t10k-images-idx3-ubyte"))
    test_y = read_idx(os.path.join(args.mnist, "t10k-labels-idx1-ubyte"))
    train_x = read_idx(os.path.join(args.mnist, "train-images-idx3-ubyte"))
    train_y = read_idx(os.path.join(args.mnist, "train-labels-idx1-ubyte"))
    auto, why = resolve_precision("auto")
    # Workers inherit it from the JVM: one JSON line per model build (pipelines.ml.model_cache).
    builds_log = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    os.environ[BUILD_LOG_ENV] = builds_log

    def builds() -> int:
        with open(builds_log) as fh:
            return len(fh.read().splitlines())

    spark = (
        SparkSession.builder.master(f"local[{max(2, args.partitions)}]")
        .appName("bench-featurizer-precision")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "256")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    schema = "id INT, label DOUBLE, image " + IMAGE_STRUCT.simpleString()

    def frame(x, y, offset=0):
        rows = [(offset + i, float(y[i]), array_to_struct(x[i])) for i in range(len(x))]
        return spark.createDataFrame(rows, schema).repartition(args.partitions, "id")

    def featurizer(precision):
        return DeepImageFeaturizer(
            modelName=args.model, inputSize=args.size, weights="none", batchSize=args.batch,
            threads=args.threads, precision=precision,
        )

    try:
        n = args.images
        df = frame(test_x[:n], test_y[:n]).cache()
        df.count()
        structs = [array_to_struct(test_x[i]) for i in range(n)]
        out = featurizer("auto").transform(df).select("id", "features")

        def through_spark():
            out.write.format("noop").mode("overwrite").save()

        def keep_workers():
            # Spark stops a Python worker idle for a minute, and its model with it; a bare run
            # can last that long, so touch the workers after each one to keep the runs warm.
            spark.range(0, args.partitions, 1, args.partitions).mapInPandas(
                lambda batches: batches, "id long").write.format("noop").mode("overwrite").save()

        cold = _timed(through_spark)  # fresh workers: start, import, build, trace

        preprocess = preprocess_fn(args.model)
        models = {"float32": build_application(args.model, args.size, "none")}
        models["bfloat16"] = build_application(args.model, args.size, "none",
                                               precision="bfloat16")

        def bare(precision):
            def run():
                x, _ = to_batch(structs, "struct", args.size, args.size, 3, "bilinear")
                return models[precision].predict(preprocess(x), batch_size=args.batch, verbose=0)
            return run

        reference = np.asarray(bare("float32")(), dtype=np.float64)  # also its warm-up
        keep_workers()
        bare("bfloat16")()
        keep_workers()
        warm_builds = builds()
        times: dict[str, list[float]] = {"float32": [], "bfloat16": [], "spark": []}
        cpu: dict[str, list[float]] = {"float32": [], "bfloat16": [], "spark": []}
        for _ in range(args.repeats):
            for name, fn in (("float32", bare("float32")), ("bfloat16", bare("bfloat16")),
                             ("spark", through_spark)):
                c = tree_cpu()
                times[name].append(_timed(fn))
                cpu[name].append(cpu_seconds_since(c))
                if name != "spark":
                    keep_workers()
        rebuilt = builds() - warm_builds

        rows = sorted(out.collect(), key=lambda r: r.id)
        features = np.array([r.features.toArray() for r in rows])
        cosine = (features * reference).sum(1) / (
            np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))

        accuracy = {}
        train = frame(train_x[: args.train], train_y[: args.train])
        test = frame(test_x[n : n + args.test], test_y[n : n + args.test], offset=n)
        for precision in ("float32", "auto"):
            stage = featurizer(precision)
            train_f = stage.transform(train).cache()
            test_f = stage.transform(test).cache()
            model = LogisticRegression(labelCol="label", maxIter=100, regParam=0.01).fit(train_f)
            accuracy[precision] = MulticlassClassificationEvaluator(
                labelCol="label", metricName="accuracy").evaluate(model.transform(test_f))
            train_f.unpersist()
            test_f.unpersist()
        load = os.getloadavg()
    finally:
        spark.stop()

    rate = {name: n / statistics.median(t) for name, t in times.items()}
    vs32 = statistics.median(a / s for a, s in zip(times["float32"], times["spark"], strict=True))
    vs16 = statistics.median(a / s for a, s in zip(times["bfloat16"], times["spark"],
                                                   strict=True))
    print(f"model={args.model} input={args.size}x{args.size} batch={args.batch} images={n} "
          f"partitions={args.partitions} threads/worker={args.threads} weights=none "
          f"keras={keras.__version__} load average={load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print(f"auto on this machine: {auto} ({why})")
    for name, label in (("float32", "bare Keras float32 predict (1 process, TF threads)"),
                        ("bfloat16", "bare Keras mixed_bfloat16 predict               "),
                        ("spark", "Spark DeepImageFeaturizer precision=auto (warm)  ")):
        print(f"{label}: {rate[name]:7.1f} images/s  (runs: "
              f"{' '.join(f'{t:.1f}' for t in times[name])} s; CPU s per 100 images "
              f"{100 * statistics.median(cpu[name]) / n:.1f})")
    print(f"ratio featurizer auto / bare float32:  {vs32:.2f}x (median of {args.repeats} rounds; "
          f"target >= 1.8x)")
    print(f"ratio featurizer auto / bare bfloat16: {vs16:.2f}x (median of {args.repeats} rounds; "
          f"target >= 0.95x)")
    print(f"model builds in the timed Spark runs: {rebuilt} (0: every run found its workers' "
          f"models built)")
    print(f"cold start: first transform {n / cold:.1f} images/s = "
          f"{(n / cold) / rate['spark']:.2f}x warm ({cold:.1f} s; target >= 0.5x)")
    print(f"cosine(auto features, bare float32 features) per image: min {cosine.min():.5f}, "
          f"median {np.median(cosine):.5f} (target >= 0.99 per row)")
    print(f"transfer accuracy (LogisticRegression, {args.train} train / {args.test} test MNIST "
          f"images, random-init backbone): float32 {accuracy['float32']:.4f}, auto "
          f"{accuracy['auto']:.4f}, difference "
          f"{100 * (accuracy['auto'] - accuracy['float32']):+.2f} points (target within 1)")
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
