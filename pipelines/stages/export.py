"""Export: image Parquet -> PNG files written by the executors, partitioned by split and label.

Layout: ``<output>/split=<split>/label=<label>/<id>.png`` and ``<output>/_export.json`` (what was
selected, and the counts). ``spark.read.format("image").load(output)`` reads it back with
``split`` and ``label`` as partition columns (and :func:`pipelines.stages.ingest.image_folder_frame`
re-ingests it); Keras' ``image_dataset_from_directory(f"{output}/split=train")`` reads a split
with class names ``label=0`` ... Pixels are lossless at every ``compress_level``; grayscale stays
one channel, colour structs (BGR(A), like Spark's image source) become RGB(A) PNGs.

Exactly once, whatever retries or speculative tasks do:

- every file is written under a hidden temporary name (``.<id>.png._tmp-<attempt>``) and then
  renamed to ``<id>.png``. A file name depends on the row only, so another attempt of the same
  task renames the same bytes onto the same name; temporary files of killed attempts are removed
  before the run ends, and until then neither Spark (hidden name) nor Keras (not ``.png``)
  reads them;
- ``mode: replace`` builds the whole export in a staged sibling folder that is swapped in only
  when every task succeeded (:meth:`pipelines.io.storage.Storage.staged_dir`): a failed run leaves
  the previous output as it was;
- ``mode: skip`` writes into the output and keeps the files there. ``_export.json`` records the
  selection (input, splits, labels, limit, sample, seed); a rerun with another selection is
  refused, so files of two different exports never mix.

Executors reach the output through fsspec (the driver uses Hadoop's FileSystem through
:class:`~pipelines.io.storage.Storage`, the layer Spark writes with): one library resolves every
URI a Spark user writes, local paths, ``file://``, ``hdfs://`` (through pyarrow's libhdfs),
``s3a://`` (s3fs), ``gs://``, ``abfs://``..., with ``export.storage_options`` for endpoints and
credentials; pyarrow.fs alone knows no ``s3a://`` and no Azure/GCS variants Spark users write.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config, ExportConfig
from pipelines.faults import maybe_fail
from pipelines.imaging.image_struct import CHANNELS_BY_OCV_MODE, encode_png, is_image_struct, to_rgb
from pipelines.io.digest import sha256_json
from pipelines.io.image_parquet import read_images
from pipelines.io.storage import Storage
from pipelines.io.task_files import is_temp_name, local_files, open_fs, temp_name

logger = logging.getLogger(__name__)

MANIFEST = "_export.json"
#: Files an attempt writes before the ``export.write`` failpoint may fire (a kill then leaves
#: committed files and one temporary file behind, the case the commit protocol must survive).
_FAILPOINT_AFTER = 8
_WRITE_SCHEMA = "split string, label int, written long, skipped long, bytes long"
_REQUIRED = ("id", "split", "label", "image")


def run_export(spark: SparkSession, config: Config) -> dict[str, Any]:
    """The export job: select rows of the image Parquet and write them as PNG files."""
    cfg = config.export
    started = time.perf_counter()
    storage = Storage(spark)
    selection = _selection(storage, cfg)
    df = select_images(read_images(spark, cfg.input), cfg, spark.sparkContext.defaultParallelism)
    if cfg.mode == "replace":
        with storage.staged_dir(cfg.output) as staged:
            counts = export_png(df, storage.qualify(staged), cfg.compress_level,
                                skip_existing=False, storage_options=cfg.storage_options)
            _require_rows(counts, cfg)
            storage.write_text(f"{staged}/{MANIFEST}", _manifest(selection, counts, "complete"))
    else:
        created = _check_skip_target(storage, cfg.output, selection)
        storage.write_text(f"{cfg.output}/{MANIFEST}", _manifest(selection, {}, "running"))
        counts = export_png(df, storage.qualify(cfg.output), cfg.compress_level,
                            skip_existing=True, storage_options=cfg.storage_options)
        if counts["files"] == 0 and created:
            storage.delete(cfg.output)
        _require_rows(counts, cfg)
        storage.write_text(f"{cfg.output}/{MANIFEST}", _manifest(selection, counts, "complete"))
    summary = {
        "input": cfg.input,
        "output": cfg.output,
        "mode": cfg.mode,
        "files": counts["files"],
        "files_written": counts["written"],
        "files_skipped": counts["skipped"],
        "bytes_written": counts["bytes"],
        "per_split_label": counts["per_split_label"],
        "compress_level": cfg.compress_level,
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info("export: %s PNG files under %s (%s written, %s kept) in %.1f s",
                summary["files"], cfg.output, summary["files_written"],
                summary["files_skipped"], summary["seconds"])
    return summary


def select_images(df: DataFrame, cfg: ExportConfig, parallelism: int = 2) -> DataFrame:
    """Check the image rows, apply the configured filters and limit, flatten the image struct.

    Returns columns ``id, split, label, height, width, nChannels, mode, data``.
    """
    missing = [name for name in _REQUIRED if name not in df.columns]
    if missing:
        raise ValueError(
            f"export needs image rows with columns {list(_REQUIRED)}; missing {missing}. "
            f"Received columns: {df.columns}"
        )
    image_type = df.schema["image"].dataType
    if not is_image_struct(image_type):
        raise ValueError(
            "column 'image' must be Spark's image struct (origin, height, width, nChannels, "
            f"mode, data). Received: image={image_type.simpleString()}"
        )
    if cfg.splits:
        df = df.where(F.col("split").isin(cfg.splits))
    if cfg.labels:
        df = df.where(F.col("label").isin(cfg.labels))
    if cfg.limit:
        if cfg.sample == "random":  # a hash of (seed, id): the same choice on any partitioning
            df = df.orderBy(F.xxhash64(F.lit(cfg.seed), F.col("id")), "id")
        else:
            df = df.orderBy("split", "id")
        # The limit leaves one partition; spread the writing over the cores again.
        df = df.limit(cfg.limit).repartition(cfg.partitions or parallelism)
    elif cfg.partitions:
        df = df.repartition(cfg.partitions)
    return df.select(
        "id", "split", F.col("label").cast("int").alias("label"),
        *[F.col(f"image.{name}").alias(name)
          for name in ("height", "width", "nChannels", "mode", "data")],
    )


def export_png(
    df: DataFrame,
    root: str,
    compress_level: int = 6,
    skip_existing: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the rows of :func:`select_images` as ``<root>/split=<s>/label=<l>/<id>.png``.

    Runs on the executors; only per-folder counts come back to the driver. Temporary files of
    failed attempts are removed at the end, and the PNG files present are counted and checked
    against what the tasks reported.

    Args:
        root: a fully qualified URI or absolute path every executor can reach.
        skip_existing: keep ``<id>.png`` files already there instead of rewriting them.

    Raises:
        RuntimeError: the files present differ from what the tasks wrote.
    """
    options = dict(storage_options or {})
    writer = _png_writer(root, compress_level, skip_existing, options)
    per_folder: dict[tuple[str, int], list[int]] = {}
    for row in df.mapInArrow(writer, _WRITE_SCHEMA).collect():
        totals = per_folder.setdefault((row["split"], row["label"]), [0, 0, 0])
        totals[0] += row["written"]
        totals[1] += row["skipped"]
        totals[2] += row["bytes"]
    present = _finish_folders(root, options, per_folder)
    expected = {key: written + skipped for key, (written, skipped, _) in per_folder.items()}
    if present != expected:
        diff = {f"split={s}/label={lab}": (present.get((s, lab), 0), n)
                for (s, lab), n in expected.items() if present.get((s, lab), 0) != n}
        raise RuntimeError(
            f"PNG files present under {root!r} differ from the rows exported "
            f"(folder: (present, expected)): {diff}"
        )
    per_split_label: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(expected.items()):
        per_split_label.setdefault(split, {})[str(label)] = n
    return {
        "files": sum(expected.values()),
        "written": sum(t[0] for t in per_folder.values()),
        "skipped": sum(t[1] for t in per_folder.values()),
        "bytes": sum(t[2] for t in per_folder.values()),
        "per_split_label": per_split_label,
    }


