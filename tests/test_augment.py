"""The augment job on real Spark: outputs, determinism across partitionings, bad input, faults."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT, TEST_CONF, make_digits
from PIL import Image

from pipelines.config import load_config
from pipelines.imaging.image_struct import struct_to_array, to_rgb
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA
from pipelines.stages.augment import run_augment
from pipelines.stages.ingest import images_to_arrow

N_GREY = 12


@pytest.fixture
def png_tree(tmp_path) -> Path:
    """PNG partitions in the export layout: 12 grey 28x28 digits and 2 RGB 20x32 images."""
    root = tmp_path / "png"
    images, labels = make_digits(N_GREY, seed=4)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        split = "train" if i < 8 else "test"
        folder = root / f"split={split}" / f"label={label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{split}-{i:05d}.png")
    rng = np.random.default_rng(9)
    folder = root / "split=train" / "label=3"
    for i in range(2):
        rgb = rng.integers(0, 256, (20, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"rgb-{i}.png")
    return root


def config(tmp_path, source, out="aug", *extra):
    return load_config(TEST_CONF, [
        f"augment.input={source}", f"augment.output={tmp_path / out}",
        "augment.operations=[{op: rotate, probability: 0.9}, {op: shift, probability: 0.5},"
        " {op: gaussian_noise, probability: 0.3}]",
        *extra,
    ])


def png_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def parquet_rows(spark, path: Path) -> list[dict]:
    """Rows of augmented Parquet by id, without the image origin (it names the output folder)."""
    rows = [r.asDict(True) for r in spark.read.parquet(str(path)).orderBy("id").collect()]
    for row in rows:
        row["image"].pop("origin")
    return rows


def test_augment_writes_png_partitions_parquet_with_provenance_sheet_and_report(
        spark, tmp_path, png_tree):
    cfg = config(tmp_path, png_tree, "aug", "augment.keep_originals=true")
    summary = run_augment(spark, cfg)
    out = tmp_path / "aug"
    assert summary["sources"] == N_GREY + 2 and summary["samples_written"] == (N_GREY + 2) * 3
    assert summary["originals_written"] == N_GREY + 2 and summary["bad_files"] == 0
    files = png_files(out / "png")
    assert len(files) == (N_GREY + 2) * 4
    assert "split=train/label=0/train-00000-2.png" in files
    assert "split=test/label=8/test-00008-original.png" in files
    original = png_tree / "split=test/label=8/test-00008.png"
    kept = out / "png/split=test/label=8/test-00008-original.png"
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(kept)))

    rows = spark.read.parquet(str(out / "parquet")).collect()
    assert len(rows) == len(files)
    by_id = {r.id: r for r in rows}
    row = by_id["train-00000-2"]
    assert (row.source_id, row.sample, row.split, row.label) == ("train-00000", 2, "train", 0)
    assert row.image.origin == f"file:{out}/png/split=train/label=0/train-00000-2.png"
    applied = json.loads(row.operations)
    assert [a["op"] for a in applied] in (
        [o for o in ["rotate", "shift", "gaussian_noise"] if o in {a["op"] for a in applied}],)
    assert all({"op", "params", "seed"} <= set(a) for a in applied)
    assert by_id["train-00000-original"].sample is None
    assert json.loads(by_id["train-00000-original"].operations) == []
    fired = [op["op"] for r in rows if r.sample is not None for op in json.loads(r.operations)]
    assert 0 < fired.count("shift") < fired.count("rotate")

    for r in rows:  # Parquet pixels equal the PNG files; grey stays grey, RGB stays RGB
        png = np.asarray(Image.open(io.BytesIO(files[
            f"split={r.split}/label={r.label}/{r.id}.png"])))
        stored = to_rgb(struct_to_array(r.image))
        assert np.array_equal(stored.reshape(png.shape), png)
        assert r.image.nChannels == (3 if r.source_id.startswith("rgb") else 1)
        assert (r.image.height, r.image.width) == ((20, 32) if r.source_id.startswith("rgb")
                                                    else (28, 28))

    sheet = Image.open(out / "sheet.png")
    assert sheet.size[0] > 300 and summary["sheet_rows"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["sources"] == N_GREY + 2 and report["bad"] == []
    assert not list(out.rglob(".*._tmp-*")) and not (out / "_stats").exists()


def test_same_seed_any_partitioning_gives_byte_identical_images(spark, tmp_path, png_tree):
    run_augment(spark, config(tmp_path, png_tree, "p1", "augment.partitions=1"))
    run_augment(spark, config(tmp_path, png_tree, "p5", "augment.partitions=5"))
    run_augment(spark, config(tmp_path, png_tree, "seed1", "augment.seed=1",
                              "augment.formats=[png]"))
    one, five = png_files(tmp_path / "p1" / "png"), png_files(tmp_path / "p5" / "png")
    assert len(one) == (N_GREY + 2) * 3 and one == five
    other = png_files(tmp_path / "seed1" / "png")
    assert other.keys() == one.keys()
    assert sum(other[k] != one[k] for k in one) > len(one) // 2
    assert parquet_rows(spark, tmp_path / "p1" / "parquet") == parquet_rows(
        spark, tmp_path / "p5" / "parquet")


def test_parquet_input_gives_the_same_images_as_png_input(spark, tmp_path, png_tree):
    images, labels = make_digits(N_GREY, seed=4)
    splits = np.array(["train"] * 8 + ["test"] * 4)
    table = images_to_arrow("x", "digits", images, labels, splits)
    ids = [f"{s}-{i:05d}" for i, s in enumerate(splits)]  # the ids the PNG tree uses
    table = table.set_column(0, "id", pa.array(ids))
    spark.createDataFrame(table, schema=IMAGE_ROW_SCHEMA).write.parquet(str(tmp_path / "in"))
    run_augment(spark, config(tmp_path, tmp_path / "in", "from_parquet",
                              "augment.input_format=parquet", "augment.formats=[png]"))
    for path in png_tree.rglob("rgb-*.png"):
        path.unlink()
    run_augment(spark, config(tmp_path, png_tree, "from_png", "augment.formats=[png]"))
    from_parquet = png_files(tmp_path / "from_parquet" / "png")
    assert len(from_parquet) == N_GREY * 3
    assert from_parquet == png_files(tmp_path / "from_png" / "png")


def add_bad_files(root: Path) -> list[str]:
    folder = root / "split=train" / "label=1"
    good = next(folder.glob("*.png")).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(good)  # outside the split=/label= layout
    return ["empty.png", "notes.txt", "stray.png", "truncated.png"]


def test_bad_files_are_skipped_counted_and_listed_in_the_report(spark, tmp_path, png_tree):
    names = add_bad_files(png_tree)
    summary = run_augment(spark, config(tmp_path, png_tree, "aug",
                                        "augment.max_bad_fraction=0.5"))
    assert summary["sources"] == N_GREY + 2 and summary["bad_files"] == 4
    assert summary["bad_fraction"] == pytest.approx(4 / (N_GREY + 6))
    report = json.loads((tmp_path / "aug" / "report.json").read_text())
    assert sorted(Path(b["path"]).name for b in report["bad"]) == names
    reasons = {Path(b["path"]).name: b["reason"] for b in report["bad"]}
    assert "empty" in reasons["empty.png"] and "layout" in reasons["stray.png"]
    assert "cannot decode" in reasons["truncated.png"]
    assert len(png_files(tmp_path / "aug" / "png")) == (N_GREY + 2) * 3


def test_too_many_bad_files_fail_the_job_and_publish_nothing(spark, tmp_path, png_tree):
    out = tmp_path / "aug"
    out.mkdir()
    (out / "previous-run.txt").write_text("kept")
    add_bad_files(png_tree)
    message = r"4 of 18 input files are bad.*max_bad_fraction=0.1.*Received"
    with pytest.raises(ValueError, match=message):
        run_augment(spark, config(tmp_path, png_tree, "aug", "augment.max_bad_fraction=0.1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug", "png"]  # no staging leftovers
    assert [p.name for p in out.iterdir()] == ["previous-run.txt"]


def test_missing_input_is_a_clear_error(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        run_augment(spark, config(tmp_path, tmp_path / "does-not-exist"))
    assert not (tmp_path / "aug").exists()


def test_job_exits_2_on_unknown_operation_before_spark_starts(tmp_path):
    from jobs.augment import main

    assert main(["--config", str(TEST_CONF), "--set", "augment.operations=[{op: twirl}]"]) == 2


@pytest.mark.slow
def test_worker_killed_once_mid_task_still_yields_the_exact_output(spark, tmp_path, png_tree):
    run_augment(spark, config(tmp_path, png_tree, "clean"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable,
           "PIPELINES_FAILPOINTS": "augment.write=kill",
           "PIPELINES_FAILPOINTS_DIR": str(tmp_path / "failpoints")}
    operations = ("augment.operations=[{op: rotate, probability: 0.9}, {op: shift, probability:"
                  " 0.5}, {op: gaussian_noise, probability: 0.3}]")
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "augment.py"), "--config", str(TEST_CONF),
         "--set", "spark.master=local[2,3]",  # local mode retries a failed task 2 more times
         "--set", f"augment.input={png_tree}", "--set", f"augment.output={tmp_path / 'killed'}",
         "--set", operations],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "failpoints" / "augment.write").exists()  # the worker really died once
    assert png_files(tmp_path / "killed" / "png") == png_files(tmp_path / "clean" / "png")
    assert parquet_rows(spark, tmp_path / "killed" / "parquet") == parquet_rows(
        spark, tmp_path / "clean" / "parquet")
    assert not list((tmp_path / "killed").rglob(".*.tmp-*"))


def test_a_flat_folder_of_any_format_is_augmented_without_labels(spark, tmp_path):
    """Augmentor's own case: Pipeline(folder) on a folder of images with no class folders."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(flat / "a.jpg")
    Image.fromarray(rgb).convert("P").save(flat / "b.gif")
    Image.fromarray(rgb[:, :, 0]).save(flat / "c.bmp")
    summary = run_augment(spark, config(tmp_path, flat, "aug", "augment.samples_per_image=2"))
    assert summary["sources"] == 3 and summary["bad_files"] == 0
    assert sorted(png_files(tmp_path / "aug" / "png")) == [
        f"{n}-{k}.png" for n in "abc" for k in range(2)]
    rows = spark.read.parquet(str(tmp_path / "aug" / "parquet")).collect()
    assert {(r.split, r.label) for r in rows} == {("train", None)}
    assert "label_name" not in spark.read.parquet(str(tmp_path / "aug" / "parquet")).columns
    assert {r.image.nChannels for r in rows} == {1, 3}
