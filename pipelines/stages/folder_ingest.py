"""Folder ingest: a labelled folder of image files -> image rows, with every file accounted for.

The folder is listed once on the driver (fsspec: any filesystem), each path placed by
:mod:`pipelines.io.image_folder` (split folders, class folders). The executors read and decode
the files (PNG, JPEG, BMP, GIF's first frame, TIFF, ... in any mode, 16-bit included) into 8-bit
Spark image structs, optionally resized. Nothing is dropped silently: empty files, files that do
not decode and files outside the layout are *bad*, hidden and bookkeeping files *ignored*; both
are returned with the reason for each file (the ingest stage writes them to its report).

Without split folders, ``splits`` fractions are drawn per class (stratified): the class's valid
images are ordered by a hash of (seed, relative path) and cut into consecutive runs whose sizes
are the fractions of the class's count rounded by largest remainder, so every split of every
class is within one image of its fraction, and the same files land in the same splits on every
run whatever the partitioning.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct, decode_image, from_rgb
from pipelines.imaging.resize import resize as resize_array
from pipelines.io.image_folder import class_names as folder_class_names
from pipelines.io.image_folder import classify
from pipelines.io.task_files import LocalFiles, find_files, local_files, open_fs

logger = logging.getLogger(__name__)

#: Rows of folder ingest: the image row schema plus the class name of each label.
FOLDER_ROW_SCHEMA = StructType(
    [
        StructField("id", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), False),
        StructField("label_name", StringType(), False),
        StructField("image", IMAGE_STRUCT, False),
    ]
)
_FILES_SCHEMA = StructType(
    [
        StructField("origin", StringType(), False),
        StructField("path", StringType(), False),
        StructField("relative", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), False),
        StructField("label_name", StringType(), False),
    ]
)
_DECODED_SCHEMA = StructType(
    [
        StructField("id", StringType(), False),
        StructField("origin", StringType(), False),
        StructField("relative", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), False),
        StructField("label_name", StringType(), False),
        StructField("image", IMAGE_STRUCT, True),
        StructField("error", StringType(), True),
    ]
)


@dataclass
class FolderImages:
    """What :func:`read_image_folder` found. Call :meth:`release` once ``frame`` is written."""

    #: :data:`FOLDER_ROW_SCHEMA` rows of every ingested image (decoded once, persisted).
    frame: DataFrame
    #: Label names in label order.
    class_names: list[str]
    #: ``splits`` (split folders taken as they are) or ``classes``.
    layout: str
    #: Files that should have been images and were not ingested: ``{"path", "reason"}``.
    bad: list[dict[str, str]] = field(default_factory=list)
    #: Hidden and bookkeeping files: ``{"path", "reason"}``.
    ignored: list[dict[str, str]] = field(default_factory=list)
    _persisted: DataFrame | None = None

    def release(self) -> None:
        if self._persisted is not None:
            self._persisted.unpersist()


def read_image_folder(
    spark: SparkSession, folder: str, *, class_names: Sequence[str] | None = None,
    splits: Mapping[str, float] | None = None, default_split: str = "train", seed: int = 0,
    resize: tuple[int, int] | None = None, resize_method: str = "bilinear",
    partitions: int = 8,
) -> FolderImages:
    """Decode every image of a labelled folder (see the module docstring).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: the folder has no class folders or no image candidates, or a class folder
            is not in ``class_names``.
    """
    fs, root = open_fs(folder)
    if not fs.isdir(root):
        raise FileNotFoundError(f"the image folder is not a folder. Received: {folder!r}")
    root = root.rstrip("/")
    uri = (lambda p: f"file://{p}") if isinstance(local_files(fs), LocalFiles) else (
        fs.unstrip_protocol)
    listed = {path[len(root) + 1:]: (path, size) for path, size in find_files(fs, root).items()}
    layout, entries = classify(sorted(listed))
    if layout == "flat":
        raise ValueError(
            f"ingest needs labelled images: <folder>/<class>/<file> or split folders above the "
            f"class folders. Received: {len(entries)} files directly under {folder!r} and no "
            f"folders"
        )
    names = list(class_names) if class_names else folder_class_names(entries)
    index = {name: i for i, name in enumerate(names)}
    bad: list[dict[str, str]] = []
    ignored: list[dict[str, str]] = []
    rows: list[tuple[Any, ...]] = []
    unknown: set[str] = set()
    for entry in entries:
        path, size = listed[entry.relative]
        if entry.kind is not None:
            (ignored if entry.kind == "ignored" else bad).append(
                {"path": uri(path), "reason": entry.reason or ""})
        elif entry.label_name not in index:
            unknown.add(str(entry.label_name))
        elif not size:
            bad.append({"path": uri(path), "reason": "empty file (0 bytes)"})
        else:
            rows.append((uri(path), path, entry.relative, entry.split or default_split,
                         index[entry.label_name], entry.label_name))
    if unknown:
        raise ValueError(
            f"images under {folder!r} have labels not in class_names {names}. "
            f"Received: {sorted(unknown)[:5]}"
        )
    if not rows:
        raise ValueError(f"no image files found under {folder!r} (bad files: {len(bad)})")
    if layout == "splits" and splits:
        logger.info("ingest: %s has split folders; they are kept as they are (ingest.splits "
                    "applies to folders without them)", folder)

    files = _arrow_frame(spark, rows).repartition(partitions, "relative")
    decoded = files.mapInArrow(_decode_fn(folder, resize, resize_method), _DECODED_SCHEMA)
    decoded = decoded.persist(StorageLevel.MEMORY_AND_DISK)
    failed = decoded.where(F.col("error").isNotNull()).select("origin", "error").collect()
    bad += [{"path": r["origin"], "reason": r["error"]} for r in failed]
    good = decoded.where(F.col("error").isNull())
    if layout == "classes" and splits:
        good = assign_splits(good, dict(splits), seed)
    frame = good.select(*FOLDER_ROW_SCHEMA.fieldNames())
    return FolderImages(frame, names, layout, sorted(bad, key=lambda b: b["path"]),
                        sorted(ignored, key=lambda b: b["path"]), decoded)


def _arrow_frame(spark: SparkSession, rows: list[tuple[Any, ...]]) -> DataFrame:
    # Through Arrow: a list of many tuples takes seconds to verify and pickle row by row.
    schema = to_arrow_schema(_FILES_SCHEMA)
    columns = list(zip(*rows, strict=True))
    table = pa.Table.from_arrays(
        [pa.array(list(c), type=f.type) for c, f in zip(columns, schema, strict=True)],
        schema=schema)
    return spark.createDataFrame(table)


def _decode_fn(folder: str, size: tuple[int, int] | None, method: str):
    """The per-partition decoder; captures plain values only."""
    arrow_schema = to_arrow_schema(_DECODED_SCHEMA)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files = local_files(open_fs(folder)[0])
        for batch in batches:
            out = []
            for row in batch.to_pylist():
                origin = row["origin"]
                image, error = None, None
                try:
                    array = decode_image(files.read(row["path"]), origin)
                    if size is not None:
                        array = resize_array(array, size[0], size[1], method)
                    image = array_to_struct(from_rgb(array), origin)
                except (ValueError, OSError) as exc:
                    error = str(exc)
                out.append({
                    "id": hashlib.sha1(origin.encode()).hexdigest()[:16],
                    "origin": origin, "relative": row["relative"], "split": row["split"],
                    "label": row["label"], "label_name": row["label_name"],
                    "image": image, "error": error,
                })
            yield pa.RecordBatch.from_pylist(out, schema=arrow_schema)

    return run


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """``n`` images cut by ``fractions`` (summing to 1): floors, then the images left over go
    to the largest remainders (ties in the order given), so each count is within 1 of n*f."""
    exact = {name: n * f for name, f in fractions.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    left = n - sum(counts.values())
    order = sorted(exact, key=lambda s: -(exact[s] - counts[s]))  # stable: ties keep order
    for name in order[:left]:
        counts[name] += 1
    return counts


def assign_splits(images: DataFrame, fractions: dict[str, float], seed: int) -> DataFrame:
    """Replace ``split`` by a seeded, stratified draw (see the module docstring)."""
    per_label = {r["label"]: r["count"] for r in images.groupBy("label").count().collect()}
    names = list(fractions)
    ends: dict[int, list[int]] = {}
    for label, n in per_label.items():
        counts = split_counts(n, fractions)
        running, cumulative = 0, []
        for name in names:
            running += counts[name]
            cumulative.append(running)
        ends[label] = cumulative
    table = F.create_map(*[x for label, e in ends.items()
                           for x in (F.lit(label), F.array(*[F.lit(v) for v in e]))])
    order = Window.partitionBy("label").orderBy(
        F.xxhash64(F.lit(seed), F.col("relative")), F.col("relative"))
    ranked = images.withColumn("_rank", F.row_number().over(order) - 1)
    bounds = table[F.col("label")]
    split = F.lit(names[-1])
    for i in reversed(range(len(names) - 1)):
        split = F.when(F.col("_rank") < bounds[i], F.lit(names[i])).otherwise(split)
    return ranked.withColumn("split", split).drop("_rank")
