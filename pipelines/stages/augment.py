"""Augment: a folder of images (or image Parquet) -> augmented PNG files and image Parquet.

The input folder may be this project's export layout (``split=<s>/label=<l>/<id>.png``), class
folders with or without split folders above them (``<class>/<file>``, ``train/<class>/<file>``),
or a flat folder of images without labels, as Augmentor's ``Pipeline(folder)`` takes; any image
format Pillow reads (see :mod:`pipelines.io.image_folder`).

Output under ``augment.output`` (staged, then published atomically; a rerun replaces it whole):

- ``png/<the input's folders>/<name>-<k>.png`` (``png/split=<s>/label=<l>/<source_id>-<k>.png``
  for the export layout or Parquet input): written by the executors, each file through a
  temporary sibling renamed into place (``<name>-original.png`` with ``keep_originals``);
- ``parquet/split=<s>/``: image Parquet (``id``, ``split``, ``label``, ``image``; class folders
  named otherwise than by their numbers also ``label_name``; images outside split folders get
  split ``train``, a flat folder's a null label) plus provenance: ``source_id``, ``sample``
  (null for originals) and ``operations`` (JSON list of the operations applied, each with its
  parameters, seed and drawn values);
- ``sheet.png``: originals beside their augmented variants;
- ``report.json``: counts, and every input file skipped as bad (corrupt, empty, not an image,
  outside the folder layout) with the reason.

Every random choice comes from (``seed``, source id, sample index) (see
:mod:`pipelines.imaging.augment_ops`), so outputs are identical whatever the partitioning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from pipelines.config import AugmentConfig, Config
from pipelines.faults import maybe_fail
from pipelines.imaging.augment_ops import Augmenter, operations_json
from pipelines.imaging.contact_sheet import render_sheet
from pipelines.imaging.image_struct import (
    IMAGE_STRUCT,
    array_to_struct,
    decode_pil,
    encode_png,
    from_rgb,
    struct_to_array,
    to_rgb,
)
from pipelines.io.image_folder import class_names as folder_class_names
from pipelines.io.image_folder import classify
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA, read_images
from pipelines.io.storage import Storage
from pipelines.io.task_files import (
    LocalFiles,
    find_files,
    local_files,
    open_fs,
    remove_temp_files,
)

logger = logging.getLogger(__name__)

AUGMENTED_SCHEMA = StructType(
    [
        # The image row, with a label that is null for a flat folder (no labels).
        *(StructField(f.name, f.dataType, True) if f.name == "label" else f
          for f in IMAGE_ROW_SCHEMA.fields),
        StructField("source_id", StringType(), False),
        StructField("sample", IntegerType(), True),
        StructField("operations", StringType(), False),
    ]
)
#: The schema when the labels have names other than their numbers (plain class folders, or
#: image Parquet from folder ingest): ``label_name`` is kept beside ``label``.
NAMED_SCHEMA = StructType([*AUGMENTED_SCHEMA.fields,
                           StructField("label_name", StringType(), True)])
#: The split of images that are not in a split folder (plain class folders, a flat folder).
DEFAULT_SPLIT = "train"
_STATS_DIR = "_stats"
_REPORT_BAD_LIMIT = 1000


def run_augment(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The augment job: augment every source image ``samples_per_image`` times and publish."""
    cfg = config.augment
    storage = Storage(spark)
    started = time.perf_counter()
    sources, bad_paths, named = source_frame(spark, cfg)
    with storage.staged_dir(cfg.output) as tmp:
        root = storage.qualify(tmp)
        stats = augment_frame(sources, cfg, root, final=storage.qualify(cfg.output),
                              named=named)
        bad = bad_paths + stats["bad"]
        total = stats["sources"] + len(bad)
        fraction = len(bad) / total if total else 0.0
        if total == 0:
            raise ValueError(f"no input files found. Received: augment.input={cfg.input!r}")
        if fraction > cfg.max_bad_fraction:
            shown = ", ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
            raise ValueError(
                f"{len(bad)} of {total} input files are bad ({fraction:.2%}), more than "
                f"augment.max_bad_fraction={cfg.max_bad_fraction}; nothing was published. "
                f"Received: augment.input={cfg.input!r}; first bad files: {shown}"
            )
        if "png" in cfg.formats:
            fs, png_root = open_fs(f"{root}/png")
            removed = remove_temp_files(fs, png_root)
            if removed:
                logger.info("removed %s temporary files of killed task attempts", removed)
        sheet_path = f"{tmp}/sheet.png"
        shown_rows = write_contact_sheet(storage, sources, cfg, sheet_path)
        summary = {
            "input": cfg.input,
            "input_format": cfg.input_format,
            "output": cfg.output,
            "sources": stats["sources"],
            "samples_written": stats["samples"],
            "originals_written": stats["originals"],
            "bad_files": len(bad),
            "bad_fraction": round(fraction, 6),
            "max_bad_fraction": cfg.max_bad_fraction,
            "formats": list(cfg.formats),
            "seed": cfg.seed,
            "samples_per_image": cfg.samples_per_image,
            "operations": [op.model_dump() for op in cfg.operations],
            "sheet_rows": shown_rows,
            "seconds": round(time.perf_counter() - started, 2),
            "artifacts": ({"samples": f"{cfg.output.rstrip('/')}/sheet.png"}
                          if shown_rows else {}),
        }
        report = {**summary, "bad": sorted(bad, key=lambda b: b["path"])[:_REPORT_BAD_LIMIT]}
        if len(bad) > _REPORT_BAD_LIMIT:
            report["bad_truncated"] = True
        storage.write_text(f"{tmp}/report.json", json.dumps(report, indent=2) + "\n")
    logger.info("augment wrote %s samples of %s sources (%s bad files) to %s",
                summary["samples_written"], summary["sources"], len(bad), cfg.output)
    return summary


