"""Visualize: contact sheets of labelled images from any image Parquet this project writes.

One sheet per split (``<output>/<split>.png``, a seeded sample of ``count`` images with their
labels) and one per-class sheet (``<output>/per_class.png``: a row per label, ``per_class``
images each). Sampling orders rows by a hash of (id, seed), so it is the same on every run,
whatever the partitioning.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.config import Config, VisualizeConfig
from pipelines.imaging.contact_sheet import render_sheet
from pipelines.imaging.image_struct import struct_to_array, to_rgb
from pipelines.io.image_parquet import read_images
from pipelines.io.storage import Storage

logger = logging.getLogger(__name__)


def run_visualize(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The visualize job: write the configured contact sheets; returns their paths."""
    cfg = config.visualize
    df = read_images(spark, cfg.input)
    if "label" not in df.columns:
        raise ValueError(
            f"{cfg.input!r} has no 'label' column to caption images with. "
            f"Received columns: {df.columns}"
        )
    if cfg.class_names is None and "label_name" in df.columns:
        # Folder ingest records each label's class name: caption with it.
        pairs = df.select("label", "label_name").distinct().collect()
        named = {int(r["label"]): r["label_name"] for r in pairs}
        names = [named.get(i, str(i)) for i in range(1 + max(named, default=-1))]
        cfg = cfg.model_copy(update={"class_names": names})
    storage = Storage(spark)
    sheets: dict[str, str] = {}
    has_split = "split" in df.columns
    splits = cfg.splits if has_split else ["all"]
    for split in splits:
        part = df.where(F.col("split") == split) if has_split else df
        total = part.count()
        if total == 0:
            logger.warning("visualize: split %r has no rows in %s; no sheet", split, cfg.input)
            continue
        rows = sample_rows(part, cfg.count, cfg.seed)
        png = render_split_sheet(rows, cfg, f"{split}: {len(rows)} of {total:,} images")
        path = f"{cfg.output.rstrip('/')}/{split}.png"
        storage.write_bytes(path, png)
        sheets[split] = path
    rows = sample_per_class(df, cfg.per_class, cfg.seed)
    if rows:
        path = f"{cfg.output.rstrip('/')}/per_class.png"
        storage.write_bytes(path, render_class_sheet(rows, cfg))
        sheets["per_class"] = path
    logger.info("visualize wrote %d sheets to %s", len(sheets), cfg.output)
    return {"input": cfg.input, "output": cfg.output, "sheets": sheets,
            "artifacts": {"contact_sheets": list(sheets.values())}}


def _seeded_order(seed: int):
    return F.xxhash64(F.col("id").cast("string"), F.lit(seed))


def sample_rows(df: DataFrame, count: int, seed: int) -> list[Any]:
    """``count`` rows chosen by hash of (id, seed), in that order; only they reach the driver."""
    key = _seeded_order(seed) if "id" in df.columns else F.rand(seed)
    return df.select("label", "image").orderBy(key).limit(count).collect()


def sample_per_class(df: DataFrame, per_class: int, seed: int) -> list[Any]:
    """Up to ``per_class`` rows of each label, chosen by hash of (id, seed)."""
    key = _seeded_order(seed) if "id" in df.columns else F.rand(seed)
    window = Window.partitionBy("label").orderBy(key)
    ranked = df.select("label", "image", F.row_number().over(window).alias("rank"))
    return ranked.where(F.col("rank") <= per_class).orderBy("label", "rank").collect()


def _caption(label: int, cfg: VisualizeConfig, num_classes: int) -> str:
    name = cfg.class_names[label] if cfg.class_names and label < len(cfg.class_names) else label
    text = f"{name}"
    if cfg.one_hot:
        text += "\n" + "".join("1" if i == label else "0" for i in range(num_classes))
    return text


def _num_classes(cfg: VisualizeConfig, labels: list[int]) -> int:
    return len(cfg.class_names) if cfg.class_names else max(max(labels, default=0) + 1, 10)


def render_split_sheet(rows: list[Any], cfg: VisualizeConfig, title: str) -> bytes:
    labels = [int(r["label"]) for r in rows]
    classes = _num_classes(cfg, labels)
    images = [to_rgb(struct_to_array(r["image"])) for r in rows]
    captions = [_caption(label, cfg, classes) for label in labels]
    return render_sheet(images, captions, columns=cfg.columns, title=title)


def render_class_sheet(rows: list[Any], cfg: VisualizeConfig) -> bytes:
    labels = sorted({int(r["label"]) for r in rows})
    grid: list[Any] = []
    for label in labels:
        mine = [to_rgb(struct_to_array(r["image"])) for r in rows if int(r["label"]) == label]
        grid.extend(mine + [None] * (cfg.per_class - len(mine)))
    names = [
        str(cfg.class_names[i]) if cfg.class_names and i < len(cfg.class_names) else str(i)
        for i in labels
    ]
    title = f"{cfg.per_class} images per class (all splits)"
    return render_sheet(grid, None, columns=cfg.per_class, title=title, row_labels=names)