def _png_writer(
    root: str, compress_level: int, skip_existing: bool, storage_options: dict[str, Any]
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function each write task runs (captures plain values only)."""

    def write_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        fs, base = open_fs(root, **storage_options)
        files = local_files(fs)
        attempt = uuid.uuid4().hex[:12]
        folders: dict[tuple[str, int], str] = {}
        existing: dict[str, set[str]] = {}
        stats: dict[tuple[str, int], list[int]] = {}
        done = 0
        for batch in batches:
            ids, splits, labels, shapes, offsets, values = _unpack(batch)
            for i, image_id in enumerate(ids):
                key = (splits[i], labels[i])
                folder = folders.get(key)
                if folder is None:
                    folder = folders[key] = f"{base}/split={key[0]}/label={key[1]}"
                    files.makedirs(folder)
                    if skip_existing:
                        existing[folder] = set(files.names(folder))
                    stats[key] = [0, 0, 0]
                name = f"{image_id}.png"
                if skip_existing and name in existing[folder]:
                    stats[key][1] += 1
                    continue
                png = _encode(values, offsets[i], shapes[i], compress_level)
                tmp = temp_name(f"{folder}/{name}", str(attempt))
                files.write(tmp, png)
                done += 1
                if done > _FAILPOINT_AFTER:
                    maybe_fail("export.write")
                files.publish(tmp, f"{folder}/{name}")
                stats[key][0] += 1
                stats[key][2] += len(png)
        keys = sorted(stats)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array([k[0] for k in keys], pa.string()),
                pa.array([k[1] for k in keys], pa.int32()),
                *[pa.array([stats[k][j] for k in keys], pa.int64()) for j in range(3)],
            ],
            names=["split", "label", "written", "skipped", "bytes"],
        )

    return write_partition


def _unpack(batch: pa.RecordBatch) -> tuple[list[str], list[str], list[int], list[list[int]],
                                              list[int], memoryview]:
    """One Arrow batch -> plain columns, checked as a whole (no Python object per pixel row)."""
    columns = {name: batch.column(name) for name in batch.schema.names}
    ids = columns["id"]
    for name, column in columns.items():
        if column.null_count:
            bad = ids.filter(pc.is_null(column)).to_pylist()[:5]
            raise ValueError(f"image rows must not hold nulls. Received: {name}=null for ids {bad}")
    unsafe = pc.match_substring_regex(ids, r"(^$)|(^[._])|[/\\]")
    if pc.any(unsafe).as_py():
        raise ValueError(
            "ids become file names: they must be non-empty, without '/' or '\\', and not start "
            f"with '.' or '_'. Received: id={ids.filter(unsafe)[0].as_py()!r}"
        )
    shapes = np.stack([columns[n].to_numpy() for n in ("height", "width", "nChannels")], axis=1)
    modes = columns["mode"].to_numpy()
    data = columns["data"]
    if data.type == pa.large_binary():
        data = data.cast(pa.binary())
    offsets = np.frombuffer(data.buffers()[1], np.int32, len(data) + 1, data.offset * 4)
    expected_channels = np.array([CHANNELS_BY_OCV_MODE.get(int(m), -1) for m in modes])
    bad = np.flatnonzero(
        (expected_channels != shapes[:, 2]) | (np.diff(offsets) != shapes.prod(axis=1))
        | (shapes[:, :2] <= 0).any(axis=1)
    )
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            "only 8-bit images with 1, 3 or 4 channels whose data holds height*width*nChannels "
            f"bytes can be exported. Received: id={ids[i].as_py()!r}, mode={int(modes[i])}, "
            f"height, width, nChannels={tuple(int(v) for v in shapes[i])}, "
            f"bytes={int(offsets[i + 1] - offsets[i])}"
        )
    values = memoryview(data.buffers()[2]) if data.buffers()[2] is not None else memoryview(b"")
    return (ids.to_pylist(), columns["split"].to_pylist(), columns["label"].to_pylist(),
            shapes.astype(int).tolist(), offsets.tolist(), values)


def _encode(values: memoryview, offset: int, shape: list[int], compress_level: int) -> bytes:
    """One image of a batch -> PNG bytes, pixels read from the Arrow buffer without a copy."""
    height, width, channels = shape
    pixels = np.frombuffer(values, np.uint8, height * width * channels, offset)
    return encode_png(to_rgb(pixels.reshape(height, width, channels)), compress_level)


def _finish_folders(
    root: str, storage_options: dict[str, Any], folders: dict[tuple[str, int], list[int]]
) -> dict[tuple[str, int], int]:
    """Remove temporary files of failed attempts; count the PNG files of every written folder."""
    fs, base = open_fs(root, **storage_options)
    files = local_files(fs)
    present: dict[tuple[str, int], int] = {}
    removed = 0
    for split, label in folders:
        names = files.names(f"{base}/split={split}/label={label}")
        leftovers = [n for n in names if is_temp_name(n)]
        for name in leftovers:
            fs.rm(f"{base}/split={split}/label={label}/{name}")
        removed += len(leftovers)
        present[(split, label)] = sum(
            1 for n in names if n.endswith(".png") and not n.startswith(".")
        )
    if removed:
        logger.info("removed %s temporary files left by failed task attempts", removed)
    return present


def _selection(storage: Storage, cfg: ExportConfig) -> dict[str, Any]:
    """What decides which files an export holds (not how they are compressed)."""
    return {
        "input": storage.qualify(cfg.input),
        "splits": sorted(cfg.splits) if cfg.splits else None,
        "labels": sorted(cfg.labels) if cfg.labels else None,
        "limit": cfg.limit,
        "sample": cfg.sample if cfg.limit else None,
        "seed": cfg.seed if cfg.limit and cfg.sample == "random" else None,
    }


def _manifest(selection: dict[str, Any], counts: dict[str, Any], status: str) -> str:
    body = {"status": status, "fingerprint": sha256_json(selection, 16), "selection": selection,
            "files": counts.get("files"), "per_split_label": counts.get("per_split_label")}
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def _check_skip_target(storage: Storage, output: str, selection: dict[str, Any]) -> bool:
    """``mode: skip`` only resumes an export of the same selection; True: a new output."""
    if not storage.exists(output) or not storage.list(output):
        return True
    manifest = f"{output}/{MANIFEST}"
    if not storage.exists(manifest):
        raise ValueError(
            f"export.mode is 'skip' but {output!r} holds files not written by the export job "
            f"(no {MANIFEST}); use mode 'replace' or another output. Received: "
            f"export.output={output!r}"
        )
    previous = json.loads(storage.read_bytes(manifest))
    if previous.get("fingerprint") != sha256_json(selection, 16):
        raise ValueError(
            f"export.mode is 'skip' but {output!r} holds an export of another selection; "
            "skipping would mix two exports, use mode 'replace'. "
            f"Received: {selection}, found: {previous.get('selection')}"
        )
    return False


def _require_rows(counts: dict[str, Any], cfg: ExportConfig) -> None:
    if counts["files"] == 0:
        raise ValueError(
            f"the export selected no images from {cfg.input!r}. Received: "
            f"splits={cfg.splits}, labels={cfg.labels}, limit={cfg.limit}"
        )