SOURCE_SCHEMA = StructType(
    [
        StructField("source_id", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), True),
        StructField("origin", StringType(), True),
        StructField("path", StringType(), True),  # folder input: the file, read by the executor
        StructField("image", IMAGE_STRUCT, True),  # Parquet input: the image
        StructField("label_name", StringType(), True),
        StructField("out_dir", StringType(), False),  # where its PNG files go, below png/
    ]
)


def source_frame(
    spark: SparkSession, cfg: AugmentConfig
) -> tuple[DataFrame, list[dict], bool]:
    """The source images as :data:`SOURCE_SCHEMA` rows, filtered and limited as configured.

    A folder input is listed on the driver (one listing, through fsspec) and each file is read
    by the executor that augments it: Spark's ``binaryFile`` source plans a task per ~32 small
    files (2,188 tasks for MNIST) and silently drops zero-byte files, which must be counted as
    bad. The folder may be this project's export layout, split or plain class folders, or a
    flat folder of images (see :mod:`pipelines.io.image_folder`); any format Pillow reads.
    Outputs mirror the input's folders; class folders keep their names (``label_name``).

    Returns the frame, the input files rejected while listing (empty, outside the layout), and
    whether the labels have names of their own (then the output has ``label_name``).
    """
    if cfg.input_format == "parquet":
        images = read_images(spark, cfg.input)
        named = "label_name" in images.columns
        df = images.select(
            F.col("id").alias("source_id"), "split", F.col("label").cast("int").alias("label"),
            F.col("image.origin").alias("origin"), F.lit(None).cast("string").alias("path"),
            "image",
            (F.col("label_name") if named else F.lit(None).cast("string")).alias("label_name"),
            F.concat(F.lit("split="), "split", F.lit("/label="), "label").alias("out_dir"),
        )
        if cfg.splits:
            df = df.where(F.col("split").isin(list(cfg.splits)))
        if cfg.limit:
            chosen = [r.source_id for r in
                      df.select("source_id").orderBy("source_id").limit(cfg.limit).collect()]
            df = df.where(F.col("source_id").isin(chosen))
        return df, [], named
    fs, root = open_fs(cfg.input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"augment.input is not a folder. Received: {cfg.input!r}")
    root = root.rstrip("/")
    uri = (lambda p: f"file://{p}") if isinstance(local_files(fs), LocalFiles) else (
        fs.unstrip_protocol)
    listed = {path[len(root) + 1:]: (path, size) for path, size in find_files(fs, root).items()}
    layout, entries = classify(sorted(listed))
    names = folder_class_names(entries)
    index = {name: i for i, name in enumerate(names)}
    named = bool(names) and names != [str(i) for i in range(len(names))]
    rows, bad = [], []
    for entry in entries:
        path, size = listed[entry.relative]
        if entry.kind == "ignored":
            continue  # hidden or bookkeeping files (_SUCCESS, .crc), as Spark skips them
        if entry.kind == "bad":
            bad.append({"path": uri(path), "reason": entry.reason})
        elif not size:
            bad.append({"path": uri(path), "reason": "empty file (0 bytes)"})
        elif not cfg.splits or (entry.split or DEFAULT_SPLIT) in cfg.splits:
            folder, _, name = entry.relative.rpartition("/")
            label = None if entry.label_name is None else index[entry.label_name]
            rows.append((_source_id(entry.relative, layout), entry.split or DEFAULT_SPLIT,
                         label, uri(path), path, None, entry.label_name, folder))
    if cfg.limit:
        rows = sorted(rows)[: cfg.limit]
    # Through Arrow: a list of 70,000 tuples takes seconds to verify and pickle row by row.
    arrow_schema = to_arrow_schema(SOURCE_SCHEMA)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(arrow_schema)
    table = pa.Table.from_arrays(
        [pa.array(list(c), type=f.type) for c, f in zip(columns, arrow_schema, strict=True)],
        schema=arrow_schema)
    return spark.createDataFrame(table), bad, named


