"""DeepImageFeaturizer, DeepImagePredictor and register_keras_image_udf on real Spark + Keras.

Models run at small input sizes with a weights file saved from a randomly initialised model, so
the Spark output can be compared with a bare Keras ``predict`` of exactly the same network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MOBILENET_SIZE as SIZE
from conftest import make_digits
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.sql.types import BinaryType, IntegerType, StructField, StructType
from pyspark.testing import assertDataFrameEqual

from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct, decode_image, encode_png
from pipelines.imaging.resize import resize
from pipelines.ml.applications import MODELS
from pipelines.ml.featurizer import DeepImageFeaturizer
from pipelines.ml.inference import to_batch
from pipelines.ml.models import build_application, preprocess_fn
from pipelines.ml.predictor import DeepImagePredictor, register_keras_image_udf

TOL = 1e-4


@pytest.fixture(scope="module")
def digits_df(spark):
    """Six gray 28x28 digits as image structs and as PNG bytes, one partition."""
    images, labels = make_digits(6, seed=3)
    rows = [
        (i, int(labels[i]), array_to_struct(images[i], f"digit-{i}"), encode_png(images[i]))
        for i in range(len(images))
    ]
    schema = StructType([
        StructField("id", IntegerType()), StructField("label", IntegerType()),
        StructField("image", IMAGE_STRUCT), StructField("png", BinaryType()),
    ])
    return spark.createDataFrame(rows, schema).coalesce(1), images


def keras_features(model, name: str, rgb: list[np.ndarray], size: int) -> np.ndarray:
    """The reference: bare Keras predict on the same resized, preprocessed images."""
    batch = np.stack([resize(a, size, size).astype(np.float32) for a in rgb])
    return model.predict(preprocess_fn(name)(batch), verbose=0)


def vectors(rows, col: str) -> np.ndarray:
    return np.stack([r[col].toArray() for r in rows])


def test_featurizer_on_gray_structs_and_png_bytes_matches_bare_keras(
    spark, tmp_path, digits_df, mobilenet
):
    df, images = digits_df
    model, weights = mobilenet
    common = dict(modelName="MobileNetV2", inputSize=SIZE, weights=weights, batchSize=4)
    from_structs = DeepImageFeaturizer(inputCol="image", outputCol="f_struct", **common)
    # The bytes stage goes through save/load first: the loaded stage must behave the same.
    DeepImageFeaturizer(inputCol="png", outputCol="f_png", **common).save(str(tmp_path / "f"))
    from_bytes = DeepImageFeaturizer.load(str(tmp_path / "f"))
    rows = from_bytes.transform(from_structs.transform(df)).orderBy("id").collect()

    gray_as_rgb = [np.repeat(img[:, :, None], 3, axis=2) for img in images]
    expected = keras_features(model, "MobileNetV2", gray_as_rgb, SIZE)
    assert np.abs(expected).mean() > 0.01  # real features, not vanished activations
    assert vectors(rows, "f_struct").shape == (6, MODELS["MobileNetV2"].feature_dim)
    assert np.abs(vectors(rows, "f_struct") - expected).max() <= TOL
    assert np.abs(vectors(rows, "f_png") - expected).max() <= TOL


def test_featurizer_reads_bgr_structs_from_spark_image_source_as_rgb(spark, tmp_path, mobilenet):
    model, weights = mobilenet
    rng = np.random.default_rng(7)
    rgb = []
    for i in range(3):
        img = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
        img[:, :, i] = 255  # a dominant channel, so a channel swap changes the features
        rgb.append(img)
        (tmp_path / f"colour-{i}.png").write_bytes(encode_png(img))
    df = spark.read.format("image").load(str(tmp_path)).coalesce(1)
    assert df.first().image.nChannels == 3  # Spark's image source: BGR structs

    featurizer = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=SIZE, weights=weights)
    rows = featurizer.transform(df).orderBy("image.origin").collect()
    ordered = [decode_image((tmp_path / f"colour-{i}.png").read_bytes()) for i in range(3)]
    expected = keras_features(model, "MobileNetV2", ordered, SIZE)
    assert np.abs(vectors(rows, "features") - expected).max() <= TOL
    swapped = keras_features(model, "MobileNetV2", [a[:, :, ::-1] for a in ordered], SIZE)
    assert np.abs(vectors(rows, "features") - swapped).max() > 100 * TOL


def test_inceptionv3_gives_2048_features_at_its_minimum_size(spark, digits_df):
    df, _ = digits_df
    featurizer = DeepImageFeaturizer(modelName="InceptionV3", inputSize=75, weights="none")
    assert featurizer.featureDim() == 2048
    features = vectors(featurizer.transform(df.limit(2)).collect(), "features")
    assert features.shape == (2, 2048)
    assert np.isfinite(features).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_feature_dim_and_minimum_size_match_keras(name):
    spec = MODELS[name]
    assert build_application(name, spec.min_size, "none").output_shape == (None, spec.feature_dim)
    with pytest.raises(ValueError):
        build_application(name, spec.min_size - 1, "none")


def test_featurizer_save_load_keeps_uid_and_every_param(tmp_path, mobilenet):
    _, weights = mobilenet
    featurizer = DeepImageFeaturizer(
        inputCol="png", outputCol="vec", modelName="MobileNetV2", inputSize=SIZE,
        weights=weights, scaleHint="bicubic", batchSize=3, threads=1, handleInvalid="skip",
    )
    featurizer.save(str(tmp_path / "featurizer"))
    loaded = DeepImageFeaturizer.load(str(tmp_path / "featurizer"))
    assert loaded.uid == featurizer.uid
    params = {p.name: v for p, v in loaded.extractParamMap().items()}
    assert params == {p.name: v for p, v in featurizer.extractParamMap().items()}
    assert params["scaleHint"] == "bicubic" and params["threads"] == 1


def test_pipeline_with_logistic_regression_predicts_the_same_after_reload(
    spark, tmp_path, mobilenet
):
    _, weights = mobilenet
    images, labels = make_digits(20, seed=5)
    rows = [(i, int(labels[i] % 2), array_to_struct(images[i])) for i in range(20)]
    schema = StructType([
        StructField("id", IntegerType()), StructField("label", IntegerType()),
        StructField("image", IMAGE_STRUCT),
    ])
    df = spark.createDataFrame(rows, schema).coalesce(1)
    pipeline = Pipeline(stages=[
        DeepImageFeaturizer(modelName="MobileNetV2", inputSize=SIZE, weights=weights),
        LogisticRegression(maxIter=5),
    ])
    fitted = pipeline.fit(df)
    fitted.save(str(tmp_path / "pipeline"))
    reloaded = PipelineModel.load(str(tmp_path / "pipeline"))
    assert [s.uid for s in reloaded.stages] == [s.uid for s in fitted.stages]
    assert isinstance(reloaded.stages[0], DeepImageFeaturizer)
    cols = ["id", "prediction", "probability"]
    before = fitted.transform(df).select(cols)
    after = reloaded.transform(df).select(cols)
    assertDataFrameEqual(after, before, rtol=1e-6)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"modelName": "ResNet152"}, "modelName must be one of .* Received: modelName='ResNet152'"),
        ({"modelName": "InceptionV3", "inputSize": 64}, "Received: inputSize=64"),
        ({"batchSize": 0}, "Received: batchSize=0"),
        ({"threads": -1}, "Received: threads=-1"),
        ({"scaleHint": "cubic"}, "Received: scaleHint='cubic'"),
        ({"handleInvalid": "drop"}, "Received: handleInvalid='drop'"),
        ({"pooling": "sum"}, "Received: pooling='sum'"),
        ({"outputCol": "label"}, "already exists.*Received: outputCol='label'"),
        ({"weights": "/no/such/file.weights.h5"},
         "weights file for MobileNetV2 not found .* Received: weights='/no/such/file"),
        ({"inputCol": "picture"}, "Received: inputCol='picture'"),
    ],
)
def test_featurizer_rejects_bad_params_on_the_driver(spark, digits_df, params, match):
    df, _ = digits_df
    base = {"modelName": "MobileNetV2", "inputSize": SIZE, "weights": "none"}
    with pytest.raises(ValueError, match=match):
        DeepImageFeaturizer(**{**base, **params}).transform(df)


def test_featurizer_names_the_column_and_type_of_a_non_image_column(spark, digits_df):
    df, _ = digits_df
    featurizer = DeepImageFeaturizer(inputCol="label", modelName="MobileNetV2", inputSize=SIZE)
    with pytest.raises(TypeError, match="column 'label' .* Received: int"):
        featurizer.transform(df)


def test_mismatched_weights_file_error_names_the_file_and_the_model(spark, digits_df, mobilenet):
    df, _ = digits_df
    _, weights = mobilenet  # MobileNetV2 weights given to a VGG16
    featurizer = DeepImageFeaturizer(modelName="VGG16", inputSize=SIZE, weights=weights)
    with pytest.raises(Exception, match="mobilenet_v2_32.weights.h5.* does not match model VGG16"):
        featurizer.transform(df.limit(1)).collect()


@pytest.fixture(scope="module")
def broken_df(spark):
    """Two good PNGs, one null, one undecodable: in a binary column."""
    images, _ = make_digits(2, seed=9)
    rows = [(0, encode_png(images[0])), (1, None), (2, b"not an image"), (3, encode_png(images[1]))]
    schema = StructType([StructField("id", IntegerType()), StructField("png", BinaryType())])
    return spark.createDataFrame(rows, schema).coalesce(1)


def test_invalid_images_are_dropped_with_skip(spark, broken_df):
    featurizer = DeepImageFeaturizer(
        inputCol="png", modelName="MobileNetV2", inputSize=SIZE, weights="none",
        handleInvalid="skip",
    )
    rows = featurizer.transform(broken_df).collect()
    assert sorted(r.id for r in rows) == [0, 3]
    assert all(len(r.features) == 1280 for r in rows)


def test_invalid_images_get_null_features_with_keep(spark, broken_df):
    featurizer = DeepImageFeaturizer(
        inputCol="png", modelName="MobileNetV2", inputSize=SIZE, weights="none",
        handleInvalid="keep",
    )
    rows = featurizer.transform(broken_df).orderBy("id").collect()
    assert [r.id for r in rows] == [0, 1, 2, 3]
    assert [r.features is None for r in rows] == [False, True, True, False]
    assert len(rows[3].features) == 1280


def test_invalid_images_fail_clearly_with_error(spark, broken_df):
    featurizer = DeepImageFeaturizer(inputCol="png", modelName="MobileNetV2", inputSize=SIZE,
                                     weights="none")
    with pytest.raises(Exception, match="invalid image in column 'png'.*handleInvalid='error'"):
        featurizer.transform(broken_df).collect()


@pytest.fixture(scope="module")
def class_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("classes") / "imagenet_class_index.json"
    path.write_text(json.dumps({str(i): [f"n{i:08d}", f"class_{i}"] for i in range(1000)}))
    return str(path)


def test_predictor_returns_probabilities_by_default_or_sparkdl_decoded_classes(
    spark, tmp_path, digits_df, class_index
):
    df, _ = digits_df
    common = dict(modelName="MobileNetV2", inputSize=SIZE, weights="none", inputCol="image")
    full = DeepImagePredictor(outputCol="probs", **common)  # sparkdl: decodePredictions=False
    top = DeepImagePredictor(outputCol="top", decodePredictions=True, topK=3,
                             classIndexPath=class_index, **common)
    rows = top.transform(full.transform(df)).orderBy("id").collect()
    assert len(rows) == 6
    decoded = top.transform(df).schema["top"].dataType.elementType
    assert decoded.fieldNames() == ["class", "description", "probability"]
    for row in rows:
        probs = row.probs.toArray()
        assert probs.shape == (1000,) and abs(probs.sum() - 1) < 1e-3
        assert len(row.top) == 3
        best = np.argsort(-probs, kind="stable")[:3]
        assert [t["class"] for t in row.top] == [f"n{i:08d}" for i in best]
        assert [t.description for t in row.top] == [f"class_{i}" for i in best]
        np.testing.assert_allclose([t.probability for t in row.top], probs[best], rtol=1e-6)

    missing = DeepImagePredictor(decodePredictions=True, classIndexPath=str(tmp_path / "no.json"),
                                 **common)
    with pytest.raises(ValueError, match="imagenet_class_index.json.*Received: classIndexPath="):
        missing.transform(df)


def test_predictor_rejects_non_native_size_with_imagenet_weights(spark, digits_df):
    df, _ = digits_df
    with pytest.raises(ValueError, match="native input size 224. Received: inputSize=32"):
        DeepImagePredictor(modelName="MobileNetV2", inputSize=SIZE).transform(df)
    with pytest.raises(ValueError, match="Received: topK=0"):
        DeepImagePredictor(modelName="MobileNetV2", inputSize=SIZE, weights="none", topK=0)


def test_registered_sql_udf_runs_a_saved_keras_model(spark, tmp_path, digits_df):
    import keras

    df, images = digits_df
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    path = tmp_path / "digits.keras"
    model.save(str(path))
    register_keras_image_udf(spark, "digit_scores", str(path), batch_size=4)
    df.createOrReplaceTempView("digits")
    rows = spark.sql(
        "SELECT id, digit_scores(image) AS s, digit_scores(png) AS p, "
        "digit_scores(CAST(NULL AS BINARY)) AS n FROM digits ORDER BY id"
    ).collect()
    x, _ = to_batch([array_to_struct(i) for i in images], "struct", 28, 28, 1)
    expected = model.predict(x, verbose=0)
    assert np.abs(np.array([r.s for r in rows]) - expected).max() <= TOL
    assert np.abs(np.array([r.p for r in rows]) - expected).max() <= TOL
    assert all(r.n is None for r in rows)


def test_register_keras_image_udf_rejects_a_missing_model_file(spark, tmp_path):
    missing = "model file for SQL function 'nope' not found on the driver. Received: model="
    with pytest.raises(ValueError, match=missing):
        register_keras_image_udf(spark, "nope", str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="Received: scale_hint='huge'"):
        register_keras_image_udf(spark, "nope", "MobileNetV2", scale_hint="huge")
