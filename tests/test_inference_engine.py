"""The inference engine: the precision Param, one trace per worker, one model build per worker.

bfloat16 runs for real here (this machine's CPU has AMX; elsewhere TensorFlow emulates it), so
the float32/bfloat16 comparisons check outputs that really differ in their rounding.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import keras
import numpy as np
import pytest
from conftest import MOBILENET_SIZE, make_digits
from pyspark.sql.types import IntegerType, StructField, StructType

from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct
from pipelines.ml import model_cache
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.featurizer import DeepImageFeaturizer
from pipelines.ml.keras_files import load_model_file
from pipelines.ml.models import predict_function, with_precision
from pipelines.ml.precision import resolve_precision
from pipelines.ml.predictor import DeepImagePredictor, register_keras_image_udf


@pytest.fixture(scope="module")
def images(spark):
    pixels, _ = make_digits(8, seed=21)
    schema = StructType([StructField("id", IntegerType()), StructField("image", IMAGE_STRUCT)])
    rows = [(i, array_to_struct(pixels[i])) for i in range(len(pixels))]
    return spark.createDataFrame(rows, schema).coalesce(1)


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    path = tmp_path_factory.mktemp("model") / "digits.keras"
    model.save(str(path))
    return model, str(path)


@contextmanager
def build_log(spark, path):
    """UDFs created inside log each worker model build to ``path`` (fresh workers: new env)."""
    env = spark.sparkContext.environment
    env[model_cache.BUILD_LOG_ENV] = str(path)
    try:
        yield lambda: ([json.loads(line) for line in path.read_text().splitlines()]
                       if path.exists() else [])
    finally:
        env.pop(model_cache.BUILD_LOG_ENV, None)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(("flags", "gpus", "expected", "why"), [
    ("fpu sse avx512f amx_tile amx_bf16", (), "bfloat16", "CPU reports amx_bf16"),
    ("fpu avx512f avx512_bf16", (), "bfloat16", "CPU reports avx512_bf16"),
    ("fpu sse avx2 avx512f", (), "float32", "none of amx_bf16, avx512_bf16 and no GPU"),
    ("fpu sse avx2", ("/physical_device:GPU:0",), "bfloat16", "GPU present"),
])
def test_auto_picks_bfloat16_only_on_amx_avx512_bf16_or_a_gpu(tmp_path, flags, gpus, expected,
                                                               why):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    precision, reason = resolve_precision("auto", gpus, str(cpuinfo))
    assert precision == expected and why in reason
    assert resolve_precision("float32", gpus, str(cpuinfo)) == ("float32", "requested")
    assert resolve_precision("auto", (), str(tmp_path / "missing"))[0] == "float32"


def test_precision_is_checked_when_set_on_every_stage_and_the_sql_udf(spark):
    for make in (lambda: DeepImageFeaturizer(precision="float16"),
                 lambda: DeepImagePredictor(precision="float16"),
                 lambda: KerasImageClassifier(precision="float16"),
                 lambda: DeepImageFeaturizer().setPrecision("float16")):
        with pytest.raises(ValueError, match=r"Received: precision='float16'"):
            make()
    with pytest.raises(ValueError, match=r"Received: precision='half'"):
        register_keras_image_udf(spark, "nope", "MobileNetV2", precision="half")


def test_bfloat16_features_are_float32_and_close_to_float32_and_the_log_says_so(
    spark, images, mobilenet, caplog, tmp_path
):
    _, weights = mobilenet
    stage = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=MOBILENET_SIZE,
                                weights=weights, batchSize=4)
    f32 = np.stack([r.features.toArray() for r in stage.transform(images).orderBy("id").collect()])
    stage.setPrecision("bfloat16")
    with caplog.at_level(logging.INFO, logger="pipelines.ml.precision"):
        rows = stage.transform(images).orderBy("id").collect()
    bf16 = np.stack([r.features.toArray() for r in rows])
    assert "MobileNetV2 features: precision bfloat16" in caplog.text
    assert cosine(f32, bf16).min() >= 0.99
    assert np.abs(f32 - bf16).max() > 0  # bfloat16 really ran: its rounding shows

    stage.setPrecision("auto")
    stage.write().overwrite().save(str(tmp_path / "featurizer"))
    loaded = DeepImageFeaturizer.load(str(tmp_path / "featurizer"))
    assert loaded.getPrecision() == "auto" and loaded.uid == stage.uid


def test_classifier_and_sql_udf_in_bfloat16_score_like_float32(
    spark, images, classifier_file
):
    model, path = classifier_file
    scorer = KerasImageClassifier(modelPath=path, batchSize=4)
    f32 = scorer.transform(images).orderBy("id").collect()
    bf16 = scorer.setPrecision("bfloat16").transform(images).orderBy("id").collect()
    p32 = np.stack([r.probability.toArray() for r in f32])
    p16 = np.stack([r.probability.toArray() for r in bf16])
    np.testing.assert_allclose(p16, p32, atol=2e-2)
    assert not np.array_equal(p16, p32)
    np.testing.assert_allclose(p16.sum(axis=1), 1.0, atol=1e-5)  # float32 softmax layer

    register_keras_image_udf(spark, "digits_bf16", path, batch_size=4, precision="bfloat16",
                             preprocessor=lambda x: x / 255.0)  # as the classifier's scale
    images.createOrReplaceTempView("engine_digits")
    rows = spark.sql("SELECT id, digits_bf16(image) AS s FROM engine_digits ORDER BY id").collect()
    udf16 = np.array([r.s for r in rows])
    np.testing.assert_allclose(udf16, p32, atol=2e-2)
    assert not np.array_equal(udf16, p32)


def test_loaded_model_in_bfloat16_keeps_input_and_output_layers_float32(classifier_file):
    model, path = classifier_file
    clone = with_precision(load_model_file(path), "bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in clone.layers}
    assert policies[clone.layers[-1].name] == "float32"
    assert [p for name, p in policies.items() if name != clone.layers[-1].name] == [
        "mixed_bfloat16", "mixed_bfloat16"]
    x = np.random.default_rng(0).uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(predict_function(clone)(x), model.predict(x, verbose=0), atol=2e-2)


def test_forward_pass_is_traced_once_whatever_the_batch_sizes(classifier_file):
    model, _ = classifier_file
    forward = predict_function(model)
    x = np.random.default_rng(1).uniform(0, 1, (7, 28, 28, 1)).astype(np.float32)
    outputs = [forward(x[:n]) for n in (4, 3, 1, 7)]  # a worker's full and partial batches
    assert forward.traces() == 1
    assert all(o.dtype == np.float32 for o in outputs)
    np.testing.assert_allclose(outputs[-1], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_each_python_worker_builds_the_model_once_not_once_per_task(
    spark, images, tmp_path, mobilenet
):
    _, weights = mobilenet
    many_tasks = images.repartition(6, "id")  # 6 tasks on local[2]: 2 workers, reused
    stage = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=MOBILENET_SIZE,
                                weights=weights, batchSize=2, precision="auto")
    with build_log(spark, tmp_path / "builds.jsonl") as builds:
        # collect the features: a count alone would let Spark prune the model column away
        assert len(stage.transform(many_tasks).select("features").collect()) == 8
        first = builds()
        assert 1 <= len(first) <= 2
        assert len({b["pid"] for b in first}) == len(first)
        stage.setBatchSize(3).transform(many_tasks).select("features").collect()
        assert builds() == first  # same workers, same model: nothing built again