def _source_id(relative: str, layout: str) -> str:
    """A source image's id: its path without extension, below its split folder and, for this
    project's ``label=<l>`` folders (whose file names are the ingest ids), its class folder."""
    parts = relative.rpartition(".")[0].split("/") if "." in relative.rpartition("/")[2] else (
        relative.split("/"))
    if layout == "splits":
        parts = parts[1:]
    if len(parts) > 1 and parts[0].startswith("label="):
        parts = parts[1:]
    return "/".join(parts)


def augment_frame(sources: DataFrame, cfg: AugmentConfig, root: str, final: str,
                  named: bool = False) -> dict[str, Any]:
    """Run the augmentation (PNG files and/or Parquet under ``root``); returns the task stats.

    ``final`` is where ``root`` will be published: image origins name the published PNG files.
    ``named``: write ``label_name`` (:data:`NAMED_SCHEMA`).
    """
    ordered = sources.repartition(cfg.partitions, "source_id").sortWithinPartitions("source_id")
    schema = NAMED_SCHEMA if named else AUGMENTED_SCHEMA
    run = _partition_fn(
        operations=[op.model_dump() for op in cfg.operations], seed=cfg.seed,
        samples=cfg.samples_per_image, keep_originals=cfg.keep_originals,
        png_root=f"{root}/png" if "png" in cfg.formats else None, origin_root=f"{final}/png",
        rows="parquet" in cfg.formats, compress_level=cfg.png_compress_level,
        input_uri=cfg.input, stats_root=f"{root}/{_STATS_DIR}", schema=schema,
    )
    out = ordered.mapInArrow(run, schema)
    if "parquet" in cfg.formats:
        out.write.mode("error").partitionBy("split").parquet(f"{root}/parquet")
    else:
        out.write.format("noop").mode("overwrite").save()
    return _collect_stats(root)


def _partition_fn(*, operations, seed, samples, keep_originals, png_root, origin_root, rows,
                  compress_level, input_uri, stats_root, schema=AUGMENTED_SCHEMA):
    """The function run on each partition; captures plain values only."""
    arrow_schema = to_arrow_schema(schema)
    named = "label_name" in schema.fieldNames()

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        augmenter = Augmenter(operations, seed)
        in_fs = local_files(open_fs(input_uri)[0])
        fs, png_path = open_fs(png_root) if png_root else (None, None)
        files = local_files(fs) if fs is not None else None
        made_dirs: set[str] = set()
        stats = {"sources": 0, "samples": 0, "originals": 0, "bad": []}
        for batch in batches:
            out: list[dict[str, Any]] = []
            for row in batch.to_pylist():
                try:
                    image = _to_pil(row, in_fs)
                except (ValueError, OSError) as exc:
                    stats["bad"].append({"path": row["origin"], "reason": str(exc)})
                    continue
                stats["sources"] += 1
                part_dir = row["out_dir"]
                folder = f"{png_path}/{part_dir}".rstrip("/")
                base = row["source_id"].rpartition("/")[2]
                if files is not None and folder not in made_dirs:
                    files.makedirs(folder)
                    made_dirs.add(folder)
                outputs = [(None, image, [])] if keep_originals else []
                outputs += ((k, *augmenter.augment(image, row["source_id"], k))
                            for k in range(samples))
                for k, result, applied in outputs:
                    maybe_fail("augment.write")
                    suffix = f"-{'original' if k is None else k}"
                    name = f"{row['source_id']}{suffix}"
                    origin = ""
                    pixels = _as_array(result)
                    if files is not None:
                        files.write_atomic(f"{folder}/{base}{suffix}.png",
                                           encode_png(pixels, compress_level))
                        origin = "/".join(
                            p for p in (origin_root, part_dir, f"{base}{suffix}.png") if p)
                    stats["originals" if k is None else "samples"] += 1
                    if rows:
                        record = {
                            "id": name, "split": row["split"], "label": row["label"],
                            "image": array_to_struct(from_rgb(pixels), origin),
                            "source_id": row["source_id"], "sample": k,
                            "operations": operations_json(applied),
                        }
                        if named:
                            record["label_name"] = row["label_name"]
                        out.append(record)
            if out:
                yield pa.RecordBatch.from_pylist(out, schema=arrow_schema)
        part = TaskContext.get().partitionId()
        stats_fs, stats_path = open_fs(stats_root)
        stats_fs.makedirs(stats_path, exist_ok=True)
        local_files(stats_fs).write_atomic(f"{stats_path}/part-{part:05d}.json",
                                           json.dumps(stats).encode())

    return run


