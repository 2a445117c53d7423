"""Small real stages for the runner tests (rows of the test registries).

``count_labels`` reads the image Parquet at ``visualize.input`` and writes the label counts as
Parquet to ``visualize.output`` through a staged folder, like the real stages do.
"""

from __future__ import annotations

from pipelines.config import Config
from pipelines.faults import maybe_fail
from pipelines.io.image_parquet import read_images
from pipelines.io.storage import Storage


def count_labels(spark, config: Config) -> dict:
    cfg = config.visualize
    counts = read_images(spark, cfg.input).groupBy("label").count().orderBy("label")
    with Storage(spark).staged_dir(cfg.output) as tmp:
        counts.coalesce(1).write.parquet(tmp)
        maybe_fail("count_labels.write")
    rows = spark.read.parquet(cfg.output).count()
    return {"labels": rows, "output": cfg.output}


def broken(spark, config: Config) -> dict:
    raise FileNotFoundError(f"no input at {config.visualize.input + '-nowhere'!r}")
