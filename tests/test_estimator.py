"""KerasImageEstimator in the test session (local[2]): driver training, ensembles, Params.

Multi-worker training, tuning across executors and a killed worker run on a local-cluster in
tests/test_estimator_cluster.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from estimator_cluster_run import TINY, blocks
from pyspark.sql import functions as F

from pipelines.ml import KerasImageClassifier, KerasImageEstimator
from pipelines.stages.ingest import mnist_frame
from pipelines.stages.mnist import MnistArrays


@pytest.fixture(scope="module")
def frames(spark):
    train_x, train_y = blocks(300, 1)
    test_x, test_y = blocks(100, 2)
    frame = mnist_frame(spark, MnistArrays(train_x, train_y, test_x, test_y), 60)
    labelled = frame.where("split != 'test'").withColumn(
        "is_validation", F.col("split") == "validation").cache()
    return labelled, frame.where("split = 'test'").cache(), test_x, test_y


def _estimator(tmp_path, **params):
    base = {"architecture": TINY, "validationIndicatorCol": "is_validation", "seed": 3,
            "modelDir": str(tmp_path / "models")}
    return KerasImageEstimator(**{**base, **params})


def _top1(model, test):
    rows = model.transform(test).select("label", "prediction").collect()
    return float(np.mean([r.label == r.prediction for r in rows]))


def test_driver_fit_learns_and_its_classifier_saves_loads_and_scores(frames, tmp_path):
    labelled, test, _, _ = frames
    model = _estimator(tmp_path).fit(labelled)

    assert isinstance(model, KerasImageClassifier)
    summary = model.trainingSummary
    assert summary["workers"] == 0 and summary["rows"] == 240
    assert len(summary["history"]["val_loss"]) == 2 and summary["best_epoch"] in (1, 2)
    assert summary["plan"]["num_classes"] == 10  # from the labels
    assert _top1(model, test) >= 0.9

    model.write().overwrite().save(str(tmp_path / "classifier"))
    loaded = KerasImageClassifier.load(str(tmp_path / "classifier"))
    assert loaded.uid == model.uid and loaded.extractParamMap() == model.extractParamMap()
    first = model.transform(test).orderBy("id").select("probability").collect()
    again = loaded.transform(test).orderBy("id").select("probability").collect()
    assert first == again


def test_training_continues_from_a_keras_file(frames, tmp_path):
    import keras

    labelled, test, test_x, test_y = frames
    first = _estimator(tmp_path, epochs=1).fit(labelled)
    more = _estimator(tmp_path, architecture=first.getModelPath(), epochs=1,
                      learningRate=0.003).fit(labelled)
    before = keras.saving.load_model(first.getModelPath(), compile=False).get_weights()
    after = keras.saving.load_model(more.getModelPath(), compile=False).get_weights()
    assert [w.shape for w in before] == [w.shape for w in after]  # same network, trained on
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert more.trainingSummary["plan"]["spec"]["learning_rate"] == 0.003


def test_ensemble_members_train_as_tasks_and_one_model_averages_them(frames, tmp_path):
    import keras

    labelled, test, test_x, _ = frames
    model = _estimator(tmp_path, ensembleSize=2, numWorkers=1).fit(labelled)
    summary = model.trainingSummary
    assert [m["workers"] for m in summary["members"]] == [1, 1]
    first, second = summary["members"]
    assert first["pid"] != second["pid"]  # one task and one training process each
    assert first["started"] < second["ended"] and second["started"] < first["ended"]

    images = test_x[..., None].astype("float32") / 255
    members = [keras.saving.load_model(p, safe_mode=True, compile=False)(images).numpy()
               for p in summary["member_models"]]
    assert not np.allclose(members[0], members[1])  # seeds 3 and 4 train different models
    ensemble = keras.saving.load_model(model.getModelPath(), safe_mode=True, compile=False)
    np.testing.assert_allclose(ensemble(images).numpy(), (members[0] + members[1]) / 2,
                               rtol=1e-5, atol=1e-6)
    scored = model.transform(test).orderBy("id").select("probability").collect()
    np.testing.assert_allclose(np.array([r.probability.toArray() for r in scored]),
                               (members[0] + members[1]) / 2, rtol=1e-4, atol=1e-5)


def test_estimator_params_round_trip_through_save_and_load(tmp_path):
    estimator = _estimator(tmp_path, numWorkers=2, ensembleSize=3, learningRate=0.01,
                           lrSchedule="cosine", validationFraction=0.2,
                           checkpointDir="/mnt/shared/checkpoints")
    estimator.save(str(tmp_path / "estimator"))
    loaded = KerasImageEstimator.load(str(tmp_path / "estimator"))
    assert loaded.uid == estimator.uid
    assert loaded.extractParamMap() == estimator.extractParamMap()
    assert json.loads(loaded.getOrDefault("architecture")) == TINY


@pytest.mark.parametrize(("params", "message"), [
    ({"architecture": "resnet9000"}, "Received: architecture='resnet9000'"),
    ({"architecture": {"layers": []}}, "not a valid spec"),
    ({"validationFraction": 1.5}, r"\[0, 1\). Received: 1.5"),
    ({"numWorkers": -1}, "Received: -1"),
    ({"lrSchedule": "linear"}, "Received: 'linear'"),
])
def test_bad_params_fail_when_set(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        KerasImageEstimator(**params)


def test_bad_columns_labels_and_batch_split_are_named(frames, tmp_path):
    labelled, _, _, _ = frames
    with pytest.raises(ValueError, match="'nope' is not in the DataFrame"):
        _estimator(tmp_path, labelCol="nope").fit(labelled)
    with pytest.raises(TypeError, match="image struct. Received: string"):
        _estimator(tmp_path, inputCol="split").fit(labelled)
    with pytest.raises(ValueError, match=r"numClasses=5\).*Received labels from 0 to 9"):
        _estimator(tmp_path, numClasses=5).fit(labelled)
    with pytest.raises(ValueError, match="multiple of numWorkers.*batchSize=33, numWorkers=2"):
        _estimator(tmp_path, numWorkers=2, batchSize=33).fit(labelled)


@pytest.mark.parametrize("workers", [0, 1])
def test_unwritable_tensorboard_or_checkpoint_folder_fails_before_training(
    frames, tmp_path, workers
):
    labelled, _, _, _ = frames
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for name in ("tensorboardDir", "checkpointDir"):
        folder = str(blocker / "logs")
        with pytest.raises(ValueError, match=rf"{name} must be a folder.*"
                                             rf"Received: {name}='{re.escape(folder)}'"):
            _estimator(tmp_path, numWorkers=workers, **{name: folder}).fit(labelled)
    assert not list((tmp_path / "models").glob("*.keras"))  # nothing was trained


@pytest.mark.parametrize(("mode", "rank", "hosts", "cpus", "allowed", "cores"), [
    ("auto", 1, ["a", "a"], 1, [0, 1], [1]),            # two workers on one host: one core each
    ("auto", 2, ["a", "b", "a", "a"], 2, list(range(8)), [2, 3]),  # by rank among a's workers
    ("auto", 0, ["a", "b"], 1, [0, 1], None),           # alone on its host: left unbound
    ("always", 0, ["a"], 2, [4, 5, 6], [4, 5]),         # the process's own CPUs, in order
    ("never", 1, ["a", "a"], 1, [0, 1], None),
    ("auto", 1, ["a", "a"], 2, [0, 1], None),           # 2 x 2 CPUs asked, 2 available
    ("always", 0, ["a"], 1, [], None),                  # no affinity API (not Linux)
])
def test_training_workers_bind_to_their_own_cores(mode, rank, hosts, cpus, allowed, cores):
    from pipelines.ml.distributed import worker_cores

    assert worker_cores(mode, rank, hosts, cpus, allowed) == cores


@pytest.mark.parametrize(("conf", "value", "message"), [
    ("spark.pipelines.training.bindCores", "sometimes",
     r"bindCores must be one of auto, always, never\. Received: 'sometimes'"),
    ("spark.pipelines.training.kill", "1:two",
     r"training.kill must be '<rank>:<step>' or '<rank>:<step>:once'\. Received: '1:two'"),
])
def test_training_conf_values_are_checked(spark, frames, conf, value, message):
    from pipelines.ml.distributed import BIND_CORES_CONF, KILL_CONF

    assert conf in (BIND_CORES_CONF, KILL_CONF)
    spark.conf.set(conf, value)
    try:
        with pytest.raises(ValueError, match=message):
            KerasImageEstimator(architecture=json.dumps(TINY), numWorkers=1,
                                numClasses=10).fit(frames[0])
    finally:
        spark.conf.unset(conf)
