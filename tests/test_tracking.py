"""MLflow tracking and progress lines, against a real SQLite tracking store.

A small pipeline run (ingest, transfer, train_cnn, score, report on 60 random images) runs in its
own process as a scheduler would start it, stdout and stderr not terminals; a second run with
another CNN setting runs in-process. MlflowClient must then find both parent runs, their stage
runs with params and metrics, and models that load back and predict what the jobs wrote.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_mnist_dir
from pyspark.sql import functions as F

from pipelines.config import ConfigError, load_config
from pipelines.ml.progress import duration, progress_text
from pipelines.run.progress import SparkProgress, label
from pipelines.run.runner import make_plan, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "run_pipeline.py"
STAGES = ["ingest", "transfer", "train_cnn", "score", "report"]
#: Lines TensorFlow's C++ runtime prints on import unless TF_CPP_MIN_LOG_LEVEL >= 2.
TF_BANNER = ("oneDNN custom operations", "cpu_feature_guard", "This TensorFlow binary",
             "absl::InitializeLog")


def _sets(out: Path, mnist_dir: Path, *extra: str) -> list[str]:
    return [f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={mnist_dir}",
            f"mnist.cache_dir={out}/cache", "ingest.validation_size=10", "ingest.partitions=2",
            "tracking.enabled=true", "cnn.architecture=seed", "cnn.epochs=2",
            "pipeline.progress_seconds=2", "transfer.train_size=30", *extra]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The first run, in a subprocess; returns (output root, mnist dir, the process)."""
    base = tmp_path_factory.mktemp("tracked")
    mnist_dir = write_mnist_dir(base / "mnist", 40, 20, seed=5)
    out = base / "out"
    args = [sys.executable, str(JOB), "--config", str(ROOT / "conf" / "test.yaml"),
            "--only", ",".join(STAGES)]
    for item in _sets(out, mnist_dir, "cnn.progress=bar"):
        args += ["--set", item]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYSPARK_PYTHON"] = sys.executable
    for key in ("PIPELINES_FAILPOINTS", "PYSPARK_GATEWAY_PORT", "TF_CPP_MIN_LOG_LEVEL",
                "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    (base / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, mnist_dir, proc


@pytest.fixture(scope="module")
def client(tracked):
    from mlflow.tracking import MlflowClient

    out, _, _ = tracked
    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def _children(client, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in runs}


def _parents(client) -> list:
    experiment = client.get_experiment_by_name("spark-image-pipelines")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_log_is_plain_text_without_tensorflow_banner_and_with_progress_lines(tracked):
    out, _, proc = tracked
    log = proc.stdout + proc.stderr
    # Not a terminal: no carriage returns, backspaces or ANSI escapes (Keras' bar writes them).
    assert "\r" not in log and "\x1b" not in log and "\b" not in log
    assert not [line for line in log.splitlines() if any(b in line for b in TF_BANNER)]
    # Training: one line per epoch with its rate and the ETA of the run.
    epochs = re.findall(r"cnn epoch (\d)/2 done in \d+ s \(\d[\d,]* images/s\), ETA \d+ s: "
                        r".*loss=", log)
    assert epochs == ["1", "2"]
    # The transfer stage's featurizing (a TensorFlow model per Python worker) takes seconds:
    # its Spark stage reports tasks done/total at least once.
    progress = re.findall(r"transfer: Spark stage \d+: (\d+)/(\d+) tasks", log)
    assert progress, log[-3000:]
    assert all(int(done) <= int(total) for done, total in progress)
    # Where the runs went is the run's last word on MLflow.
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db" in proc.stderr
    assert (out / "mlflow.db").exists() and (out / "mlartifacts").is_dir()


def test_parent_and_stage_runs_hold_params_metrics_and_artifacts(tracked, client):
    out, _, _ = tracked
    parent = _parents(client)[0]
    run = json.loads((out / "run.json").read_text())
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipelines.run_id"] == run["run_id"]
    assert parent.data.params["cnn.epochs"] == "2"
    assert parent.data.metrics["seconds"] == pytest.approx(run["seconds"])
    assert {parent.data.tags[f"stage.{s}"] for s in STAGES} == {"ran"}
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "run.json", "report"} <= parent_files
    assert "index.html" in {Path(a.path).name
                            for a in client.list_artifacts(parent.info.run_id, "report")}

    children = _children(client, parent)
    assert set(children) == set(STAGES)
    assert all(c.info.status == "FINISHED" for c in children.values())

    transfer = children["transfer"]
    metrics = json.loads((out / "transfer" / "metrics.json").read_text())
    assert transfer.data.params["transfer.model_name"] == "MobileNetV2"
    assert "cnn.epochs" not in transfer.data.params  # a stage's own sections only
    assert transfer.data.metrics["top1"] == pytest.approx(metrics["top1"])
    assert transfer.data.metrics["test_size"] == 20
    assert {"metrics.json", "confusion_matrix.png", "summary.json", "model"} <= {
        a.path for a in client.list_artifacts(transfer.info.run_id)}

    cnn = children["train_cnn"]
    cnn_metrics = json.loads((out / "cnn" / "metrics.json").read_text())
    history = client.get_metric_history(cnn.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]  # one value per epoch
    with (out / "cnn" / "history.csv").open() as fh:
        written_loss = [float(row["loss"]) for row in csv.DictReader(fh)]
    assert [m.value for m in history] == pytest.approx(written_loss, rel=1e-6)
    assert cnn.data.metrics["test.top1"] == pytest.approx(cnn_metrics["test"]["top1"])
    assert {"training_curves.png", "confusion_matrix.png", "summary.txt", "history.csv",
            "metrics.json"} <= {a.path for a in client.list_artifacts(cnn.info.run_id)}

    score = json.loads((out / "scores" / "_metrics.json").read_text())
    assert children["score"].data.metrics["top1"] == pytest.approx(score["top1"])


