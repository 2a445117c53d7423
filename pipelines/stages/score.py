"""The score job: a saved Keras classifier applied to image Parquet or a folder of PNG files.

Writes Parquet rows ``id``, ``label`` (when the input has labels), ``prediction`` (double) and
``probability`` (vector) to ``score.output``, atomically; with labels also ``_metrics.json`` in
that folder (top-1 accuracy, per-class precision/recall, confusion matrix). Files whose name
starts with ``_`` are ignored by Parquet readers, like ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config, ScoreConfig
from pipelines.io.image_parquet import read_images
from pipelines.io.storage import Storage
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.precision import resolve_precision
from pipelines.stages.evaluation import classification_metrics

logger = logging.getLogger(__name__)


def run_score(spark: SparkSession, config: Config) -> dict[str, Any]:
    """Score the configured images and write predictions (and metrics when labels exist)."""
    cfg = config.score
    storage = Storage(spark)
    if cfg.mode == "error":
        storage.refuse_existing(cfg.output, "score")
    started = time.perf_counter()
    images, column = load_inputs(spark, cfg)
    scorer = KerasImageClassifier(
        modelPath=cfg.model, inputCol=column, batchSize=cfg.batch_size, scale=cfg.scale,
        scaleHint=cfg.resize_method, handleInvalid="keep", precision=cfg.precision,
    )
    keep = ["id"] + [c for c in ("label", "label_name") if c in images.columns]
    scored = scorer.transform(images).select(*keep, "prediction", "probability")
    summary: dict[str, Any] = {"model": cfg.model, "input": cfg.input, "output": cfg.output,
                               "precision": cfg.precision,
                               "precision_on_driver": resolve_precision(cfg.precision)[0]}
    with storage.staged_dir(cfg.output) as tmp:
        scored.write.mode("error").parquet(tmp)
        written = spark.read.parquet(tmp)
        summary["rows"] = written.count()
        summary["unscorable_rows"] = written.where(F.col("prediction").isNull()).count()
        if "label" in written.columns:
            metrics = score_metrics(written)
            storage.write_text(f"{tmp}/_metrics.json", json.dumps(metrics, indent=2) + "\n")
            summary["top1"] = metrics["top1"]
            summary["artifacts"] = {"metrics": f"{cfg.output.rstrip('/')}/_metrics.json"}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    logger.info("score: %s rows, top-1 %s, written to %s", summary["rows"],
                summary.get("top1"), cfg.output)
    return summary


def load_inputs(spark: SparkSession, cfg: ScoreConfig) -> tuple[DataFrame, str]:
    """The rows to score and the name of their image column."""
    if cfg.input_format == "parquet":
        df = read_images(spark, cfg.input)
        if cfg.splits is not None:
            if "split" not in df.columns:
                raise ValueError(f"score.splits is set but {cfg.input!r} has no split column. "
                                 f"Received: score.splits={cfg.splits}")
            df = df.where(F.col("split").isin(cfg.splits))
        if "id" not in df.columns:
            df = df.withColumn("id", F.col("image.origin"))
        return df, "image"
    files = (spark.read.format("binaryFile").option("pathGlobFilter", "*.png")
             .option("recursiveFileLookup", "true").load(cfg.input))
    # <folder>/<label>/<file>.png or <folder>/split=<s>/label=<l>/<file>.png give a label.
    label_dir = F.regexp_replace(F.regexp_extract("path", r"([^/]+)/[^/]+$", 1), "^label=", "")
    df = files.select(
        F.col("path").alias("id"),
        F.when(label_dir.rlike(r"^\d+$"), label_dir.cast("int")).alias("label"),
        F.col("content"),
    )
    if df.where(F.col("label").isNull()).limit(1).count():
        df = df.drop("label")
    return df, "content"


def score_metrics(scored: DataFrame) -> dict[str, Any]:
    """Top-1 and per-class precision/recall of scored rows with labels (aggregated by Spark)."""
    pairs = (scored.where(F.col("prediction").isNotNull())
             .groupBy("label", F.col("prediction").cast("int").alias("predicted")).count()
             .collect())
    if not pairs:
        return {"rows": 0, "top1": None}
    size = 1 + max(max(r["label"], r["predicted"]) for r in pairs)
    matrix = np.zeros((size, size), np.int64)
    for r in pairs:
        matrix[r["label"], r["predicted"]] = r["count"]
    return classification_metrics(matrix)