def _collect_stats(root: str) -> dict[str, Any]:
    fs, path = open_fs(f"{root}/{_STATS_DIR}")
    total: dict[str, Any] = {"sources": 0, "samples": 0, "originals": 0, "bad": []}
    for name in sorted(fs.ls(path, detail=False)) if fs.exists(path) else []:
        if not name.endswith(".json"):
            continue
        with fs.open(name, "rb") as f:
            part = json.load(f)
        for key in ("sources", "samples", "originals"):
            total[key] += part[key]
        total["bad"] += part["bad"]
    if fs.exists(path):
        fs.rm(path, recursive=True)
    return total


def _to_pil(row: dict[str, Any], files: Any):
    """A source row -> PIL image in mode L, RGB or RGBA (ValueError when undecodable).

    ``files``: :func:`pipelines.io.task_files.local_files` of the input's filesystem.
    """
    from PIL import Image

    if row["path"] is not None:
        return decode_pil(files.read(row["path"]), row["origin"])
    if row["image"] is not None:
        array = to_rgb(struct_to_array(row["image"]))
    else:
        raise ValueError(f"row has no image (origin={row['origin']!r})")
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _as_array(image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def write_contact_sheet(storage: Storage, sources: DataFrame, cfg: AugmentConfig,
                        path: str) -> int:
    """Originals beside their first ``sheet_samples`` variants, one row per source image.

    The variants are recomputed on the driver: outputs depend on (seed, source id, sample)
    only, so they are the very images the executors wrote. Returns the number of rows drawn.
    """
    if cfg.sheet_rows == 0:
        return 0
    augmenter = Augmenter([op.model_dump() for op in cfg.operations], cfg.seed)
    candidates = _sheet_sources(sources, cfg)
    in_fs = local_files(open_fs(cfg.input)[0])
    images, captions, labels = [], [], []
    columns = cfg.sheet_samples + 1
    for row in candidates:
        if len(labels) == cfg.sheet_rows:
            break
        try:
            original = _to_pil(row, in_fs)
        except (ValueError, OSError):
            continue
        label = row["label_name"] if row["label_name"] is not None else row["label"]
        labels.append(f"{row['split']}\n{'' if label is None else label}")
        images.append(_as_array(original))
        captions.append(f"{row['source_id']}\noriginal")
        for k in range(cfg.sheet_samples):
            result, applied = augmenter.augment(original, row["source_id"], k)
            images.append(_as_array(result))
            captions.append(f"#{k}\n{_short(applied)}")
    if not labels:
        return 0
    png = render_sheet(images, captions, columns=columns, row_labels=labels,
                       title=f"augment: originals and samples (seed {cfg.seed})")
    storage.write_bytes(path, png)
    return len(labels)


def _sheet_sources(sources: DataFrame, cfg: AugmentConfig) -> list[dict]:
    """The first source rows in id order (twice the sheet rows: some may be bad)."""
    first = sources.orderBy("source_id").limit(cfg.sheet_rows * 2).collect()
    return [r.asDict(recursive=True) for r in first]


def _short(applied: list[dict[str, Any]]) -> str:
    if not applied:
        return "unchanged"
    parts = []
    for op in applied:
        value = next((f"{op[k]}" for k in ("angle", "factor", "dx", "sigma", "radius") if k in op),
                     "")
        parts.append(f"{op['op']} {value}".strip())
    return ", ".join(parts)[:28]
