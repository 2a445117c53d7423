"""The stages and the SQL UDF on a Spark Connect session (run by tests/test_connect.py).

Not collected by the main run (the file name does not start with ``test_``): a classic
SparkSession and a Connect session cannot share one Python process, so
``tests/test_connect.py`` runs this file in a child pytest process, where the only session is
``SparkSession.builder.remote("local[2]")`` (a Connect server on a local master, started by
pyspark in this process's own JVM; the stages see only the Connect client).
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np
import pytest
from conftest import MOBILENET_SIZE, make_digits
from estimator_cluster_run import TINY
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.sql import SparkSession
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.featurizer import DeepImageFeaturizer
from pipelines.ml.inference import to_batch
from pipelines.ml.models import build_application, preprocess_fn
from pipelines.ml.predictor import DeepImagePredictor, register_keras_image_udf


@pytest.fixture(scope="module")
def connect(tmp_path_factory):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.remote("local[2]")
        .appName("pipelines-connect-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        .getOrCreate()
    )
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    assert isinstance(session, ConnectSession)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def digits(connect):
    pixels, labels = make_digits(12, seed=31)
    schema = StructType([StructField("id", IntegerType()), StructField("label", DoubleType()),
                         StructField("image", IMAGE_STRUCT)])
    rows = [(i, float(labels[i] % 2), array_to_struct(pixels[i])) for i in range(len(pixels))]
    return connect.createDataFrame(rows, schema).repartition(2), pixels


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    keras.utils.set_random_seed(9)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    path = tmp_path_factory.mktemp("model") / "digits.keras"
    model.save(str(path))
    return model, str(path)


def rgb_batch(pixels: np.ndarray, size: int) -> np.ndarray:
    x, _ = to_batch([array_to_struct(p) for p in pixels], "struct", size, size, 3)
    return x


def test_featurizer_with_a_weights_file_matches_bare_keras(digits, mobilenet):
    df, pixels = digits
    model, weights = mobilenet
    stage = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=MOBILENET_SIZE,
                                weights=weights, batchSize=4)
    rows = stage.transform(df).orderBy("id").collect()
    got = np.stack([r.features.toArray() for r in rows])
    expected = model.predict(preprocess_fn("MobileNetV2")(rgb_batch(pixels, MOBILENET_SIZE)),
                             verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_predictor_gives_the_probabilities_of_the_same_network(digits):
    df, pixels = digits
    stage = DeepImagePredictor(modelName="MobileNetV2", inputSize=MOBILENET_SIZE,
                               weights="none", batchSize=4)
    rows = stage.transform(df).orderBy("id").collect()
    got = np.stack([r.predictions.toArray() for r in rows])
    network = build_application("MobileNetV2", MOBILENET_SIZE, "none", include_top=True)
    full = network.predict(preprocess_fn("MobileNetV2")(rgb_batch(pixels, MOBILENET_SIZE)),
                           verbose=0)
    assert got.shape == (12, 1000)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-7)


def test_keras_image_classifier_equals_model_predict(digits, classifier_file):
    df, pixels = digits
    model, path = classifier_file
    rows = KerasImageClassifier(modelPath=path, batchSize=5).transform(df).orderBy("id").collect()
    got = np.stack([r.probability.toArray() for r in rows])
    expected = model.predict(pixels[..., None].astype(np.float32) / 255.0, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [r.prediction for r in rows] == expected.argmax(axis=1).astype(float).tolist()


def test_sql_udf_with_a_model_file(connect, digits, classifier_file):
    df, pixels = digits
    model, path = classifier_file
    register_keras_image_udf(connect, "connect_digits", path, batch_size=4)
    df.createOrReplaceTempView("connect_images")
    rows = connect.sql(
        "SELECT id, connect_digits(image) AS s FROM connect_images ORDER BY id").collect()
    expected = model.predict(pixels[..., None].astype(np.float32), verbose=0)
    np.testing.assert_allclose(np.array([r.s for r in rows]), expected, rtol=1e-5, atol=1e-6)


def test_pipeline_with_logistic_regression_fits_saves_and_loads(digits, mobilenet, tmp_path):
    df, _ = digits
    _, weights = mobilenet
    featurizer = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=MOBILENET_SIZE,
                                     weights=weights, batchSize=4, precision="auto")
    model = Pipeline(stages=[featurizer, LogisticRegression(labelCol="label", maxIter=5)]).fit(df)
    path = str(tmp_path / "pipeline")
    model.write().overwrite().save(path)
    loaded = PipelineModel.load(path)
    assert loaded.stages[0].getPrecision() == "auto"
    assert loaded.stages[0].getWeights() == weights
    before = model.transform(df).orderBy("id").select("id", "prediction").collect()
    after = loaded.transform(df).orderBy("id").select("id", "prediction").collect()
    assert before == after and len(after) == 12


#: The cluster tests' small CNN, with batches that fit 40 rows (seconds per epoch).
TINY_FAST = {**TINY, "batch_size": 8, "epochs": 1}


def test_estimator_trains_on_the_executors_ensembles_and_scores(connect, tmp_path):
    from pipelines.ml.estimator import KerasImageEstimator

    pixels, labels = make_digits(40, seed=5)
    schema = StructType([StructField("id", IntegerType()), StructField("label", IntegerType()),
                         StructField("image", IMAGE_STRUCT)])
    df = connect.createDataFrame(
        [(i, int(labels[i]), array_to_struct(pixels[i])) for i in range(40)], schema)
    base = {"architecture": TINY_FAST, "validationFraction": 0.2, "seed": 4,
            "modelDir": str(tmp_path), "timeoutSeconds": 60.0}
    ensemble = KerasImageEstimator(numWorkers=1, ensembleSize=2, **base).fit(df)
    members = ensemble.trainingSummary["members"]
    assert len(members) == 2 and members[0]["digest"] != members[1]["digest"]
    assert {m["rows"] for m in members} == {members[0]["rows"]} and members[0]["rows"] > 20
    scored = ensemble.transform(df).select("id", "prediction").collect()
    assert len(scored) == 40 and all(0 <= r.prediction <= 9 for r in scored)

    two = KerasImageEstimator(numWorkers=2, **base).fit(df)
    digests = two.trainingSummary["digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    path = str(tmp_path / "classifier")
    # Not .overwrite(): pyspark's DefaultParamsWriter calls the JVM for it (no Connect support);
    # a Pipeline's writer does not.
    two.write().save(path)
    loaded = KerasImageClassifier.load(path)
    before = two.transform(df).orderBy("id").select("probability").collect()
    after = loaded.transform(df).orderBy("id").select("probability").collect()
    assert before == after
