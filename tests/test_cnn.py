"""The train_cnn job: Parquet -> tf.data, training on the driver, resume, outputs, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_CONF, make_digits
from tensorboard_events import scalars

from pipelines.config import Config, ConfigError, load_config
from pipelines.faults import ENV_DIR, ENV_POINTS, InjectedFault
from pipelines.io.image_parquet import write_image_parquet
from pipelines.ml.architectures import ElasticDistortion, resolve_architecture
from pipelines.ml.datasets import elastic_distort, make_dataset, open_split
from pipelines.ml.models import build_architecture, compile_model
from pipelines.stages.ingest import mnist_frame
from pipelines.stages.mnist import MnistArrays
from pipelines.stages.train_cnn import OUTPUT_FILES, run_train_cnn
from pipelines.stages.train_cnn import train_cnn as train

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


@pytest.fixture(scope="module")
def digits():
    """Digits 0-9 drawn as distinct bright blocks plus noise: learnable in a few steps."""
    def draw(n, seed):
        images, labels = make_digits(n, seed=seed)
        images = (images // 4).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + row * 10:12 + row * 10, 1 + col * 5:5 + col * 5] = 255
        return images, labels

    train_x, train_y = draw(160, 1)
    test_x, test_y = draw(40, 2)
    return MnistArrays(train_x, train_y, test_x, test_y)


@pytest.fixture(scope="module")
def image_parquet(spark, digits, tmp_path_factory) -> str:
    """Image Parquet written by the ingest code: 120 train, 40 validation, 40 test rows."""
    out = str(tmp_path_factory.mktemp("cnn") / "images")
    frame = mnist_frame(spark, digits, validation_size=40)
    write_image_parquet(spark, frame, out, 3)
    return out


def _config(root: Path, images: str, *extra: str) -> Config:
    # Stage functions are called with the session fixture (a job's run_job would stop it).
    return load_config(TEST_CONF, [
        f"output_root={root}",
        f"cnn.inputs=[{images}]",
        "cnn.architecture=tiny",
        f"cnn.architectures={{tiny: {json.dumps(TINY)}}}",
        *extra,
    ])


def test_train_job_trains_one_epoch_and_publishes_model_and_reports(
    spark, image_parquet, digits, tmp_path
):
    summary = run_train_cnn(spark, _config(tmp_path, image_parquet, "cnn.tensorboard=true"))
    assert summary["model"] == f"{tmp_path}/cnn/model.keras"

    out = tmp_path / "cnn"
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == {"train": 120, "validation": 40, "test": 40}
    assert metrics["epochs_run"] == 1 and metrics["resumed_from_epoch"] is None
    assert metrics["input"] == "in_memory"  # 200 tiny images fit cnn.in_memory_mb
    assert [c["support"] for c in metrics["test"]["per_class"]] == [4] * 10
    assert "Total params" in (out / "summary.txt").read_text()
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The published model reproduces the reported test top-1 on the raw test images.
    top1 = _published_top1(out, digits)
    assert metrics["test"]["top1"] == pytest.approx(top1)
    assert np.trace(np.array(metrics["test"]["confusion_matrix"])) == round(top1 * 40)


@pytest.mark.parametrize("in_memory", [False, True])
def test_input_pipeline_yields_the_stored_images_scaled_with_one_hot_labels(
    image_parquet, digits, in_memory
):
    source = open_split([image_parquet], "validation", (28, 28, 1))
    dataset = make_dataset(source, batch_size=16, num_classes=10, read_rows=7,
                           in_memory=in_memory)
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])

    assert [len(x) for x, _ in batches] == [16, 16, 8] and images.shape == (40, 28, 28, 1)
    np.testing.assert_array_equal(images[..., 0], digits.train_images[:40] / np.float32(255))
    np.testing.assert_array_equal(labels.argmax(axis=1), digits.train_labels[:40])
    assert labels.sum() == 40


@pytest.mark.parametrize("in_memory", [False, True])
def test_shuffled_pipeline_is_a_permutation_reproducible_from_the_seed(image_parquet, in_memory):
    source = open_split([image_parquet], "train", (28, 28, 1))

    def epochs(seed):
        dataset = make_dataset(source, 32, 10, read_rows=10, shuffle_buffer=50, seed=seed,
                               in_memory=in_memory)
        return [np.concatenate([y.numpy().argmax(axis=1) for _, y in dataset])
                for _ in range(2)]

    (first, second), (again, _), (other, _) = epochs(3), epochs(3), epochs(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other) and not np.array_equal(first, second)
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(np.arange(120) % 10)


def test_in_memory_split_holds_every_stored_row_once(image_parquet, digits):
    source = open_split([image_parquet], "train", (28, 28, 1))
    images, labels = source.load(rows=7)
    assert images.shape == (120, 28, 28, 1) and images.dtype == np.uint8
    assert source.nbytes() == images.nbytes
    # The ingest job put rows 40..159 of the train digits in the train split, in some order.
    stored = {(int(y), x.tobytes()) for x, y in zip(images[..., 0], labels, strict=True)}
    expected = {(int(y), x.tobytes()) for x, y in zip(
        digits.train_images[40:], digits.train_labels[40:], strict=True)}
    assert stored == expected


def test_random_shift_moves_each_image_by_whole_pixels_within_the_limit():
    from pipelines.ml.datasets import random_shift

    images = np.zeros((200, 9, 9, 1), np.uint8)
    images[:, 4, 4] = 255  # one bright pixel in the centre
    moved = random_shift(images, 2, np.random.default_rng(0))
    assert moved.shape == images.shape and moved.dtype == np.uint8
    rows, cols = np.nonzero(moved[..., 0])[1:]
    assert (moved.reshape(200, -1) > 0).sum(axis=1).tolist() == [1] * 200  # moved, not blurred
    offsets = set(zip((rows - 4).tolist(), (cols - 4).tolist(), strict=True))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    again = random_shift(images, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(moved, again)
    assert random_shift(images, 0, np.random.default_rng(0)) is images

    edge = np.full((50, 4, 4, 1), 7, np.uint8)  # pixels moved in from outside are 0
    shifted = random_shift(edge, 1, np.random.default_rng(1))
    assert set(np.unique(shifted).tolist()) == {0, 7}


def test_interrupted_training_resumes_from_the_saved_epoch(
    spark, image_parquet, tmp_path, monkeypatch
):
    monkeypatch.setenv(ENV_POINTS, "cnn.epoch=raise")
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "failpoints"))
    config = _config(tmp_path, image_parquet, "cnn.epochs=3", "cnn.in_memory_mb=0")

    with pytest.raises(InjectedFault):  # fails at the end of epoch 1
        run_train_cnn(spark, config)
    assert not (tmp_path / "cnn").exists()  # nothing half-published
    run_train_cnn(spark, config)  # the failpoint fired once; the rerun resumes

    metrics = json.loads((tmp_path / "cnn" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1
    assert metrics["epochs_run"] == 3
    assert metrics["input"] == "streamed"  # cnn.in_memory_mb=0: read from Parquet each epoch
    with (tmp_path / "cnn" / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1, 2]


def test_seed_architecture_is_the_notebook_model():
    import keras

    spec = resolve_architecture("seed")
    model = build_architecture(spec, 10)
    layers = [(type(x).__name__, getattr(x, "units", None) or getattr(x, "filters", None))
              for x in model.layers]
    assert layers == [("Conv2D", 32), ("Flatten", None), ("Dense", 128), ("Dense", 10)]
    assert model.layers[0].kernel_size == (3, 3)
    assert model.layers[-1].activation is keras.activations.sigmoid
    assert model.input_shape == (None, 28, 28, 1)
    assert (spec.loss, spec.optimizer, spec.batch_size, spec.epochs) == (
        "binary_crossentropy", "adam", 512, 5)


def test_vgg_members_differ_in_their_augmentation_and_dropout_seeds_by_run_seed():
    import keras

    def random_states(seed):
        keras.utils.set_random_seed(seed)
        model = build_architecture(resolve_architecture("vgg"), 10)
        assert model.count_params() == 198_442
        return [getattr(layer, name).state.numpy().tolist() for layer in model.layers
                for name in ("generator", "seed_generator") if hasattr(layer, name)]

    first = random_states(0)
    assert len(first) == 3  # RandomRotation, RandomZoom, Dropout
    assert random_states(0) == first  # reproducible from the run's seed
    assert random_states(1) != first  # so ensemble members (seeds 0, 1, ...) differ


def test_a_job_output_folder_given_for_its_parquet_is_named_with_the_right_path(
    image_parquet, tmp_path
):
    import shutil

    out = tmp_path / "augmented"  # as the augment job writes it
    shutil.copytree(image_parquet, out / "parquet")
    (out / "report.json").write_text("{}\n")
    with pytest.raises(ValueError, match=r"'.*/augmented/report.json' is not a Parquet file; "
                                         r"its image Parquet is in '.*/augmented/parquet'"):
        open_split([str(out)], "train", (28, 28, 1))
    # Parquet files need no suffix: one renamed is read like the others.
    part = next((out / "parquet").rglob("*.parquet"))
    part.rename(part.with_suffix(""))
    split = open_split([str(out / "parquet")], "train", (28, 28, 1))
    assert split.count() == open_split([image_parquet], "train", (28, 28, 1)).count() == 120


def test_unknown_architecture_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match="Received: architecture='resnet9000'"):
        load_config(TEST_CONF, ["cnn.architecture=resnet9000"])


def test_an_architecture_can_start_from_a_built_in_and_change_some_keys():
    smoothing = "{class_name: CategoricalCrossentropy, config: {label_smoothing: 0.1}}"
    cfg = load_config(TEST_CONF, ["cnn.architecture=default_ls",
                                  f"cnn.architectures.default_ls={{base: default, loss: {smoothing}}}"]).cnn
    spec = resolve_architecture(cfg.architecture, cfg.architectures)
    default = resolve_architecture("default")
    assert spec.model_dump(exclude={"loss", "description"}) == default.model_dump(
        exclude={"loss", "description"})
    assert spec.description == "the built-in 'default', loss changed"
    model = build_architecture(spec, 10)
    compile_model(model, spec, steps_per_epoch=4, epochs=1)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    # A CE over ten classes smoothed by 0.1 cannot fall to zero, even for a perfect prediction.
    labels = np.eye(10, dtype=np.float32)[:2]
    assert float(model.loss(labels, labels)) > 0.1


def test_an_unknown_base_architecture_is_named():
    with pytest.raises(ConfigError, match=r"one of \['default', 'seed', 'vgg'\]. "
                                          r"Received: base='resnet'"):
        load_config(TEST_CONF, ["cnn.architectures.mine={base: resnet, epochs: 3}"])


def test_unknown_layer_in_an_architecture_is_named(tmp_path):
    bad = {**TINY, "layers": [{"Conv9D": {"filters": 2}}, *TINY["layers"]]}
    cfg = load_config(TEST_CONF, ["cnn.architecture=bad",
                                  f"cnn.architectures={{bad: {json.dumps(bad)}}}"]).cnn
    with pytest.raises(ValueError, match=r"layers\[0\].*Received: \{'Conv9D'"):
        build_architecture(resolve_architecture(cfg.architecture, cfg.architectures), 10)


@pytest.mark.parametrize("in_memory", [False, True])
def test_images_of_another_size_and_channels_are_fitted_to_the_model_input(
    image_parquet, digits, in_memory
):
    from PIL import Image

    source = open_split([image_parquet], "validation", (32, 30, 3), "bicubic")
    dataset = make_dataset(source, batch_size=16, num_classes=10, read_rows=7,
                           in_memory=in_memory)
    images = np.concatenate([x.numpy() for x, _ in dataset])
    assert images.shape == (40, 32, 30, 3)
    for i in (0, 17, 39):
        resized = np.asarray(Image.fromarray(digits.train_images[i]).resize(
            (30, 32), Image.Resampling.BICUBIC))
        for channel in range(3):  # gray replicated to RGB after resizing
            np.testing.assert_array_equal(images[i, ..., channel], resized / np.float32(255))
    with pytest.raises(ValueError, match="resize method must be one of.*Received: 'cubic'"):
        open_split([image_parquet], "validation", (32, 30, 3), "cubic")


def test_input_shape_and_classes_come_from_config_and_data(spark, image_parquet, tmp_path):
    summary = run_train_cnn(spark, _config(tmp_path, image_parquet, "cnn.input_shape=[20, 24, 3]",
                                           "cnn.tensorboard=false"))
    assert summary["input_shape"] == [20, 24, 3] and summary["num_classes"] == 10
    assert summary["class_names"] == [str(i) for i in range(10)]
    import keras

    model = keras.saving.load_model(tmp_path / "cnn" / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 20, 24, 3) and model.output_shape == (None, 10)


def test_labels_beyond_num_classes_and_missing_inputs_are_rejected(image_parquet, tmp_path):
    base = [f"output_root={tmp_path}", "cnn.architecture=tiny",
            f"cnn.architectures={{tiny: {json.dumps(TINY)}}}"]
    few = load_config(TEST_CONF, [*base, f"cnn.inputs=[{image_parquet}]", "cnn.num_classes=5"])
    with pytest.raises(ValueError, match="num_classes=5.*Received label counts"):
        train(few.cnn)
    missing = load_config(TEST_CONF, [*base, f"cnn.inputs=[{tmp_path / 'nope'}]"])
    with pytest.raises(FileNotFoundError, match="nope"):
        train(missing.cnn)


def test_train_job_exits_2_on_a_bad_config_before_spark_starts():
    from jobs import train_cnn

    assert train_cnn.main(["--config", str(TEST_CONF), "--set", "cnn.epochs=0"]) == 2


def test_model_batches_cut_every_row_once_and_shuffle_reproducibly():
    from pipelines.ml.datasets import model_batches

    def record_batches():
        for start in range(0, 1000, 300):  # record batches of 300, 300, 300, 100 rows
            ids = np.arange(start, min(start + 300, 1000))
            yield ids[:, None, None, None].astype(np.uint8), ids.astype(np.int32)

    plain = list(model_batches(record_batches(), 128))
    assert [len(y) for _, y in plain] == [128] * 7 + [104]
    assert np.concatenate([y for _, y in plain]).tolist() == list(range(1000))
    shuffled = list(model_batches(record_batches(), 128, shuffle_buffer=500, seed=3))
    rows = np.concatenate([y for _, y in shuffled])
    assert sorted(rows.tolist()) == list(range(1000)) and rows.tolist() != list(range(1000))
    assert [len(y) for _, y in shuffled][:-1] == [128] * 7
    again = np.concatenate([y for _, y in model_batches(record_batches(), 128, 500, seed=3)])
    assert again.tolist() == rows.tolist()
    for x, y in shuffled:
        assert (x[:, 0, 0, 0] == y.astype(np.uint8)).all()  # images stay with their labels


def test_training_pipeline_shifts_images_fresh_each_epoch_and_keeps_labels(image_parquet):
    source = open_split([image_parquet], "validation", (28, 28, 1))
    stored, stored_labels = source.load(rows=64)
    dataset = make_dataset(source, 16, 10, read_rows=64, shift_pixels=2, in_memory=True)
    epochs = [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(2)]
    for epoch in epochs:
        images = np.concatenate([x for x, _ in epoch])[..., 0]
        labels = np.concatenate([y for _, y in epoch]).argmax(axis=1)
        np.testing.assert_array_equal(labels, stored_labels)  # no shuffle: stored order
        assert not np.array_equal(images, stored[..., 0] / np.float32(255))
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_elastic_distortion_bends_each_image_fresh_each_epoch_reproducibly(image_parquet,
                                                                          in_memory):
    source = open_split([image_parquet], "validation", (28, 28, 1))
    stored, stored_labels = source.load(rows=64)
    elastic = ElasticDistortion(alpha=34, sigma=4)

    def epochs(seed):
        dataset = make_dataset(source, 16, 10, read_rows=64, seed=seed, in_memory=in_memory,
                               elastic=elastic)
        return [(np.concatenate([x.numpy() for x, _ in dataset])[..., 0],
                 np.concatenate([y.numpy() for _, y in dataset]).argmax(axis=1))
                for _ in range(2)]

    first, second = epochs(seed=5)
    original = stored[..., 0] / np.float32(255)
    for images, labels in (first, second):
        np.testing.assert_array_equal(labels, stored_labels)  # no shuffle: stored order
        changed = np.abs(images - original).max(axis=(1, 2))
        assert (changed > 0.2).mean() > 0.9  # (nearly) every image is warped
        # Bent, not erased or smeared: each image keeps its ink within 30 % (interpolation
        # smooths these digits' pixel noise, so not exactly).
        ink = images.sum(axis=(1, 2)) / original.sum(axis=(1, 2))
        assert 0.7 < ink.min() and ink.max() < 1.3
    assert not np.array_equal(first[0], second[0])  # a fresh field each epoch
    np.testing.assert_array_equal(epochs(seed=5)[0][0], first[0])  # reproducible


def test_a_vanishing_elastic_field_leaves_images_as_they_are(image_parquet):
    import tensorflow as tf

    stored, _ = open_split([image_parquet], "validation", (28, 28, 1)).load(rows=64)
    key = tf.constant([1, 2], tf.int64)
    still = elastic_distort(tf.constant(stored), key, ElasticDistortion(alpha=1e-6, sigma=4))
    np.testing.assert_array_equal(still.numpy(), stored)  # no offset, no transposition
    moved = elastic_distort(tf.constant(stored), key, ElasticDistortion(alpha=34, sigma=4))
    assert moved.dtype == tf.uint8 and moved.shape == stored.shape


def test_an_elastic_probability_warps_that_share_of_images_and_leaves_the_rest(image_parquet):
    import tensorflow as tf

    stored, _ = open_split([image_parquet], "validation", (28, 28, 1)).load(rows=64)
    half = ElasticDistortion(alpha=34, sigma=4, probability=0.5)

    def warped(key):
        out = elastic_distort(tf.constant(stored), tf.constant(key, tf.int64), half).numpy()
        return (out != stored).any(axis=(1, 2, 3))

    first, second = warped([1, 2]), warped([3, 4])
    assert 16 <= first.sum() <= 48 and 16 <= second.sum() <= 48  # about half of 64
    assert (first != second).any()  # another batch key, other images chosen
    np.testing.assert_array_equal(warped([1, 2]), first)  # reproducible from the key


def test_negative_memory_budget_or_shift_is_rejected_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"cnn\.in_memory_mb.*Received: cnn.in_memory_mb=-1"):
        load_config(TEST_CONF, ["cnn.in_memory_mb=-1"])
    bad = {**TINY, "shift_pixels": -2}
    with pytest.raises(ConfigError, match=r"shift_pixels.*Received"):
        load_config(TEST_CONF, ["cnn.architecture=bad",
                                f"cnn.architectures={{bad: {json.dumps(bad)}}}"])
    bad = {**TINY, "elastic_distortion": {"alpha": 0, "sigma": 4}}
    with pytest.raises(ConfigError, match=r"elastic_distortion\.alpha.*Received"):
        load_config(TEST_CONF, ["cnn.architecture=bad",
                                f"cnn.architectures={{bad: {json.dumps(bad)}}}"])
    bad = {**TINY, "elastic_distortion": {"alpha": 17, "sigma": 4, "probability": 1.5}}
    with pytest.raises(ConfigError, match=r"elastic_distortion\.probability.*Received"):
        load_config(TEST_CONF, ["cnn.architecture=bad",
                                f"cnn.architectures={{bad: {json.dumps(bad)}}}"])


def test_train_job_on_two_executor_tasks_publishes_the_same_outputs(
    spark, image_parquet, digits, tmp_path
):
    run_train_cnn(spark, _config(tmp_path, image_parquet, "cnn.num_workers=2", "cnn.epochs=2",
                                 "cnn.tensorboard=true"))

    out = tmp_path / "cnn"
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    # TensorBoard logs from the history the chief sent back, laid out as Keras' callback does.
    with (out / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert scalars(out / "tensorboard" / "validation") == {
        "epoch_loss": [pytest.approx(float(r["val_loss"])) for r in rows],
        "epoch_top1": [pytest.approx(float(r["val_top1"])) for r in rows]}
    assert scalars(out / "tensorboard" / "train")["epoch_loss"] == [
        pytest.approx(float(r["loss"])) for r in rows]
    assert metrics["input"] == "executors" and metrics["num_workers"] == 2
    first, second = metrics["worker_digests"]
    assert first == second  # both workers ended with the same weights
    assert metrics["epochs_run"] == 2 and set(metrics["validation"]) == {"val_loss", "val_top1"}
    with (out / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    top1 = _published_top1(out, digits)
    assert metrics["test"]["top1"] == pytest.approx(top1)


def _published_top1(out: Path, digits: MnistArrays) -> float:
    """Top-1 of the published ``model.keras`` on the raw test images."""
    import keras

    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    probs = model.predict(digits.test_images[..., None].astype("float32") / 255.0, verbose=0)
    return float((probs.argmax(axis=1) == digits.test_labels).mean())


def test_train_job_ensemble_publishes_the_averaged_model_and_one_tensorboard_run_per_member(
    spark, image_parquet, digits, tmp_path
):
    shared = tmp_path / "shared"  # a folder the executors share: logs are written live there
    run_train_cnn(spark, _config(tmp_path, image_parquet, "cnn.ensemble=2", "cnn.num_workers=1",
                                 "cnn.epochs=2", "cnn.tensorboard=true",
                                 f"cnn.executor_checkpoint_dir={shared}"))

    out = tmp_path / "cnn"
    assert not list(shared.glob("tensorboard-*"))  # copied to the output, then removed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"] == 2 and [m["seed"] for m in metrics["members"]] == [0, 1]
    members = [scalars(out / "tensorboard" / f"member-{i}" / "validation")
               for i in (0, 1)]
    assert members[0]["epoch_loss"] != members[1]["epoch_loss"]  # different seeds
    # history.csv is the members' per-epoch mean; each member's run holds its own values.
    with (out / "history.csv").open() as fh:
        mean = [float(r["val_loss"]) for r in csv.DictReader(fh)]
    assert mean == pytest.approx([(a + b) / 2 for a, b in zip(
        members[0]["epoch_loss"], members[1]["epoch_loss"], strict=True)])
    assert metrics["test"]["top1"] == pytest.approx(_published_top1(out, digits))
