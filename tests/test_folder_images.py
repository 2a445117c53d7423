"""Your own images: a generated labelled folder (any size, mode and format, a few bad files)
through ingest -> visualize -> export -> augment -> transfer -> train_cnn -> score."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_CONF
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.imaging.image_struct import struct_to_array, to_rgb
from pipelines.io.image_folder import classify
from pipelines.stages.augment import run_augment
from pipelines.stages.export import run_export
from pipelines.stages.folder_ingest import split_counts
from pipelines.stages.ingest import run_ingest
from pipelines.stages.score import run_score
from pipelines.stages.train_cnn import run_train_cnn
from pipelines.stages.transfer import run_transfer
from pipelines.stages.visualize import run_visualize

#: Images per class (the split fractions do not divide them evenly).
CLASSES = {"circle": 15, "square": 17, "triangle": 19}
SIZES = [(20, 20), (300, 200), (64, 48), (33, 57), (128, 96)]  # (width, height)
MODES = ["L", "RGB", "RGBA", "P", "I;16"]
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
TINY = {
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
        {"MaxPooling2D": {"pool_size": 4}},
        {"Flatten": {}},
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
    "batch_size": 16,
    "epochs": 1,
}


def draw(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image of a bright shape (one per class) on noise."""
    array = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = height / 2, width / 2, min(height, width) / 3
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    elif kind == "square":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    else:
        mask = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - cy + r) / 2)
    array[mask] = (250, 220, 40)
    return array


