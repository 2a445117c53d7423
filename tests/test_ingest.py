import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image
from pyspark.errors import PythonException
from pyspark.sql import functions as F

from pipelines.config import load_config
from pipelines.imaging.image_struct import struct_to_array
from pipelines.io.image_parquet import read_images, write_image_parquet
from pipelines.stages.ingest import image_folder_frame, run_ingest
from pipelines.stages.mnist import TEST_LABEL_COUNTS, load_mnist


def _config(tmp_path, *overrides):
    return load_config(None, [f"output_root={tmp_path / 'out'}", *overrides])


def _tiny_config(tmp_path, tiny_mnist_dir, *overrides):
    return _config(
        tmp_path, "mnist.sources=[local]", f"mnist.local_dir={tiny_mnist_dir}",
        f"mnist.cache_dir={tmp_path / 'cache'}", "ingest.validation_size=10",
        "ingest.partitions=3", *overrides,
    )


def _parquet_table(path):
    return ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()


def test_ingest_writes_splits_ids_labels_and_exact_pixels(spark, tmp_path, tiny_mnist_dir):
    config = _tiny_config(tmp_path, tiny_mnist_dir)
    summary = run_ingest(spark, config)
    assert summary["rows_per_split"] == {"train": 30, "validation": 10, "test": 20}
    df = spark.read.parquet(config.ingest.output)
    assert df.columns == ["id", "label", "image", "split"]
    rows = {r.id: r for r in df.collect()}
    from pipelines.io.idx import read_idx

    train = read_idx(tiny_mnist_dir / "train-images-idx3-ubyte")
    labels = read_idx(tiny_mnist_dir / "train-labels-idx1-ubyte")
    assert rows["train-00003"].split == "validation"
    assert rows["train-00010"].split == "train"
    for i in (0, 9, 10, 39):
        row = rows[f"train-{i:05d}"]
        assert row.label == labels[i]
        assert row.image.data == train[i].tobytes()
        assert (row.image.height, row.image.width, row.image.nChannels, row.image.mode) == (28, 28, 1, 0)
    assert rows["test-00019"].split == "test"


def test_rerun_replaces_output_without_duplicates(spark, tmp_path, tiny_mnist_dir):
    config = _tiny_config(tmp_path, tiny_mnist_dir)
    run_ingest(spark, config)
    first = _parquet_table(config.ingest.output).sort_values("id").reset_index(drop=True)
    run_ingest(spark, config)
    second = _parquet_table(config.ingest.output).sort_values("id").reset_index(drop=True)
    assert len(second) == 60
    assert first["id"].tolist() == second["id"].tolist()
    assert [x["data"] for x in first["image"]] == [x["data"] for x in second["image"]]
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name != "images"]
    assert leftovers == []


def test_mode_error_refuses_existing_output_and_keeps_it(spark, tmp_path, tiny_mnist_dir):
    run_ingest(spark, _tiny_config(tmp_path, tiny_mnist_dir))
    config = _tiny_config(tmp_path, tiny_mnist_dir, "ingest.mode=error")
    with pytest.raises(FileExistsError, match="ingest.output already exists.*Received"):
        run_ingest(spark, config)
    assert spark.read.parquet(config.ingest.output).count() == 60


def test_failed_write_keeps_previous_output_and_leaves_no_temp(spark, tmp_path, tiny_mnist_dir):
    config = _tiny_config(tmp_path, tiny_mnist_dir)
    run_ingest(spark, config)
    good = spark.read.parquet(config.ingest.output)

    @F.udf("int")
    def explode(label):
        raise RuntimeError("disk on fire")

    broken = good.withColumn("label", explode("label"))
    with pytest.raises(PythonException, match="disk on fire"):
        write_image_parquet(spark, broken, config.ingest.output, config.ingest.partitions)
    assert spark.read.parquet(config.ingest.output).count() == 60
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images"]


def test_folder_ingest_reads_label_folders_and_skips_undecodable_files(spark, tmp_path):
    folder = tmp_path / "pics"
    rng = np.random.default_rng(0)
    expected = {}
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for k in range(3):
            array = rng.integers(0, 256, (8, 6), dtype=np.uint8)
            Image.fromarray(array).save(folder / label / f"{k}.png")
            expected[(label, k)] = array
    (folder / "dog" / "broken.png").write_bytes(b"not a png")
    df = image_folder_frame(spark, str(folder), "train")
    rows = df.collect()
    assert len(rows) == 6
    assert {r.label for r in rows} == {0, 1}  # cat=0, dog=1 (sorted names)
    for r in rows:
        label_name = "cat" if r.label == 0 else "dog"
        k = int(r.image.origin.rsplit("/", 1)[1].split(".")[0])
        np.testing.assert_array_equal(struct_to_array(r.image)[:, :, 0], expected[(label_name, k)])
        assert r.split == "train"


def test_folder_ingest_reads_the_export_layout_and_rejects_unknown_labels(spark, tmp_path):
    folder = tmp_path / "export"
    for split, label in (("train", 3), ("test", 7)):
        (folder / f"split={split}" / f"label={label}").mkdir(parents=True)
        Image.fromarray(np.full((4, 4), label, np.uint8)).save(
            folder / f"split={split}" / f"label={label}" / "x.png"
        )
    rows = image_folder_frame(spark, str(folder), "train").orderBy("label").collect()
    assert [(r.split, r.label) for r in rows] == [("train", 3), ("test", 7)]
    with pytest.raises(ValueError, match=r"labels not in class_names \['3'\]. Received: \['7'\]"):
        image_folder_frame(spark, str(folder), "train", ["3"]).collect()


def test_read_images_rejects_missing_and_non_image_parquet(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read image Parquet at"):
        read_images(spark, str(tmp_path / "nothing"))
    spark.range(3).write.parquet(str(tmp_path / "ints"))
    with pytest.raises(ValueError, match=r"has no 'image' column. Received columns: \['id'\]"):
        read_images(spark, str(tmp_path / "ints"))


@pytest.mark.slow
def test_real_mnist_ingest_has_canonical_counts_and_exact_pixels(spark, tmp_path, mnist_files):
    config = _config(tmp_path, f"mnist.cache_dir={mnist_files.train_images.parent}")
    summary = run_ingest(spark, config)
    assert summary["rows_per_split"] == {"train": 55000, "validation": 5000, "test": 10000}
    table = _parquet_table(config.ingest.output)
    test = table[table["split"] == "test"]
    assert tuple(np.bincount(test["label"], minlength=10)) == TEST_LABEL_COUNTS
    arrays = load_mnist(mnist_files)
    for prefix, images, labels in (("train", arrays.train_images, arrays.train_labels),
                                   ("test", arrays.test_images, arrays.test_labels)):
        part = table[table["id"].str.startswith(prefix)].sort_values("id")
        assert len(part) == len(images)
        stored = b"".join(x["data"] for x in part["image"])
        assert stored == images.tobytes()
        np.testing.assert_array_equal(part["label"].to_numpy(), labels)
