"""The export job: image Parquet -> PNG files partitioned by split and label."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TEST_CONF, make_digits
from pyspark.errors import PythonException
from pyspark.sql import functions as F

from pipelines.config import ConfigError, load_config
from pipelines.imaging.image_struct import array_to_struct
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA
from pipelines.stages.export import MANIFEST, run_export
from pipelines.stages.ingest import image_folder_frame


def export_config(inp, out, *overrides):
    return load_config(TEST_CONF, [f"export.input={inp}", f"export.output={out}",
                                   "export.limit=null", *overrides])


def png_files(out: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``out`` except the manifest (and the
    checksum file Hadoop's local filesystem writes beside it)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, f".{MANIFEST}.crc")
    }


def write_rows(spark, rows, path):
    spark.createDataFrame(rows, IMAGE_ROW_SCHEMA).write.parquet(str(path))
    return path


@pytest.fixture
def images(spark, tmp_path):
    """Image Parquet: 20 gray 28x28 digits (train/test, labels 0-3) and 2 colour images."""
    gray, labels = make_digits(20, seed=3)
    rows = [(f"img-{i:03d}", "train" if i < 14 else "test", int(labels[i]) % 4,
             array_to_struct(gray[i], f"mem:{i}")) for i in range(20)]
    rng = np.random.default_rng(4)
    rows.append(("rgb-0", "test", 5, array_to_struct(
        rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "mem:bgr")))
    rows.append(("rgba-0", "test", 5, array_to_struct(
        rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "mem:bgra")))
    return write_rows(spark, rows, tmp_path / "images")


def test_export_writes_one_png_per_row_partitioned_by_split_and_label(spark, images, tmp_path):
    out = tmp_path / "png"
    summary = run_export(spark, export_config(images, out))

    expected = {f"split={r.split}/label={r.label}/{r.id}.png"
                for r in spark.read.parquet(str(images)).collect()}
    assert set(png_files(out)) == expected
    assert summary["files"] == summary["files_written"] == 22
    assert summary["per_split_label"]["test"]["5"] == 2
    assert sum(sum(v.values()) for v in summary["per_split_label"].values()) == 22
    assert not list(tmp_path.glob("png._*")), "no staged or old sibling folder is left"


def test_exported_pixels_equal_parquet_bytes_read_back_with_spark(spark, images, tmp_path):
    out = tmp_path / "png"
    run_export(spark, export_config(images, out))

    back = spark.read.format("image").load(str(out))  # split and label: partition columns
    back = {
        (r.id, r.split, r.label): r.image
        for r in back.select(F.regexp_extract("image.origin", r"/([^/]+)\.png$", 1).alias("id"),
                             "split", "label", "image").collect()
    }
    source = spark.read.parquet(str(images)).collect()
    assert len(back) == len(source) == 22
    for row in source:
        png = back[(row.id, row.split, row.label)]
        assert (png.height, png.width, png.nChannels, png.mode) == (
            row.image.height, row.image.width, row.image.nChannels, row.image.mode), row.id
        assert png.data == row.image.data, row.id
    assert {back[k].nChannels for k in back} == {1, 3, 4}


def test_export_is_read_back_by_ingest_and_keras(spark, images, tmp_path):
    out = tmp_path / "png"
    run_export(spark, export_config(images, out, "export.splits=[train]"))

    again = image_folder_frame(spark, str(out), "train")
    assert again.count() == 14
    assert {r.split for r in again.select("split").distinct().collect()} == {"train"}

    import keras

    dataset = keras.utils.image_dataset_from_directory(
        str(out / "split=train"), labels="inferred", color_mode="grayscale",
        image_size=(28, 28), shuffle=False, batch_size=64)
    assert dataset.class_names == [f"label={i}" for i in range(4)]
    pixels, labels = next(iter(dataset))
    files = sorted((p.parent.name, p.name) for p in (out / "split=train").rglob("*.png"))
    source = {r.id: r.image.data for r in spark.read.parquet(str(images)).collect()}
    for i, (label_dir, name) in enumerate(files):
        assert dataset.class_names[int(labels[i])] == label_dir
        assert bytes(np.asarray(pixels[i], np.uint8).ravel()) == source[name[:-4]]


def test_rerun_replace_yields_the_same_files(spark, images, tmp_path):
    out = tmp_path / "png"
    config = export_config(images, out)
    run_export(spark, config)
    first = png_files(out)
    (out / "split=train" / "stray.png").write_bytes(b"not from this run")

    run_export(spark, config)
    assert png_files(out) == first


def test_skip_mode_keeps_existing_files_and_writes_missing_ones(spark, images, tmp_path):
    out = tmp_path / "png"
    config = export_config(images, out, "export.mode=skip")
    run_export(spark, config)
    first = png_files(out)
    files = sorted(out.rglob("*.png"))
    kept = files[0]
    before = kept.stat().st_mtime_ns
    for path in files[1:4]:
        path.unlink()

    summary = run_export(spark, config)
    assert (summary["files_written"], summary["files_skipped"], summary["files"]) == (3, 19, 22)
    assert kept.stat().st_mtime_ns == before
    assert png_files(out) == first


def test_skip_mode_refuses_to_mix_two_selections(spark, images, tmp_path):
    out = tmp_path / "png"
    run_export(spark, export_config(images, out, "export.mode=skip", "export.labels=[1]"))
    first = png_files(out)

    with pytest.raises(ValueError, match="another selection.*Received"):
        run_export(spark, export_config(images, out, "export.mode=skip", "export.labels=[2]"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not written by the export job.*Received"):
        run_export(spark, export_config(images, foreign, "export.mode=skip"))
    assert png_files(out) == first
    assert [p.name for p in foreign.iterdir()] == ["a.txt"]


def test_limit_first_and_random_sample_with_filters(spark, images, tmp_path):
    first = run_export(spark, export_config(
        images, tmp_path / "first", "export.limit=3", "export.sample=first",
        "export.splits=[train]"))
    assert set(png_files(tmp_path / "first")) == {
        f"split=train/label={int(lab) % 4}/img-{i:03d}.png"
        for i, lab in enumerate(make_digits(20, seed=3)[1][:3])}
    assert first["files"] == 3

    config = export_config(images, tmp_path / "random", "export.limit=5", "export.sample=random",
                           "export.labels=[0, 1]", "export.partitions=3")
    run_export(spark, config)
    chosen = set(png_files(tmp_path / "random"))
    assert len(chosen) == 5
    assert all("/label=0/" in p or "/label=1/" in p for p in chosen)
    run_export(spark, config.model_copy(update={"export": config.export.model_copy(
        update={"partitions": 1, "output": str(tmp_path / "random2")})}))
    assert set(png_files(tmp_path / "random2")) == chosen, "the sample ignores partitioning"


def test_failed_export_keeps_the_previous_output(spark, images, tmp_path):
    out = tmp_path / "png"
    run_export(spark, export_config(images, out))
    first = png_files(out)
    env = spark.sparkContext.environment
    env.update(PIPELINES_FAILPOINTS="export.write=raise",
               PIPELINES_FAILPOINTS_DIR=str(tmp_path / "marks"))
    try:
        with pytest.raises(PythonException, match="failpoint 'export.write' fired"):
            run_export(spark, export_config(images, out, "export.compress_level=0"))
    finally:
        env.pop("PIPELINES_FAILPOINTS")
        env.pop("PIPELINES_FAILPOINTS_DIR")
    assert (tmp_path / "marks" / "export.write").exists()
    assert png_files(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "marks", "png"]


def test_killed_worker_is_retried_and_leaves_the_exact_file_set(spark, images, tmp_path):
    out = tmp_path / "png"
    marks = tmp_path / "marks"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYSPARK_PYTHON=sys.executable,
               PIPELINES_FAILPOINTS="export.write=kill", PIPELINES_FAILPOINTS_DIR=str(marks))
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "export_png.py"), "--config", str(TEST_CONF),
         "--set", "spark.master=local[2,3]", "--set", f"export.input={images}",
         "--set", f"export.output={out}", "--set", "export.limit=null",
         "--set", "export.partitions=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (marks / "export.write").exists(), "the failpoint fired"
    assert "Python worker exited unexpectedly" in done.stderr

    expected = {f"split={r.split}/label={r.label}/{r.id}.png"
                for r in spark.read.parquet(str(images)).collect()}
    assert set(png_files(out)) == expected, "no temporary, partial or missing file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "marks", "png"]


def test_bad_config_values_fail_on_load_naming_the_value():
    for override, key in [("export.compress_level=12", "compress_level"),
                          ("export.mode=append", "mode"), ("export.limit=0", "limit"),
                          ("export.labels=[-1]", "labels"), ("export.splits=[a/b]", "splits"),
                          ("export.sample=all", "sample"), ("export.partitions=0", "partitions")]:
        with pytest.raises(ConfigError, match=f"export.{key}.*Received"):
            load_config(TEST_CONF, [override])
    from jobs.export_png import main

    assert main(["--config", str(TEST_CONF), "--set", "export.mode=append"]) == 2


def test_bad_inputs_give_clear_errors_and_write_nothing(spark, images, tmp_path):
    out = tmp_path / "png"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        run_export(spark, export_config(tmp_path / "no-such-folder", out))

    plain = tmp_path / "plain"
    spark.createDataFrame([(1, "a")], "x int, y string").write.parquet(str(plain))
    with pytest.raises(ValueError, match="no 'image' column. Received"):
        run_export(spark, export_config(plain, out))

    not_struct = tmp_path / "not_struct"
    spark.createDataFrame([("a", "train", 1, b"png")], "id string, split string, label int, "
                          "image binary").write.parquet(str(not_struct))
    with pytest.raises(ValueError, match="image struct.*Received: image=binary"):
        run_export(spark, export_config(not_struct, out))

    with pytest.raises(ValueError, match="selected no images.*Received"):
        run_export(spark, export_config(images, out, "export.labels=[9]"))

    broken = dict(array_to_struct(np.zeros((4, 4), np.uint8), "x"), nChannels=3)
    bad_rows = write_rows(spark, [("a", "train", 0, broken)], tmp_path / "bad_rows")
    with pytest.raises(PythonException, match="Received: id='a', mode=0"):
        run_export(spark, export_config(bad_rows, out))

    unsafe = write_rows(spark, [("../up", "train", 0, array_to_struct(
        np.zeros((4, 4), np.uint8), "x"))], tmp_path / "unsafe")
    with pytest.raises(PythonException, match=r"Received: id='../up'"):
        run_export(spark, export_config(unsafe, out))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad_rows", "images", "not_struct", "plain", "unsafe"]


@pytest.mark.slow
def test_mnist_export_of_5000_real_images_round_trips(spark, request, tmp_path):
    # Real MNIST, the whole validation split (5,000 files): all 70,000 cost 2 min of the
    # suite, the validation and test splits 47 s; benchmarks/export_png.py exports all of them.
    from pipelines.stages.ingest import run_ingest

    mnist_files = request.getfixturevalue("mnist_files")
    source = tmp_path / "images"
    run_ingest(spark, load_config(TEST_CONF, [
        f"mnist.local_dir={Path(mnist_files.train_images).parent}",
        "mnist.sources=[local]", f"ingest.output={source}"]))
    out = tmp_path / "png"
    config = export_config(source, out, "export.compress_level=1",
                           "export.splits=[validation]")

    summary = run_export(spark, config)
    assert summary["files"] == summary["files_written"] == 5_000
    assert {s: sum(v.values()) for s, v in summary["per_split_label"].items()} == {
        "validation": 5_000}
    assert sorted(summary["per_split_label"]["validation"]) == [str(d) for d in range(10)]
    files = sorted(png_files(out))
    assert len(files) == 5_000 and all(f.endswith(".png") for f in files)

    # Many small files: without a small open cost Spark makes tasks of 32 files.
    spark.conf.set("spark.sql.files.openCostInBytes", "8192")
    back = spark.read.format("image").load(str(out)).select(
        F.regexp_extract("image.origin", r"/([^/]+)\.png$", 1).alias("id"),
        F.col("split").alias("png_split"), F.col("label").alias("png_label"),
        F.col("image.nChannels").alias("png_channels"), F.col("image.data").alias("png_data"))
    src = spark.read.parquet(str(source)).where("split = 'validation'").select(
        "id", "split", "label", "image.data")
    matched = src.join(back, "id").where(
        (F.col("data") == F.col("png_data")) & (F.col("split") == F.col("png_split"))
        & (F.col("label") == F.col("png_label")) & (F.col("png_channels") == 1))
    try:
        assert matched.count() == 5_000
    finally:
        spark.conf.unset("spark.sql.files.openCostInBytes")
    # Reruns (replace and skip) are covered on small data by the tests above.