def save(rgb: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Save ``rgb`` in ``mode``; returns the 8-bit RGB(A)/gray pixels ingest must produce."""
    if mode == "I;16":  # 16-bit gray: ingest keeps the high byte
        gray16 = (np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
                  + np.uint16(3))
        Image.fromarray(gray16).save(path)
        return (gray16 >> 8).astype(np.uint8)[..., None]
    image = Image.fromarray(rgb).convert(mode)
    image.save(path)
    if path.suffix == ".jpg":  # lossy: what a JPEG decoder gives back
        with Image.open(path) as img:
            pixels = np.asarray(img)
    else:
        pixels = np.asarray(image.convert("RGB") if mode == "P" else image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """<root>/<class>/<file> of 51 good images, three bad files and a hidden file."""
    root = tmp_path_factory.mktemp("own") / "images"
    rng = np.random.default_rng(7)
    expected: dict[str, np.ndarray] = {}
    k = 0
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            width, height = SIZES[k % len(SIZES)]
            mode = MODES[k % len(MODES)]
            jpeg = k % 7 == 3 and mode in ("L", "RGB")
            path = root / name / f"img{i:02d}.{'jpg' if jpeg else 'png'}"
            expected[f"file://{path}"] = save(draw(name, width, height, rng), mode, path)
            k += 1
    good = (root / "circle" / "img00.png").read_bytes()
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "triangle" / "notes.png").write_text("not an image at all")
    (root / "triangle" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    bad = sorted(f"file://{root / p}" for p in
                 ("circle/empty.png", "square/truncated.png", "triangle/notes.png"))
    return root, expected, bad


def test_folder_layouts_are_told_apart_from_the_paths_alone():
    layout, entries = classify(["train/cat/a.png", "val/dog/b.jpg", "split=test/label=3/c.png",
                                "train/stray.png", "_SUCCESS"])
    assert layout == "splits"
    assert [(e.split, e.label_name, e.kind) for e in entries] == [
        ("train", "cat", None), ("validation", "dog", None), ("test", "3", None),
        ("train", None, "bad"), (None, None, "ignored")]
    layout, entries = classify(["cat/a.png", "cat/sub/b.png", "readme.txt"])
    assert layout == "classes"
    assert [(e.label_name, e.kind) for e in entries] == [("cat", None), ("cat", None),
                                                        (None, "bad")]
    assert classify(["a.png", "b.gif"])[0] == "flat"


def test_split_counts_are_within_one_image_of_each_fraction():
    for n in range(0, 60):
        counts = split_counts(n, FRACTIONS)
        assert sum(counts.values()) == n
        assert all(abs(counts[s] - n * f) < 1 for s, f in FRACTIONS.items()), (n, counts)


def test_split_fractions_must_sum_to_one_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"ingest\.splits.*sum to 1.*Received"):
        load_config(TEST_CONF, ["ingest.splits={train: 0.8, test: 0.1}"])


def _config(tmp_path, folder_root, *extra):
    return load_config(TEST_CONF, [
        f"output_root={tmp_path / 'out'}", "ingest.source=folder", f"ingest.folder={folder_root}",
        f"ingest.splits={json.dumps(FRACTIONS)}", "ingest.max_bad_fraction=0.1",
        "ingest.partitions=2", "visualize.count=20", "visualize.per_class=4",
        "export.limit=null", "augment.samples_per_image=1", "augment.splits=[train]",
        "transfer.train_size=null", "transfer.test_size=null",
        "transfer.reload_check_rows=0",
        "cnn.architecture=tiny", f"cnn.architectures={{tiny: {json.dumps(TINY)}}}",
        "cnn.input_shape=[32, 32, 3]",
        f"cnn.inputs=[{tmp_path}/out/images, {tmp_path}/out/augmented/parquet]",
        "score.batch_size=16",
        *extra,
    ])


def test_a_labelled_folder_goes_through_every_stage(spark, tmp_path, folder):
    root, expected, bad = folder
    config = _config(tmp_path, root)
    out = tmp_path / "out"

    # ingest: every good image, exact pixels, classes recorded, bad files listed
    summary = run_ingest(spark, config)
    assert summary["rows"] == sum(CLASSES.values()) == len(expected)
    report = json.loads((out / "images" / "_ingest_report.json").read_text())
    assert [b["path"] for b in report["bad"]] == bad
    reasons = [b["reason"] for b in report["bad"]]
    assert "empty" in reasons[0] and "cannot decode" in reasons[1] + reasons[2]
    assert [i["path"] for i in report["ignored"]] == [f"file://{root}/triangle/.DS_Store"]
    assert json.loads((out / "images" / "_classes.json").read_text()) == sorted(CLASSES)
    for name, count in CLASSES.items():
        per_split = report["rows_per_class"][name]
        assert sum(per_split.values()) == count
        for split, fraction in FRACTIONS.items():
            assert abs(per_split.get(split, 0) - count * fraction) <= 1, (name, per_split)
    rows = spark.read.parquet(str(out / "images")).collect()
    assert {r.label_name: r.label for r in rows} == {n: i for i, n in enumerate(sorted(CLASSES))}
    for r in rows:
        stored = to_rgb(struct_to_array(r.image))
        np.testing.assert_array_equal(stored, expected[r.image.origin])
    channels = {r.image.nChannels for r in rows}
    assert channels == {1, 3, 4}
    sizes = {(r.image.width, r.image.height) for r in rows}
    assert (20, 20) in sizes and (300, 200) in sizes
    # the same files land in the same splits on a rerun
    again = run_ingest(spark, config)
    assert again["rows_per_split"] == summary["rows_per_split"]

    # visualize: sheets captioned with the class names
    sheets = run_visualize(spark, config)["sheets"]
    assert set(sheets) == {"train", "validation", "test", "per_class"}

    # export -> augment on the export layout, and on the original plain folder
    exported = run_export(spark, config)
    assert exported["files"] == len(expected)
    augmented = run_augment(spark, config)
    assert augmented["sources"] == summary["rows_per_split"]["train"]
    assert augmented["bad_files"] == 0
    plain = load_config(TEST_CONF, [
        f"augment.input={root}", f"augment.output={tmp_path / 'plain'}",
        "augment.samples_per_image=1", "augment.max_bad_fraction=0.1"])
    from_folder = run_augment(spark, plain)
    assert from_folder["sources"] == len(expected) and from_folder["bad_files"] == 3
    plain_report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert [b["path"] for b in plain_report["bad"]] == bad
    assert (tmp_path / "plain" / "png" / "circle" / "img01-0.png").is_file()
    named = spark.read.parquet(str(tmp_path / "plain" / "parquet"))
    assert {(r.label, r.label_name) for r in named.select("label", "label_name").distinct()
            .collect()} == {(i, n) for i, n in enumerate(sorted(CLASSES))}

    # transfer on the ingested splits
    transfer = run_transfer(spark, config)
    assert transfer["test_size"] == summary["rows_per_split"]["test"]
    assert [c["name"] for c in transfer["per_class"]] == sorted(CLASSES)

    # train_cnn: images of every size and mode fitted to 32x32x3, 3 classes from the data
    cnn = run_train_cnn(spark, config)
    metrics = json.loads((out / "cnn" / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["class_names"] == sorted(CLASSES)
    assert metrics["input_shape"] == [32, 32, 3]
    counts = summary["rows_per_split"]
    assert cnn["rows"] == {**counts, "train": 2 * counts["train"]}  # + one augmented each

    # score covers every ingested test image
    scored = run_score(spark, config)
    assert scored["rows"] == summary["rows_per_split"]["test"]
    assert scored["unscorable_rows"] == 0
    ids = {r.id for r in spark.read.parquet(str(out / "scores")).collect()}
    assert ids == {r.id for r in rows if r.split == "test"}


def test_too_many_bad_files_fail_ingest_and_publish_nothing(spark, tmp_path, folder):
    root, _, bad = folder
    config = _config(tmp_path, root, "ingest.max_bad_fraction=0.01")
    with pytest.raises(ValueError, match=r"3 of 54 files are bad.*max_bad_fraction=0.01.*Received"):
        run_ingest(spark, config)
    assert not (tmp_path / "out" / "images").exists()


def test_ingest_resizes_on_request_and_keeps_split_folders(spark, tmp_path):
    root = tmp_path / "split"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(draw("circle", 40, 30, rng)).save(root / split / name / f"{i}.bmp")
    gif = io.BytesIO()
    Image.fromarray(draw("square", 25, 25, rng)).convert("P").save(gif, "GIF")
    (root / "train" / "a" / "anim.gif").write_bytes(gif.getvalue())
    config = load_config(None, [
        f"output_root={tmp_path / 'out'}", "ingest.source=folder", f"ingest.folder={root}",
        f"ingest.splits={json.dumps(FRACTIONS)}", "ingest.resize=[16, 24]",
    ])
    summary = run_ingest(spark, config)
    assert summary["rows_per_split"] == {"train": 7, "validation": 4, "test": 2}
    rows = spark.read.parquet(config.ingest.output).collect()
    assert {(r.image.height, r.image.width, r.image.nChannels) for r in rows} == {(16, 24, 3)}
