"""Ingest: MNIST IDX files, or a folder of labelled image files, into image Parquet.

Output rows: ``id`` (string, stable across runs), ``split`` (``train``/``validation``/``test``),
``label`` (int) and ``image`` (Spark's image struct); Parquet partitioned by ``split``. Folder
ingest (:mod:`pipelines.stages.folder_ingest`) adds ``label_name`` (the class folder's name) and
publishes two files with the data: ``_classes.json`` (the class names in label order) and
``_ingest_report.json`` (counts per class and split, and every file not ingested with the reason).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from pipelines.config import Config, IngestConfig
from pipelines.imaging.image_struct import IMAGE_STRUCT, OCV_MODE_BY_CHANNELS
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA, split_order, write_image_parquet
from pipelines.io.storage import Storage
from pipelines.stages.folder_ingest import read_image_folder
from pipelines.stages.mnist import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    MnistArrays,
    fetch_mnist,
    load_mnist,
)

logger = logging.getLogger(__name__)

#: Folder ingest: every file not ingested, with the reason, and the counts (in the output).
REPORT_FILE = "_ingest_report.json"
#: Folder ingest: the class names in label order, a JSON list (in the output).
CLASSES_FILE = "_classes.json"


def run_ingest(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The ingest job: build the image DataFrame from the configured source and write it."""
    cfg = config.ingest
    storage = Storage(spark)
    if cfg.mode == "error":
        storage.refuse_existing(cfg.output, "ingest")
    started = time.perf_counter()
    if cfg.source == "folder":
        return _ingest_folder(spark, cfg, started)
    files = fetch_mnist(config.mnist)
    df = mnist_frame(spark, load_mnist(files), cfg.validation_size)
    source = f"mnist ({files.source})"
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


def _ingest_folder(spark: SparkSession, cfg: IngestConfig, started: float) -> dict[str, Any]:
    """Folder ingest: every file is ingested or listed in the report with its reason."""
    if not cfg.folder:
        raise ValueError("ingest.source is 'folder' but ingest.folder is not set. "
                         "Received: ingest.folder=None")
    found = read_image_folder(
        spark, cfg.folder, class_names=cfg.class_names, splits=cfg.splits,
        default_split=cfg.folder_split, seed=cfg.seed, resize=cfg.resize,
        resize_method=cfg.resize_method, partitions=cfg.partitions,
    )
    try:
        per_class = found.frame.groupBy("label", "split").count().collect()
        ingested = sum(r["count"] for r in per_class)
        bad = found.bad
        total = ingested + len(bad)
        fraction = len(bad) / total if total else 0.0
        if bad:
            shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
            logger.warning("ingest: %d of %d files not ingested (bad): %s%s", len(bad), total,
                           shown, " ..." if len(bad) > 5 else "")
        if found.ignored:
            logger.info("ingest: %d hidden or bookkeeping files ignored", len(found.ignored))
        if not ingested:
            shown = ", ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
            raise ValueError(
                f"no decodable images under ingest.folder: all {total} files are bad; nothing "
                f"was published. Received: ingest.folder={cfg.folder!r}; first bad files: {shown}"
            )
        if fraction > cfg.max_bad_fraction:
            shown = ", ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
            raise ValueError(
                f"{len(bad)} of {total} files are bad ({fraction:.2%}), more than "
                f"ingest.max_bad_fraction={cfg.max_bad_fraction}; nothing was published. "
                f"Received: ingest.folder={cfg.folder!r}; first bad files: {shown}"
            )
        rows_per_class: dict[str, dict[str, int]] = {name: {} for name in found.class_names}
        for r in sorted(per_class, key=lambda r: (r["label"], split_order(r["split"]))):
            rows_per_class[found.class_names[r["label"]]][r["split"]] = r["count"]
        report = {
            "folder": cfg.folder,
            "layout": "split folders" if found.layout == "splits" else "class folders",
            "splits": None if found.layout == "splits" else cfg.splits,
            "seed": cfg.seed,
            "resize": list(cfg.resize) if cfg.resize else None,
            "class_names": found.class_names,
            "files_ingested": ingested,
            "bad_files": len(bad),
            "bad_fraction": round(fraction, 6),
            "max_bad_fraction": cfg.max_bad_fraction,
            "ignored_files": len(found.ignored),
            "rows_per_class": rows_per_class,
            "bad": bad,
            "ignored": found.ignored,
        }
        extra = {
            REPORT_FILE: json.dumps(report, indent=2) + "\n",
            CLASSES_FILE: json.dumps(found.class_names) + "\n",
        }
        counts = write_image_parquet(spark, found.frame, cfg.output, cfg.partitions, extra)
    finally:
        found.release()
    output = cfg.output.rstrip("/")
    summary = {
        "source": f"folder {cfg.folder}",
        "output": cfg.output,
        "rows": sum(counts.values()),
        "rows_per_split": counts,
        "class_names": found.class_names,
        "bad_files": len(bad),
        "ignored_files": len(found.ignored),
        "report": f"{output}/{REPORT_FILE}",
        "classes": f"{output}/{CLASSES_FILE}",
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info("ingest wrote %s rows %s of %s classes to %s; %s bad and %s ignored files "
                "listed in %s", summary["rows"], counts, len(found.class_names), cfg.output,
                len(bad), len(found.ignored), summary["report"])
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
    spark: SparkSession, folder: str, split: str = "train", class_names: list[str] | None = None
) -> DataFrame:
    """A labelled folder of image files -> image DataFrame (``id, split, label, image``).

    ``<folder>/<label>/<file>`` images get ``split``; split folders (``train/``, ...,
    ``split=<s>/``, as in this project's export layout) keep theirs. Files that are not
    ingested are left out; :func:`~pipelines.stages.folder_ingest.read_image_folder` lists them.
    """
    found = read_image_folder(spark, folder, class_names=class_names, default_split=split)
    return found.frame.select("id", "split", "label", "image")
