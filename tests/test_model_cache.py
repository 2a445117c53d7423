"""The worker-side model cache: a model is built once per worker, whatever Params change.

Builds are counted on the real Python workers through the cache's build log
(``PIPELINES_MODEL_BUILD_LOG``, one JSON line per build), set in the environment the SparkContext
gives the UDFs created by these tests.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import keras
import numpy as np
import pytest
from conftest import make_digits
from pyspark.sql.types import IntegerType, StructField, StructType

from pipelines.imaging.image_struct import IMAGE_STRUCT, array_to_struct
from pipelines.ml import classifier as classifier_module
from pipelines.ml import model_cache
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.featurizer import DeepImageFeaturizer


@contextmanager
def build_log(spark, path):
    """UDFs created inside get ``PIPELINES_MODEL_BUILD_LOG=path`` (so fresh workers) on workers."""
    env = spark.sparkContext.environment
    env[model_cache.BUILD_LOG_ENV] = str(path)
    try:
        yield lambda: ([json.loads(line) for line in path.read_text().splitlines()]
                       if path.exists() else [])
    finally:
        env.pop(model_cache.BUILD_LOG_ENV, None)


@pytest.fixture(scope="module")
def images(spark):
    pixels, _ = make_digits(6, seed=11)
    schema = StructType([StructField("id", IntegerType()), StructField("image", IMAGE_STRUCT)])
    rows = [(i, array_to_struct(pixels[i])) for i in range(len(pixels))]
    return spark.createDataFrame(rows, schema).coalesce(1)  # one task: one worker


def test_cache_key_names_fields_in_a_stable_order():
    assert model_cache.model_key("file", digest="x", size=3) == model_cache.model_key(
        "file", size=3, digest="x")
    built = []
    key = model_cache.model_key("test", n=1)
    first = model_cache.get_or_build(key, lambda: built.append(1) or object())
    assert model_cache.get_or_build(key, lambda: built.append(1) or object()) is first
    assert built == [1]


def test_changing_batch_size_or_handle_invalid_does_not_rebuild_the_model(
    spark, tmp_path, images
):
    featurizer = DeepImageFeaturizer(modelName="MobileNetV2", inputSize=32, weights="none",
                                     batchSize=4)
    with build_log(spark, tmp_path / "builds.jsonl") as builds:
        first = featurizer.transform(images).orderBy("id").collect()
        assert len(builds()) == 1

        featurizer.setBatchSize(2).setHandleInvalid("skip")
        second = featurizer.transform(images).orderBy("id").collect()
        assert len(builds()) == 1  # same model, same worker: no rebuild
        np.testing.assert_allclose(
            [r.features.toArray() for r in second], [r.features.toArray() for r in first],
            rtol=1e-5, atol=1e-6)

        featurizer.setInputSize(40)  # another network: built once more
        featurizer.transform(images).collect()
        assert len(builds()) == 2
        assert "'size', 40" in builds()[1]["key"]


def test_classifier_reads_the_model_file_once_and_builds_it_once(
    spark, tmp_path, images, monkeypatch
):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    path = tmp_path / "cached.keras"
    model.save(str(path))
    staged = []
    real_ship = classifier_module.ship_file
    monkeypatch.setattr(classifier_module, "ship_file",
                        lambda spark, p, *args: staged.append(p) or real_ship(spark, p, *args))
    real_load = classifier_module.load_model_file
    loaded = []
    monkeypatch.setattr(classifier_module, "load_model_file",
                        lambda p, **kw: loaded.append(kw.get("shown")) or real_load(p, **kw))
    scorer = KerasImageClassifier(modelPath=str(path), batchSize=4)
    with build_log(spark, tmp_path / "builds.jsonl") as builds:
        scorer.transform(images).collect()
        scorer.setBatchSize(3).transform(images).collect()
        assert len(builds()) == 1
    assert staged == [str(path)] * 2  # asked twice, but read and hashed once (shipping)
    assert loaded == [str(path)]  # and loaded on the driver once

    keras.utils.set_random_seed(2)
    model.layers[-1].set_weights([w + 1 for w in model.layers[-1].get_weights()])
    model.save(str(path))  # a new version of the same path is read again
    scorer.transform(images).collect()
    assert loaded == [str(path), str(path)]
