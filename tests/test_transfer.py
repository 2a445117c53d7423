"""The transfer stage and job: featurize, fit LogisticRegression, evaluate, save, reload."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import ROOT, TEST_CONF, make_digits
from pyspark.ml import PipelineModel
from pyspark.ml.evaluation import MulticlassClassificationEvaluator

from pipelines.config import ConfigError, load_config
from pipelines.imaging.image_struct import array_to_struct
from pipelines.io.image_parquet import IMAGE_ROW_SCHEMA
from pipelines.stages.evaluation import classification_metrics
from pipelines.stages.transfer import run_transfer


def load_job():
    spec = importlib.util.spec_from_file_location("transfer_job", ROOT / "jobs" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_parquet(spark, tmp_path_factory):
    """30 train + 12 test random digits, plus one corrupt train image, as image Parquet."""
    path = str(tmp_path_factory.mktemp("transfer") / "images")
    train_x, train_y = make_digits(30, seed=11)
    test_x, test_y = make_digits(12, seed=12)
    rows = [(f"tr{i}", "train", int(train_y[i]), array_to_struct(train_x[i])) for i in range(30)]
    rows += [(f"te{i}", "test", int(test_y[i]), array_to_struct(test_x[i])) for i in range(12)]
    corrupt = {**array_to_struct(train_x[0]), "data": b"truncated"}
    rows.append(("tr-corrupt", "train", 3, corrupt))
    spark.createDataFrame(rows, IMAGE_ROW_SCHEMA).coalesce(1).write.partitionBy("split").parquet(
        path
    )
    return path


def test_transfer_writes_metrics_plot_and_a_reloadable_model_then_reuses_cached_features(
    spark, tmp_path, image_parquet
):
    out = tmp_path / "transfer"
    overrides = [f"transfer.input={image_parquet}", f"transfer.output={out}",
                 "transfer.train_size=null", "transfer.test_size=null"]
    arrow_batch = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(arrow_batch)
    summary = run_transfer(spark, load_config(TEST_CONF, overrides))
    assert spark.conf.get(arrow_batch) == before  # the stage's setting does not leak

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["weights"] == "none" and metrics["transfer_learning_result"] is False
    assert "NOT a transfer-learning result" in metrics["note"]
    assert metrics["model_name"] == "MobileNetV2" and metrics["input_size"] == 32
    assert (metrics["train_size"], metrics["test_size"]) == (30, 12)
    assert metrics["dropped_invalid"] == {"train": 1, "test": 0}
    assert metrics["feature_cache"] == "miss"
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 12 and 0 <= metrics["top1"] <= 1
    assert metrics["top1"] == pytest.approx(np.trace(matrix) / 12)
    assert metrics["reload_check"]["passed"] and metrics["reload_check"]["rows"] == 10
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = PipelineModel.load(str(out / "model"))
    assert [type(s).__name__ for s in model.stages] == [
        "DeepImageFeaturizer", "LogisticRegressionModel"
    ]

    # Re-tuning the classifier reuses the cached features (no featurizing, same subsets).
    again = run_transfer(spark, load_config(TEST_CONF, [*overrides, "transfer.reg_param=0.1",
                                                        "transfer.reload_check_rows=0"]))
    assert again["feature_cache"] == "hit"
    assert (again["train_size"], again["test_size"]) == (30, 12)
    assert json.loads((out / "metrics.json").read_text())["classifier"]["regParam"] == 0.1


def test_classification_metrics_agree_with_spark_evaluator(spark):
    pairs = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 2), (2, 0), (1, 1), (0, 0)]
    df = spark.createDataFrame([(float(a), float(b)) for a, b in pairs], ["label", "prediction"])
    matrix = np.zeros((3, 3), dtype=int)
    for a, b in pairs:
        matrix[a, b] += 1
    scores = classification_metrics(matrix, ["a", "b", "c"])
    evaluator = MulticlassClassificationEvaluator()
    for name, key in [("accuracy", "top1"), ("f1", "weighted_f1")]:
        assert scores[key] == pytest.approx(evaluator.setMetricName(name).evaluate(df))
    for c in range(3):
        precision = evaluator.setMetricName("precisionByLabel").setMetricLabel(c).evaluate(df)
        recall = evaluator.setMetricName("recallByLabel").setMetricLabel(c).evaluate(df)
        assert scores["per_class"][c]["precision"] == pytest.approx(precision, abs=1e-6)
        assert scores["per_class"][c]["recall"] == pytest.approx(recall, abs=1e-6)


@pytest.mark.parametrize(
    "override, match",
    [
        ("transfer.input_size=60", "input_size must be 0 .* >= 75 .* Received: input_size=60"),
        ("transfer.model_name=ResNet152", "Received: transfer.model_name='ResNet152'"),
        ("transfer.scale_hint=cubic", "Received: transfer.scale_hint='cubic'"),
        ("transfer.train_size=0", "Received: transfer.train_size=0"),
    ],
)
def test_transfer_config_rejects_bad_values_on_load(override, match):
    overrides = ["transfer.model_name=InceptionV3", override]
    with pytest.raises(ConfigError, match=match):
        load_config(TEST_CONF, overrides)


def test_transfer_job_exits_2_on_bad_config_before_spark_starts():
    job = load_job()
    assert job.main(["--config", str(TEST_CONF), "--set", "transfer.batch_size=0"]) == 2


@pytest.mark.slow
def test_transfer_job_on_real_mnist_subset(spark, tmp_path, mnist_files):
    from pipelines.io.image_parquet import write_image_parquet
    from pipelines.stages.ingest import mnist_frame
    from pipelines.stages.mnist import load_mnist

    config = load_config(TEST_CONF, [f"ingest.output={tmp_path / 'images'}"])
    write_image_parquet(spark, mnist_frame(spark, load_mnist(mnist_files), 5000), config.ingest.output,
                        config.ingest.partitions)
    # run_transfer, not the job's main(): main() stops the session, which the tests share.
    run_transfer(spark, load_config(TEST_CONF, [
        f"output_root={tmp_path}", "transfer.model_name=InceptionV3", "transfer.input_size=75",
        "transfer.train_size=300", "transfer.test_size=100", "transfer.max_iter=50",
    ]))
    metrics = json.loads((tmp_path / "transfer" / "metrics.json").read_text())
    assert (metrics["train_size"], metrics["test_size"]) == (300, 100)
    assert metrics["feature_dim"] == 2048 and metrics["weights"] == "none"
    assert metrics["reload_check"]["passed"]
    assert len(metrics["per_class"]) == 10
    # Random InceptionV3 features + logistic regression still beat chance (10%) on MNIST; this
    # is not a transfer-learning figure (weights: none).
    assert metrics["top1"] > 0.3