def test_logged_models_load_back_and_predict_what_the_jobs_wrote(spark, tracked, client):
    import mlflow
    import mlflow.pyfunc
    import mlflow.spark

    from pipelines.io.image_parquet import read_images
    from pipelines.stages.transfer import subset

    out, mnist_dir, _ = tracked
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")  # resolves runs:/ and models:/ URIs
    children = _children(client, _parents(client)[0])
    config = load_config(ROOT / "conf" / "test.yaml", _sets(out, mnist_dir))
    images = read_images(spark, str(out / "images"))

    # The PipelineModel: the confusion matrix of its predictions on the job's test subset is
    # the one the job wrote.
    pipeline = mlflow.spark.load_model(children["transfer"].data.tags["model_uri"])
    test = subset(images, "test", config.transfer.test_size, config.transfer.seed)
    pairs = pipeline.transform(test).groupBy("label", "prediction").count().collect()
    written = json.loads((out / "transfer" / "metrics.json").read_text())["confusion_matrix"]
    matrix = np.zeros_like(np.array(written))
    for r in pairs:
        matrix[int(r["label"]), int(r["prediction"])] = r["count"]
    assert matrix.tolist() == written

    # The Keras model through pyfunc: the probabilities the score job wrote.
    model = mlflow.pyfunc.load_model(children["train_cnn"].data.tags["model_uri"])
    signature = model.metadata.get_input_schema().inputs[0]
    assert signature.shape == (-1, 28, 28, 1)
    rows = (images.where(F.col("split") == "test").orderBy("id")
            .select("id", "image.data").collect())
    x = np.stack([np.frombuffer(r["data"], np.uint8).reshape(28, 28, 1) for r in rows])
    predicted = np.asarray(model.predict(x.astype(np.float32) / 255.0))
    scores = {r["id"]: r for r in spark.read.parquet(str(out / "scores")).collect()}
    expected = np.stack([scores[r["id"]]["probability"].toArray() for r in rows])
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    assert [scores[r["id"]]["prediction"] for r in rows] == predicted.argmax(axis=1).tolist()


def test_a_second_run_with_other_settings_is_a_second_parent_run(spark, tracked, client):
    out, mnist_dir, _ = tracked
    config = load_config(ROOT / "conf" / "test.yaml", _sets(out, mnist_dir, "cnn.epochs=1"))
    run_pipeline(spark, config, make_plan(config, only=["train_cnn"]))
    first, second = _parents(client)
    assert first.data.params["cnn.epochs"] == "2" and second.data.params["cnn.epochs"] == "1"
    assert second.data.tags["pipelines.selected"] == "train_cnn"
    children = _children(client, second)
    assert set(children) == {"train_cnn"}
    assert [m.step for m in client.get_metric_history(
        children["train_cnn"].info.run_id, "loss")] == [1]
    assert children["train_cnn"].data.params["cnn.epochs"] == "1"


def test_tracking_off_writes_no_store(spark, tmp_path, tiny_mnist_dir):
    out = tmp_path / "out"
    config = load_config(ROOT / "conf" / "test.yaml", [
        f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={tiny_mnist_dir}",
        f"mnist.cache_dir={out}/cache", "ingest.validation_size=10", "ingest.partitions=2"])
    assert not config.tracking.enabled
    run_pipeline(spark, config, make_plan(config, only=["ingest"]))
    assert (out / "images").is_dir() and not (out / "mlflow.db").exists()


