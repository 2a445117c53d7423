"""CNN benchmark: the train job's input pipeline vs in-memory numpy, and Spark scoring vs predict.

Measured in one run, against baselines measured in the same run (medians of repeats):

1. Epoch time of ``model.fit`` fed by the job's pipeline (Parquet -> Arrow record batches ->
   tf.data with shuffle buffer) vs ``model.fit`` on the same images already in memory as numpy.
   Target: ratio <= 1.15.
2. Driver memory: peak RSS growth while the pipeline streams the whole train split once (no
   training), next to the size of that split as float32 in memory; and the time of that pass
   (the pipeline's own cost, to compare with an epoch of training).
3. Scoring throughput of :class:`KerasImageClassifier` through Spark (``local[2]``, image Parquet,
   ``noop`` sink) vs a bare ``model.predict`` on numpy. Target: ratio >= 0.8.

    PYTHONPATH=. python benchmarks/cnn.py --images out/images
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.architectures import build_model, compile_model, resolve_architecture  # noqa: E402
from pipelines.cnn_data import make_dataset, open_split  # noqa: E402
from pipelines.config import load_config  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def subset(images: str, rows: int, folder: Path) -> str:
    """The first ``rows`` train rows and all test rows, as hive-partitioned image Parquet."""
    dataset = ds.dataset(images, format="parquet", partitioning="hive")
    for split, limit in (("train", rows), ("test", None)):
        table = dataset.to_table(filter=ds.field("split") == split)
        table = table.drop_columns(["split"])
        if limit is not None:
            table = table.slice(0, limit)
        (folder / f"split={split}").mkdir(parents=True)
        pq.write_table(table, folder / f"split={split}" / "part-0.parquet", row_group_size=4096)
    return str(folder)


def load_numpy(source) -> tuple[np.ndarray, np.ndarray]:
    parts = list(source.batches(4096))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class EpochTimer:
    def __init__(self):
        import keras

        class _T(keras.callbacks.Callback):
            def on_epoch_begin(inner, epoch, logs=None):
                inner.start = time.perf_counter()

            def on_epoch_end(inner, epoch, logs=None):
                self.times.append(time.perf_counter() - inner.start)

        self.times: list[float] = []
        self.callback = _T()


def bench_fit(spec, rows_path, args) -> dict:
    import keras

    source = open_split([rows_path], "train", tuple(spec.input_shape))
    x, y = load_numpy(source)
    x = x.astype(np.float32) / 255.0
    y = keras.utils.to_categorical(y, 10)
    results = {}
    for name in ("pipeline", "numpy"):
        keras.utils.set_random_seed(0)
        model = build_model(spec, 10)
        compile_model(model, spec, -(-len(x) // args.batch), args.epochs)
        timer = EpochTimer()
        if name == "pipeline":
            train = make_dataset(source, args.batch, 10, 4096, shuffle_buffer=10000, seed=0)
            model.fit(train, epochs=args.epochs, verbose=0, callbacks=[timer.callback])
        else:
            model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=True, verbose=0,
                      callbacks=[timer.callback])
        results[name] = timer.times
        keras.backend.clear_session()
    pipe = statistics.median(results["pipeline"][1:])
    bare = statistics.median(results["numpy"][1:])
    return {"rows": len(x), "epochs": args.epochs, "batch": args.batch,
            "pipeline_epoch_s": round(pipe, 2), "numpy_epoch_s": round(bare, 2),
            "ratio_pipeline_over_numpy": round(pipe / bare, 3), "target": "<= 1.15",
            "epoch_times": {k: [round(t, 2) for t in v] for k, v in results.items()}}


def bench_memory(spec, images: str) -> dict:
    source = open_split([images], "train", tuple(spec.input_shape))
    dataset = make_dataset(source, 512, 10, 4096, shuffle_buffer=10000, seed=0)
    before = rss_mb()
    peak = before
    rows = 0
    start = time.perf_counter()
    for batch, _ in dataset:
        rows += int(batch.shape[0])
        peak = max(peak, rss_mb())
    seconds = time.perf_counter() - start
    return {"rows_streamed": rows, "stream_seconds": round(seconds, 2),
            "stream_rows_per_s": round(rows / seconds), "rss_before_mb": round(before, 1),
            "rss_peak_growth_mb": round(peak - before, 1),
            "split_as_float32_mb": round(rows * 28 * 28 * 4 / 2**20, 1),
            "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                        1)}


def bench_score(spec, rows_path: str, args) -> dict:
    """Scoring throughput: KerasImageClassifier through Spark vs a bare ``model.predict``.

    Both sides start from the same stored images held in memory (Spark: the cached image
    DataFrame; baseline: the structs' pixel bytes collected from it) and count the same work:
    bytes -> float32 * 1/255 -> predict. The baseline decodes the fastest way a user would write
    (one ``np.frombuffer`` over all images), TensorFlow's default threads, one process. Each side
    is warmed up once (model load, JIT), then timed runs alternate baseline, Spark, baseline,
    Spark... so a change in the machine's load hits both; the ratio is the median of the pairs.
    """
    import keras
    from pyspark.sql import SparkSession

    from pipelines.keras_scorer import KerasImageClassifier

    folder = Path(tempfile.mkdtemp(prefix="cnn-bench-model-"))
    keras.utils.set_random_seed(0)
    model = build_model(spec, 10)
    model.save(folder / "model.keras")
    shape = tuple(spec.input_shape)

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master("local[2]").appName("bench-cnn")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    images = spark.read.parquet(rows_path).where("split = 'test'").select("id", "image")
    images = images.repartition(2).cache()
    n = images.count()
    stored = [r.data for r in images.select("image.data").collect()]
    scorer = KerasImageClassifier(modelPath=str(folder / "model.keras"),
                                  batchSize=args.score_batch)

    def bare():
        x = np.frombuffer(b"".join(stored), np.uint8).reshape(-1, *shape)
        model.predict(x.astype(np.float32) * np.float32(1 / 255), batch_size=args.score_batch,
                      verbose=0)

    def through_spark():
        scorer.transform(images).write.format("noop").mode("overwrite").save()

    bare()
    through_spark()  # warm workers: model loaded once per Python worker
    timed, base = [], []
    for _ in range(args.repeats):
        for fn, times in ((bare, base), (through_spark, timed)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    spark.stop()
    spark_rate, bare_rate = n / statistics.median(timed), n / statistics.median(base)
    ratio = statistics.median(b / t for b, t in zip(base, timed, strict=True))
    return {"rows": n, "batch": args.score_batch, "spark_images_per_s": round(spark_rate),
            "bare_predict_images_per_s": round(bare_rate),
            "ratio_spark_over_bare": round(ratio, 3), "target": ">= 0.8",
            "ratio_of_medians": round(spark_rate / bare_rate, 3),
            "spark_s": [round(t, 2) for t in timed], "bare_s": [round(t, 2) for t in base]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="out/images", help="ingested image Parquet")
    parser.add_argument("--architecture", default="seed")
    parser.add_argument("--rows", type=int, default=12000, help="train rows for the fit timing")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit (first dropped)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--score-batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = resolve_architecture(load_config(None, [f"cnn.architecture={args.architecture}"]).cnn)
    rows_path = subset(args.images, args.rows, Path(tempfile.mkdtemp(prefix="cnn-bench-")))
    report = {"architecture": args.architecture, "load_average": os.getloadavg()}
    report["memory"] = bench_memory(spec, args.images)
    report["fit"] = bench_fit(spec, rows_path, args)
    report["score"] = bench_score(spec, rows_path, args)
    print(json.dumps(report, indent=2))
    fit, sc = report["fit"], report["score"]
    print(f"fit epoch: pipeline {fit['pipeline_epoch_s']}s vs numpy {fit['numpy_epoch_s']}s "
          f"-> {fit['ratio_pipeline_over_numpy']}x (target <= 1.15)")
    print(f"driver memory: streaming {report['memory']['rows_streamed']} rows grew RSS by "
          f"{report['memory']['rss_peak_growth_mb']} MB (split as float32: "
          f"{report['memory']['split_as_float32_mb']} MB)")
    print(f"input pipeline alone: {report['memory']['stream_rows_per_s']} rows/s "
          f"(the whole train split in {report['memory']['stream_seconds']}s)")
    print(f"scoring: Spark {sc['spark_images_per_s']}/s vs predict "
          f"{sc['bare_predict_images_per_s']}/s -> {sc['ratio_spark_over_bare']}x (target >= 0.8)")


if __name__ == "__main__":
    main()
