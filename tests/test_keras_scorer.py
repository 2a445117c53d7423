"""KerasImageClassifier and the score job: outputs equal model.predict, clear errors, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEST_CONF, make_digits
from pyspark.ml.linalg import VectorUDT
from pyspark.sql import functions as F

from pipelines.config import load_config
from pipelines.imaging.image_struct import encode_png
from pipelines.io.image_parquet import write_image_parquet
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.stages.ingest import mnist_frame
from pipelines.stages.mnist import MnistArrays
from pipelines.stages.score import run_score


def _save(model, path) -> str:
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A small softmax CNN with seeded random weights, saved as .keras."""
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(4),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    return _save(model, tmp_path_factory.mktemp("model") / "model.keras")


@pytest.fixture(scope="module")
def digits():
    train_x, train_y = make_digits(20, seed=3)
    test_x, test_y = make_digits(30, seed=4)
    return MnistArrays(train_x, train_y, test_x, test_y)


@pytest.fixture(scope="module")
def images(spark, digits):
    return mnist_frame(spark, digits, validation_size=0).where("split = 'test'")


def _bare_predict(model_path, pixels):
    import keras

    model = keras.saving.load_model(model_path)
    return model.predict(pixels[..., None].astype("float32") / 255.0, verbose=0)


def _collect(df):
    rows = df.orderBy("id").collect()
    return (np.array([r.probability.toArray() for r in rows]),
            np.array([r.prediction for r in rows]))


def test_scores_image_structs_exactly_like_model_predict(images, digits, model_path):
    scorer = KerasImageClassifier(modelPath=model_path, batchSize=7)
    out = scorer.transform(images)

    assert isinstance(out.schema["probability"].dataType, VectorUDT)
    assert out.columns == [*images.columns, "probability", "prediction"]
    probs, preds = _collect(out)
    expected = _bare_predict(model_path, digits.test_images)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(preds, expected.argmax(axis=1))


def test_scores_encoded_png_bytes_and_nulls_undecodable_ones(spark, digits, model_path):
    rows = [(f"{i:02d}", encode_png(img)) for i, img in enumerate(digits.test_images[:6])]
    rows.append(("99", b"not an image"))
    df = spark.createDataFrame(rows, "id string, content binary")

    out = KerasImageClassifier(modelPath=model_path, inputCol="content",
                               handleInvalid="keep").transform(df)
    good = out.where("id != '99'")
    probs, preds = _collect(good)
    expected = _bare_predict(model_path, digits.test_images[:6])
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    bad = out.where("id = '99'").first()
    assert bad.probability is None and bad.prediction is None


def test_missing_and_corrupt_model_files_are_clear_errors(images, tmp_path):
    with pytest.raises(ValueError, match="not found on the driver. Received: modelPath=.*missing.keras"):
        KerasImageClassifier(modelPath=str(tmp_path / "missing.keras")).transform(images)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 this is not a Keras archive")
    with pytest.raises(ValueError, match="cannot load a Keras model.*Received: modelPath="):
        KerasImageClassifier(modelPath=str(corrupt)).transform(images)
    with pytest.raises(ValueError, match="Received: modelPath=''"):
        KerasImageClassifier().transform(images)


def test_a_model_whose_input_is_not_an_image_is_rejected(images, tmp_path):
    import keras

    flat = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    path = _save(flat, tmp_path / "flat.keras")
    with pytest.raises(ValueError, match=r"Received: input_shape=\(None, 784\)"):
        KerasImageClassifier(modelPath=path).transform(images)
    two = keras.Sequential([keras.Input((28, 28, 2)), keras.layers.Flatten(),
                            keras.layers.Dense(10)])
    path = _save(two, tmp_path / "two.keras")
    with pytest.raises(ValueError, match=r"Received: input_shape=\(None, 28, 28, 2\)"):
        KerasImageClassifier(modelPath=path).transform(images)


def test_wrong_column_type_or_missing_column_is_a_clear_error(images, model_path):
    with pytest.raises(TypeError, match="'label'.*Received: int"):
        KerasImageClassifier(modelPath=model_path, inputCol="label").transform(images)
    with pytest.raises(ValueError, match="'pixels'.*Received: inputCol='pixels'"):
        KerasImageClassifier(modelPath=model_path, inputCol="pixels").transform(images)
    with pytest.raises(ValueError, match="Received: batchSize=0"):
        KerasImageClassifier(modelPath=model_path, batchSize=0).transform(images)


def test_save_and_load_keep_uid_params_and_output(images, model_path, tmp_path):
    scorer = KerasImageClassifier(modelPath=model_path, probabilityCol="p", predictionCol="y",
                                  batchSize=5, scaleHint="nearest")
    scorer.save(str(tmp_path / "scorer"))
    loaded = KerasImageClassifier.load(str(tmp_path / "scorer"))

    assert loaded.uid == scorer.uid
    assert {p.name: v for p, v in loaded.extractParamMap().items()} == {
        p.name: v for p, v in scorer.extractParamMap().items()}
    first = scorer.transform(images).orderBy("id").select("p", "y").collect()
    again = loaded.transform(images).orderBy("id").select("p", "y").collect()
    assert first == again


def test_score_job_writes_predictions_and_metrics_for_parquet_and_png(
    spark, digits, model_path, tmp_path
):
    images = str(tmp_path / "images")
    write_image_parquet(spark, mnist_frame(spark, digits, validation_size=0), images, 2)
    common = [f"score.model={model_path}"]
    out = tmp_path / "scores"
    summary = run_score(spark, load_config(TEST_CONF, [*common, f"score.input={images}",
                                                       f"score.output={out}"]))
    assert summary["rows"] == 30 and summary["unscorable_rows"] == 0

    scored = spark.read.parquet(str(out))
    assert scored.columns == ["id", "label", "prediction", "probability"]
    assert scored.count() == 30
    expected = _bare_predict(model_path, digits.test_images).argmax(axis=1)
    preds = [r.prediction for r in scored.orderBy("id").collect()]
    np.testing.assert_array_equal(preds, expected)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(float((expected == digits.test_labels).mean()))

    folder = tmp_path / "png"
    for i, (img, label) in enumerate(zip(digits.test_images[:5], digits.test_labels[:5],
                                         strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i}.png").write_bytes(encode_png(img))
    out_png = tmp_path / "scores-png"
    run_score(spark, load_config(TEST_CONF, [*common, "score.input_format=png",
                                             f"score.input={folder}", f"score.output={out_png}"]))
    rows = spark.read.parquet(str(out_png)).orderBy(F.element_at(F.split("id", "/"), -1)).collect()
    assert [r.label for r in rows] == digits.test_labels[:5].tolist()
    assert [r.prediction for r in rows] == expected[:5].tolist()
