"""Transfer learning: ``Pipeline([DeepImageFeaturizer, LogisticRegression])`` on image Parquet.

:func:`run_transfer` featurizes a train and a test subset once, fits a ``LogisticRegression`` on
the train features, evaluates on the test features and writes under ``transfer.output``:

* ``model/``: the fitted ``PipelineModel`` ``[DeepImageFeaturizer, LogisticRegressionModel]``,
  which scores raw images (``PipelineModel.load(path).transform(images)``). It is exactly what
  ``Pipeline([featurizer, lr]).fit(train)`` returns; building it from the fitted classifier
  lets every image be featurized once (and lets the features be cached).
* ``metrics.json``: top-1 accuracy (``top1``), weighted F1, per-class precision/recall, the
  confusion matrix, which weights were used, model, input size, subset sizes, dropped images and
  timings.
* ``confusion_matrix.png``.
* ``features/<key>/{train,test}``: the feature cache (``feature_cache: true``), reused while the
  model, weights, size, resize method, input path and subsets are unchanged, so the classifier
  can be re-tuned without featurizing again.

Before the model is published it is saved to a temporary folder, loaded back and used to score
``reload_check_rows`` test images from raw pixels; predictions must equal those of the in-memory
model or the job fails and the previous model stays in place.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config, TransferConfig
from pipelines.io.digest import sha256_json
from pipelines.io.image_parquet import read_images
from pipelines.io.storage import Storage
from pipelines.ml.applications import MODELS, resolve_size
from pipelines.ml.featurizer import DeepImageFeaturizer, describe_weights
from pipelines.ml.precision import resolve_precision
from pipelines.stages.evaluation import classification_metrics, confusion_matrix_png
from pipelines.stages.tracker import NO_TRACKER, Tracker

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = (
    "weights=none: the backbone is randomly initialised, so this accuracy is NOT a "
    "transfer-learning result (it measures random convolutional features + logistic regression)"
)


def run_transfer(spark: SparkSession, config: Config,
                 tracker: Tracker = NO_TRACKER) -> dict[str, Any]:
    """Fit and evaluate the transfer-learning pipeline; returns the metrics summary.

    ``tracker`` gets the fitted ``PipelineModel`` (the runner logs the files in ``artifacts``).

    Spark sends the featurizer ``transfer.arrow_max_records`` rows per Arrow batch while this
    stage runs; the session's own setting is restored afterwards for the stages that follow.
    """
    arrow_batch = str(config.transfer.arrow_max_records)
    with _session_conf(spark, "spark.sql.execution.arrow.maxRecordsPerBatch", arrow_batch):
        return _run_transfer(spark, config, tracker)


@contextmanager
def _session_conf(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    """Set a session conf for the duration of the block, then restore (or unset) it."""
    previous = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)


def _run_transfer(spark: SparkSession, config: Config, tracker: Tracker) -> dict[str, Any]:
    cfg = config.transfer
    started = time.perf_counter()
    storage = Storage(spark)
    output = cfg.output.rstrip("/")
    size = resolve_size(MODELS[cfg.model_name], cfg.input_size)
    weights_used = describe_weights(cfg.weights)
    logger.info("transfer: %s at %dx%d, weights: %s", cfg.model_name, size, size, weights_used)
    if cfg.weights == "none":
        logger.warning(RANDOM_WEIGHTS_NOTE)

    images = read_images(spark, cfg.input)
    train = subset(images, cfg.train_split, cfg.train_size, cfg.seed)
    test = subset(images, cfg.test_split, cfg.test_size, cfg.seed)
    featurizer = DeepImageFeaturizer(
        inputCol="image", outputCol="features", modelName=cfg.model_name, inputSize=size,
        weights=cfg.weights, scaleHint=cfg.scale_hint, batchSize=cfg.batch_size,
        threads=cfg.threads, handleInvalid=cfg.handle_invalid, precision=cfg.precision,
    )

    t = time.perf_counter()
    (train_f, test_f), cache = features(spark, storage, featurizer, {"train": train, "test": test},
                                        cfg, size)
    counts = {"train": train_f.count(), "test": test_f.count()}
    featurize_s = time.perf_counter() - t
    requested = {"train": train.count(), "test": test.count()}
    dropped = {k: requested[k] - counts[k] for k in counts}
    if counts["train"] == 0 or counts["test"] == 0:
        raise ValueError(
            f"no valid images to train or test on. Received: {counts} from {cfg.input!r} "
            f"(splits {cfg.train_split!r}/{cfg.test_split!r})"
        )
    if any(dropped.values()):
        logger.warning("dropped invalid images (handleInvalid=skip): %s", dropped)

    t = time.perf_counter()
    lr = LogisticRegression(
        featuresCol="features", labelCol="label", maxIter=cfg.max_iter, regParam=cfg.reg_param,
        elasticNetParam=cfg.elastic_net_param, family="multinomial",
    )
    lr_model = lr.fit(train_f)
    model = PipelineModel(stages=[featurizer, lr_model])
    fit_s = time.perf_counter() - t

    t = time.perf_counter()
    scored = lr_model.transform(test_f).select("id", "label", "prediction", "probability")
    pairs = scored.groupBy("label", "prediction").count().collect()
    n_classes = 1 + max([int(r["label"]) for r in pairs] + [int(r["prediction"]) for r in pairs])
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for r in pairs:
        matrix[int(r["label"]), int(r["prediction"])] = r["count"]
    names = class_names(cfg, n_classes, recorded_names(images))
    scores = classification_metrics(matrix, names)
    evaluate_s = time.perf_counter() - t

    t = time.perf_counter()
    model_path = f"{output}/model"
    with storage.staged_dir(model_path) as tmp:
        model.write().overwrite().save(tmp)
        reload = reload_check(tmp, test, scored, cfg.reload_check_rows)
    save_s = time.perf_counter() - t

    summary: dict[str, Any] = {
        "model_name": cfg.model_name,
        "input_size": size,
        "weights": cfg.weights,
        "weights_used": weights_used,
        "transfer_learning_result": cfg.weights != "none",
        "note": RANDOM_WEIGHTS_NOTE if cfg.weights == "none" else None,
        "scale_hint": cfg.scale_hint,
        "batch_size": cfg.batch_size,
        # As requested, and what it gave on the driver's CPU (each worker decides for its own).
        "precision": cfg.precision,
        "precision_on_driver": resolve_precision(cfg.precision)[0],
        "feature_dim": MODELS[cfg.model_name].feature_dim,
        "input": cfg.input,
        "train_size": counts["train"],
        "test_size": counts["test"],
        "dropped_invalid": dropped,
        "feature_cache": cache,
        **scores,
        "classifier": {"type": "LogisticRegression", "maxIter": cfg.max_iter,
                       "regParam": cfg.reg_param, "elasticNetParam": cfg.elastic_net_param,
                       "iterations": lr_model.summary.totalIterations},
        "reload_check": reload,
        "model_path": model_path,
        "artifacts": {"metrics": f"{output}/metrics.json",
                      "confusion_matrix": f"{output}/confusion_matrix.png"},
        "timings_s": {"featurize": round(featurize_s, 2), "fit": round(fit_s, 2),
                      "evaluate": round(evaluate_s, 2), "save_and_reload_check": round(save_s, 2),
                      "total": round(time.perf_counter() - started, 2)},
    }
    title = (f"{cfg.model_name} {size}x{size} + LogisticRegression, weights: {cfg.weights}"
             f"{' (random init, not transfer learning)' if cfg.weights == 'none' else ''}\n"
             f"top-1 {scores['top1']:.4f} on {counts['test']} test images")
    storage.write_bytes(summary["artifacts"]["confusion_matrix"],
                        confusion_matrix_png(matrix, names, title))
    storage.write_text(summary["artifacts"]["metrics"], json.dumps(summary, indent=2) + "\n")
    tracker.log_spark_model(model, test.select("image"))
    logger.info(
        "transfer: top-1 %.4f, weighted F1 %.4f on %d test images (weights: %s)",
        scores["top1"], scores["weighted_f1"], counts["test"], weights_used,
    )
    return summary


def subset(images: DataFrame, split: str, size: int | None, seed: int) -> DataFrame:
    """Rows of ``split``; with ``size``, the first ``size`` in a seeded hash order of ``id``."""
    rows = images.filter(F.col("split") == split).select("id", "label", "image")
    if size is None:
        return rows
    return rows.orderBy(F.xxhash64(F.lit(seed), F.col("id")), F.col("id")).limit(size)


def features(
    spark: SparkSession, storage: Storage, featurizer: DeepImageFeaturizer,
    frames: dict[str, DataFrame], cfg: TransferConfig, size: int,
) -> tuple[list[DataFrame], str]:
    """Featurize each frame once: into the Parquet cache, or persisted in memory/disk.

    Returns:
        (the featurized frames with ``id``, ``label``, ``features``, in ``frames`` order;
        ``"hit"``, ``"miss"`` or ``"off"``).
    """
    def featurize(df: DataFrame) -> DataFrame:
        return featurizer.transform(df.repartition(cfg.partitions)).select(
            "id", "label", "features"
        )

    if not cfg.feature_cache:
        out = [featurize(df).persist() for df in frames.values()]
        return out, "off"
    key = cache_key(cfg, size)
    root = f"{cfg.output.rstrip('/')}/features/{key}"
    if all(storage.exists(f"{root}/{name}/_SUCCESS") for name in frames):
        logger.info("feature cache hit: %s", root)
        return [spark.read.parquet(f"{root}/{name}") for name in frames], "hit"
    for name, df in frames.items():
        with storage.staged_dir(f"{root}/{name}") as tmp:
            featurize(df).write.parquet(tmp)
    logger.info("features cached in %s", root)
    return [spark.read.parquet(f"{root}/{name}") for name in frames], "miss"


def cache_key(cfg: TransferConfig, size: int) -> str:
    """Digest of everything the cached features depend on."""
    parts = {
        "model": cfg.model_name, "size": size, "weights": cfg.weights,
        "scale_hint": cfg.scale_hint, "input": cfg.input, "handle_invalid": cfg.handle_invalid,
        "train": [cfg.train_split, cfg.train_size], "test": [cfg.test_split, cfg.test_size],
        "seed": cfg.seed, "precision": cfg.precision,
    }
    return sha256_json(parts, 16)


def recorded_names(images: DataFrame) -> dict[int, str]:
    """Label -> class name from the data's ``label_name`` column (folder ingest), if any."""
    if "label_name" not in images.columns:
        return {}
    pairs = images.select("label", "label_name").distinct().collect()
    return {int(r["label"]): r["label_name"] for r in pairs if r["label_name"] is not None}


