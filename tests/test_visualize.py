import io

import numpy as np
import pytest
from PIL import Image

from pipelines.config import load_config
from pipelines.stages.ingest import run_ingest
from pipelines.stages.visualize import _caption, run_visualize, sample_per_class, sample_rows


@pytest.fixture
def ingested(spark, tmp_path, tiny_mnist_dir):
    config = load_config(None, [
        f"output_root={tmp_path / 'out'}", "mnist.sources=[local]",
        f"mnist.local_dir={tiny_mnist_dir}", f"mnist.cache_dir={tmp_path / 'cache'}",
        "ingest.validation_size=10", "visualize.count=12", "visualize.columns=4",
        "visualize.per_class=2",
    ])
    run_ingest(spark, config)
    return config


def test_visualize_writes_one_sheet_per_split_and_a_per_class_sheet(spark, ingested):
    summary = run_visualize(spark, ingested)
    assert set(summary["sheets"]) == {"train", "validation", "test", "per_class"}
    out = ingested.visualize.output
    for name in ("train", "validation", "test", "per_class"):
        with Image.open(f"{out}/{name}.png") as img:
            assert img.format == "PNG"
            pixels = np.asarray(img.convert("L"))
    # a real picture: dark digit cells on white paper, not a blank page
        assert pixels.min() < 50 and pixels.max() > 200


def test_sampling_is_seeded_and_independent_of_partitioning(spark, ingested):
    df = spark.read.parquet(ingested.ingest.output)
    a = [r.image.origin for r in sample_rows(df.repartition(1), 7, seed=3)]
    b = [r.image.origin for r in sample_rows(df.repartition(5), 7, seed=3)]
    c = [r.image.origin for r in sample_rows(df, 7, seed=4)]
    assert a == b and a != c
    per_class = sample_per_class(df, 2, seed=3)
    assert [r.label for r in per_class] == sorted([i for i in range(10)] * 2)


def test_visualize_rejects_parquet_without_labels(spark, ingested, tmp_path):
    path = str(tmp_path / "nolabel")
    spark.read.parquet(ingested.ingest.output).drop("label").write.parquet(path)
    config = load_config(None, [f"visualize.input={path}", f"visualize.output={tmp_path / 's'}"])
    with pytest.raises(ValueError, match="no 'label' column.*Received columns"):
        run_visualize(spark, config)
    assert not (tmp_path / "s").exists()


def test_one_hot_captions_render(spark, ingested, tmp_path):
    sheets = {}
    for one_hot in (False, True):
        out = tmp_path / f"one_hot_{one_hot}"
        config = load_config(None, [
            f"visualize.input={ingested.ingest.output}", f"visualize.output={out}",
            f"visualize.one_hot={one_hot}", "visualize.count=4", "visualize.splits=[test]",
        ])
        summary = run_visualize(spark, config)
        assert set(summary["sheets"]) == {"test", "per_class"}
        sheets[one_hot] = np.asarray(Image.open(io.BytesIO((out / "test.png").read_bytes())))
    # The same images, with a second caption line: the one-hot sheet is taller.
    assert sheets[True].shape[0] > sheets[False].shape[0]
    assert _caption(3, config.visualize, 10) == "3\n0001000000"


def test_cells_widen_for_long_captions_so_neighbours_do_not_overlap():
    from pipelines.imaging.contact_sheet import render_sheet

    images = [np.full((28, 28), 128, np.uint8)] * 10

    def size(caption):
        return Image.open(io.BytesIO(render_sheet(images, [caption] * 10, columns=10))).size

    short, long = size("#0\nshift"), size("#0\nrandom_distortion")  # augment's captions
    # "random_distortion" is ~1.3 in wide at 9 pt, more than the default 1.1 in cell.
    assert long[0] > 1.15 * short[0]
    assert long[1] > short[1]  # the cells grow in height too: the images stay square