def test_store_location_follows_the_output_root_and_refuses_sqlite_on_hdfs(tmp_path):
    from pipelines.run.tracking import artifact_location, store_uri

    local = load_config(ROOT / "conf" / "base.yaml", [f"output_root={tmp_path}/out"])
    assert store_uri(local) == f"sqlite:///{tmp_path}/out/mlflow.db"
    assert artifact_location(local.tracking, store_uri(local)) == f"{tmp_path}/out/mlartifacts"
    remote = load_config(ROOT / "conf" / "base.yaml", ["output_root=hdfs:///data"])
    assert store_uri(remote).startswith("sqlite:///") and "hdfs" not in store_uri(remote)
    server = load_config(ROOT / "conf" / "base.yaml", ["tracking.uri=http://mlflow:5000"])
    assert store_uri(server) == "http://mlflow:5000"
    assert artifact_location(server.tracking, store_uri(server)) is None
    with pytest.raises(ConfigError, match="Received: tracking.uri='sqlite:///hdfs:///data/m.db'"):
        load_config(ROOT / "conf" / "base.yaml", ["tracking.uri=sqlite:///hdfs:///data/m.db"])


def test_a_spark_stage_running_seconds_logs_done_total_rate_and_eta(spark, caplog):
    def slow(value):
        time.sleep(0.25)
        return value

    # A filter on the UDF's result: the count cannot skip it. 8 tasks of ~1 s on 2 cores.
    rows = spark.range(0, 32, numPartitions=8).where(F.udf(slow, "long")("id") >= 0)
    with caplog.at_level(logging.INFO, logger="pipelines.run.progress"):
        with SparkProgress(spark, every_seconds=1.0), label("slow"):
            assert rows.count() == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.run.progress"]
    parsed = [re.search(r"^slow: Spark stage \d+: (\d+)/8 tasks \(\d+ %\), "
                        r"(.*?ETA [^,]+)", line) for line in lines]
    assert len(lines) >= 2 and all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    assert done == sorted(done) and done[-1] > 0
    assert any("tasks/s, ETA" in line for line in lines)


def test_progress_text_and_duration():
    assert progress_text(0, 8, 3.0, "tasks") == (
        "0/8 tasks (0 %), 3 s so far, ETA unknown until one is done")
    assert progress_text(2, 8, 4.0, "tasks") == "2/8 tasks (25 %), 0.5 tasks/s, ETA 12 s"
    assert progress_text(1000, 1200, 10.0, "batches") == (
        "1,000/1,200 batches (83 %), 100 batches/s, ETA 2 s")
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
    # 2 of 6 done at 600 s, 300 s since: 4 more at that rate is 1,200 s, 300 of them gone.
    assert progress_text(2, 6, 600.0, "tasks", since_done=300.0).endswith("ETA 15 min 00 s")
    # Waited longer than that estimate: the rate over the whole time instead.
    assert progress_text(2, 6, 600.0, "tasks", since_done=1500.0).endswith("ETA 1 h 10 min")
    assert progress_text(0, 6, 0.0, "tasks", since_done=20.0) == (
        "0/6 tasks (0 %), 20 s so far, ETA unknown until one is done")


def test_spark_stage_eta_counts_down_while_long_tasks_run(caplog):
    """Six tasks, two at a time, ten minutes each (an ensemble's members): the ETA after the
    first two falls as the next two run, where a rate over the whole time made it grow."""
    stage = SimpleNamespace(numTasks=6, numCompletedTasks=0, numActiveTasks=2, numFailedTasks=0)
    tracker = SimpleNamespace(getActiveStageIds=lambda: [7], getStageInfo=lambda _: stage)
    spark = SimpleNamespace(sparkContext=SimpleNamespace(statusTracker=lambda: tracker))
    progress = SparkProgress(spark, every_seconds=60.0)
    progress.poll(0.0)
    stage.numCompletedTasks = 2
    progress.poll(600.0)
    etas = [progress.poll(t)[0].split("ETA ")[1].split(",")[0] for t in (660.0, 900.0, 1140.0)]
    assert etas == ["19 min 00 s", "15 min 00 s", "11 min 00 s"]


def test_epoch_progress_counts_rates_from_the_end_of_the_first_batch(monkeypatch, caplog):
    from pipelines.ml import callbacks

    clock = iter([0.0, 20.0, 21.0, 22.0, 30.0])  # epoch start, batches 0-2, epoch end
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    progress = callbacks.EpochProgress("cnn", 2, 1000, 100, every_seconds=1.5)
    with caplog.at_level(logging.INFO, logger="pipelines.ml.callbacks"):
        progress.on_train_begin()
        progress.on_epoch_begin(0)
        for batch in range(3):
            progress.on_train_batch_end(batch, {"loss": 0.5})
        progress.on_epoch_end(0, {"loss": 0.25, "val_loss": 0.5})
    lines = [r.getMessage() for r in caplog.records]
    # The 20 s first batch (tracing) is not in the rate: 2 batches in 2 s after it.
    assert lines == [
        "cnn epoch 1/2: 3/10 batches (30 %), 100 images/s, ETA 7 s, loss=0.5000",
        "cnn epoch 1/2 done in 30 s (33 images/s), ETA 30 s: loss=0.2500, val_loss=0.5000",
    ]
