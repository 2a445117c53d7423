"""Ingest: MNIST IDX files, or a folder of labelled image files, into image Parquet.

Output rows: ``id`` (string, stable across runs), ``split`` (``train``/``validation``/``test``),
``label`` (int) and ``image`` (Spark's image struct); Parquet partitioned by ``split``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config
from pipelines.imaging.image_struct import IMAGE_STRUCT, OCV_MODE_BY_CHANNELS
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA, write_image_parquet
from pipelines.io.storage import Storage
from pipelines.stages.mnist import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    MnistArrays,
    fetch_mnist,
    load_mnist,
)

logger = logging.getLogger(__name__)


def run_ingest(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The ingest job: build the image DataFrame from the configured source and write it."""
    cfg = config.ingest
    storage = Storage(spark)
    if cfg.mode == "error":
        storage.refuse_existing(cfg.output, "ingest")
    started = time.perf_counter()
    if cfg.source == "mnist":
        files = fetch_mnist(config.mnist)
        df = mnist_frame(spark, load_mnist(files), cfg.validation_size)
        source = f"mnist ({files.source})"
    else:
        if not cfg.folder:
            raise ValueError("ingest.source is 'folder' but ingest.folder is not set")
        df = image_folder_frame(spark, cfg.folder, cfg.folder_split, cfg.class_names)
        source = f"folder {cfg.folder}"
    counts = write_image_parquet(spark, df, cfg.output, cfg.partitions)
    summary = {
        "source": source,
        "output": cfg.output,
        "rows": sum(counts.values()),
        "rows_per_split": counts,
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info("ingest wrote %s rows %s to %s", summary["rows"], counts, cfg.output)
    return summary


def mnist_frame(spark: SparkSession, arrays: MnistArrays, validation_size: int) -> DataFrame:
    """MNIST arrays -> image DataFrame (no Python object per row: Arrow buffers end to end).

    The first ``validation_size`` training images form the validation split, as in
    TensorFlow's MNIST helper; ids are ``train-00000`` ... and ``test-00000`` ....
    """
    n_train = len(arrays.train_labels)
    if not 0 <= validation_size < n_train:
        raise ValueError(
            f"validation_size must be in [0, {n_train}). "
            f"Received: validation_size={validation_size}"
        )
    train_split = np.where(np.arange(n_train) < validation_size, "validation", "train")
    tables = [
        images_to_arrow("train", TRAIN_IMAGES, arrays.train_images, arrays.train_labels,
                        train_split),
        images_to_arrow("test", TEST_IMAGES, arrays.test_images, arrays.test_labels,
                        np.full(len(arrays.test_labels), "test")),
    ]
    return spark.createDataFrame(pa.concat_tables(tables), schema=IMAGE_ROW_SCHEMA)


def images_to_arrow(
    prefix: str, file_name: str, images: np.ndarray, labels: np.ndarray, splits: np.ndarray
) -> pa.Table:
    """uint8 images (N, H, W[, C]) -> Arrow table in :data:`IMAGE_ROW_SCHEMA`, zero-copy data."""
    n = len(images)
    height, width = images.shape[1:3]
    channels = 1 if images.ndim == 3 else images.shape[3]
    per_image = height * width * channels
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * per_image)
    pixels = pa.py_buffer(np.ascontiguousarray(images))
    data = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pixels])
    width_digits = max(5, len(str(n - 1)))
    ids = [f"{prefix}-{i:0{width_digits}d}" for i in range(n)]
    image = pa.StructArray.from_arrays(
        [
            pa.array([f"mnist:{file_name}#{i}" for i in range(n)], pa.string()),
            pa.array(np.full(n, height, np.int32)),
            pa.array(np.full(n, width, np.int32)),
            pa.array(np.full(n, channels, np.int32)),
            pa.array(np.full(n, OCV_MODE_BY_CHANNELS[channels], np.int32)),
            data,
        ],
        names=[f.name for f in IMAGE_STRUCT.fields],
    )
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "split": pa.array(splits.astype(str), pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "image": image,
        }
    )


def image_folder_frame(
    spark: SparkSession, folder: str, split: str, class_names: list[str] | None = None
) -> DataFrame:
    """A folder of image files whose parent folder names are labels -> image DataFrame.

    Accepts ``<folder>/<label>/<file>`` and this project's export layout
    ``<folder>/split=<s>/label=<label>/<file>`` (the split is then taken from the path).
    Files Spark cannot decode are skipped and counted in the log.
    """
    reader = spark.read.format("image").option("dropInvalid", True)
    images = reader.option("recursiveFileLookup", True).load(folder)
    origin = F.col("image.origin")
    label_dir = F.regexp_extract(origin, r"([^/]+)/[^/]+$", 1)
    label_name = F.regexp_replace(label_dir, r"^label=", "")
    split_col = F.regexp_extract(origin, r"/split=([^/]+)/", 1)
    df = images.select(
        F.substring(F.sha1(origin), 1, 16).alias("id"),
        F.when(split_col != "", split_col).otherwise(F.lit(split)).alias("split"),
        label_name.alias("label_name"),
        "image",
    )
    names = class_names or _discover_labels(df)
    if not names:
        raise ValueError(f"no decodable images found under {folder!r}")
    mapping = F.create_map(*[x for i, name in enumerate(names) for x in (F.lit(name), F.lit(i))])
    df = df.withColumn("label", mapping[F.col("label_name")].cast("int"))
    unknown = df.where(F.col("label").isNull()).select("label_name").distinct().limit(5).collect()
    if unknown:
        raise ValueError(
            f"images under {folder!r} have labels not in class_names {names}. "
            f"Received: {[r.label_name for r in unknown]}"
        )
    return df.select("id", "split", "label", "image")


def _discover_labels(df: DataFrame) -> list[str]:
    names = [r.label_name for r in df.select("label_name").distinct().collect()]
    if names and all(n.isdigit() for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(names)