def class_names(cfg: TransferConfig, n_classes: int,
                recorded: dict[int, str] | None = None) -> list[str]:
    """``transfer.class_names``, else the names recorded with the data, else the numbers."""
    if not cfg.class_names and recorded:
        return [recorded.get(i, str(i)) for i in range(n_classes)]
    names = list(cfg.class_names or [])
    if names and len(names) < n_classes:
        raise ValueError(
            f"class_names must name all {n_classes} labels. Received: {len(names)} names"
        )
    return names[:n_classes] if names else [str(i) for i in range(n_classes)]


def reload_check(path: str, test: DataFrame, scored: DataFrame, rows: int) -> dict[str, Any]:
    """Load the saved PipelineModel, score ``rows`` raw test images, compare with ``scored``.

    Raises:
        RuntimeError: a prediction differs; the model is then not published.
    """
    if rows == 0:
        return {"rows": 0, "passed": None}
    sample = test.limit(rows)
    again = PipelineModel.load(path).transform(sample).select(
        "id", F.col("prediction").alias("reloaded"), F.col("probability").alias("p2")
    )
    joined = again.join(scored, "id").select("prediction", "reloaded", "probability", "p2")
    result = joined.collect()
    mismatches = sum(r["prediction"] != r["reloaded"] for r in result)
    diff = max(
        (float(np.max(np.abs(r["probability"].toArray() - r["p2"].toArray()))) for r in result),
        default=0.0,
    )
    check = {"rows": len(result), "prediction_mismatches": mismatches,
             "max_probability_diff": diff, "passed": mismatches == 0}
    if mismatches:
        raise RuntimeError(f"reloaded PipelineModel disagrees with the fitted one: {check}")
    logger.info("reload check passed: %s", check)
    return check
