"""Image Parquet: the rows every stage of this project reads and writes, and how to read them.

A row is ``id`` (string, stable across runs), ``split``, ``label`` (int) and ``image`` (Spark's
image struct, :data:`pipelines.imaging.image_struct.IMAGE_STRUCT`); stages may add columns
(augment adds where each image came from). Parquet is partitioned by ``split``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from pipelines.imaging.image_struct import IMAGE_STRUCT
from pipelines.io.storage import Storage

IMAGE_ROW_SCHEMA = StructType(
    [
        StructField("id", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), False),
        StructField("image", IMAGE_STRUCT, False),
    ]
)
#: The usual splits, in the order counts are reported; other split names follow, sorted.
SPLITS = ("train", "validation", "test")


def read_images(spark: SparkSession, path: str) -> DataFrame:
    """Read image Parquet written by this project; fails clearly when ``path`` is not one.

    Raises:
        FileNotFoundError: nothing readable as Parquet at ``path``.
        ValueError: the Parquet has no ``image`` column; names the columns received.
    """
    try:
        df = spark.read.parquet(path)
    except Exception as exc:  # AnalysisException: path missing or not Parquet
        raise FileNotFoundError(f"cannot read image Parquet at {path!r}: {exc}") from None
    if "image" not in df.columns:
        raise ValueError(
            f"{path!r} is not image Parquet: it has no 'image' column. Received columns: "
            f"{df.columns}"
        )
    return df


def write_image_parquet(
    spark: SparkSession, df: DataFrame, output: str, partitions: int,
    extra_files: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Write an image DataFrame as Parquet partitioned by split, replacing the output atomically.

    Rows are range-partitioned by (split, id) so reruns produce the same files with the same
    rows in the same order. ``extra_files`` (name -> text; names starting with ``_``, which
    Parquet readers skip) are published in the output folder with the data. Returns the row
    count per split, read back from what was written.
    """
    storage = Storage(spark)
    ordered = df.repartitionByRange(partitions, "split", "id").sortWithinPartitions(
        "split", "id"
    )
    with storage.staged_dir(output) as tmp:
        ordered.write.mode("error").partitionBy("split").parquet(tmp)
        written = spark.read.parquet(tmp).groupBy("split").count().collect()
        for name, text in (extra_files or {}).items():
            storage.write_text(f"{tmp}/{name}", text)
    return {r["split"]: r["count"] for r in sorted(written, key=lambda r: split_order(r["split"]))}


def split_order(split: str) -> tuple[int, str]:
    """Sort key of split names: the usual splits in their order, then the others, sorted."""
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)
