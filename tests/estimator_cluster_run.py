"""Scenarios for tests/test_estimator_cluster.py, run in a fresh process on a local-cluster.

Usage: python tests/estimator_cluster_run.py OUT.json

One SparkSession (``local-cluster[2,1,1024]``: two executor JVMs of one core each) for every
scenario, so Spark and the executors start once. Each scenario records what the tests assert on
in OUT.json: fit results, digests, accuracies, task times, errors and how long they took.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: A small CNN with batch normalisation (its moving statistics must agree across workers too).
TINY = {
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3}},
        {"BatchNormalization": {}},
        {"ReLU": {}},
        {"MaxPooling2D": {"pool_size": 4}},
        {"Flatten": {}},
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
    "learning_rate": 0.01,
    "shift_pixels": 1,
    "batch_size": 32,
    "epochs": 2,
}


def blocks(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0-9 drawn as a bright block at a place per label, on noise: easy to learn."""
    rng = np.random.default_rng(seed)
    images = (rng.integers(0, 64, (n, 28, 28))).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + row * 10:12 + row * 10, 1 + col * 5:5 + col * 5] = 255
    return images, labels


def tensorboard(run: Path) -> dict:
    """A TensorBoard run's runs (train, validation): tag -> [[step, value, wall time], ...]."""
    from tensorboard_events import scalar_events

    return {sub.name: {tag: [[step, *by_step[step]] for step in sorted(by_step)]
                       for tag, by_step in scalar_events(sub).items()}
            for sub in sorted(run.iterdir()) if sub.is_dir()}


def top1(model, frame) -> float:
    scored = model.transform(frame).select("label", "prediction").collect()
    return float(np.mean([r.label == r.prediction for r in scored]))


def main(out_path: str) -> None:
    sys.path[:0] = [str(ROOT)]
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # The executors' Python workers (and their training processes) import this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from pipelines.ml.classifier import KerasImageClassifier
    from pipelines.ml.distributed import KILL_CONF
    from pipelines.ml.estimator import KerasImageEstimator
    from pipelines.stages.ingest import mnist_frame
    from pipelines.stages.mnist import MnistArrays

    spark = (SparkSession.builder.master("local-cluster[2,1,1024]")
             .appName("estimator-cluster-tests")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "2")
             # Two attempts of a barrier stage (Spark's default is 4): the resume scenarios
             # need one retry; the killed worker, retried and killed again, then fails in half
             # the time.
             .config("spark.stage.maxConsecutiveAttempts", "2")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    train_x, train_y = blocks(500, 1)
    test_x, test_y = blocks(200, 2)
    frame = mnist_frame(spark, MnistArrays(train_x, train_y, test_x, test_y), 100).cache()
    labelled = frame.where("split != 'test'").withColumn(
        "is_validation", F.col("split") == "validation")
    test = frame.where("split = 'test'")
    models = Path(out_path).parent / "models"
    boards = Path(out_path).parent / "tensorboard"
    record: dict = {"executors": spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()}

    def estimator(**params):
        base = {"architecture": TINY, "validationIndicatorCol": "is_validation", "seed": 3,
                "modelDir": str(models), "timeoutSeconds": 60.0}
        return KerasImageEstimator(**{**base, **params})

    epoch_lines: list[str] = []  # what the driver logged from the tasks' epoch reports

    class Lines(logging.Handler):
        def emit(self, log_record):
            epoch_lines.append(log_record.getMessage())

    reports_logger = logging.getLogger("pipelines.ml.epoch_reports")
    reports_logger.setLevel(logging.INFO)
    reports_logger.addHandler(Lines())

    def scenario(name, fn):
        started = time.time()
        epoch_lines.clear()
        try:
            record[name] = fn()
            record[name]["epoch_lines"] = list(epoch_lines)
        except Exception as exc:
            record[name] = {"error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-4000:]}
        record[name]["seconds"] = time.time() - started

    def two_workers():
        model = estimator(numWorkers=2, tensorboardDir=str(boards / "two")).fit(labelled)
        path = str(models / "saved-classifier")
        model.write().overwrite().save(path)
        loaded = KerasImageClassifier.load(path)
        before = [r.probability.toArray().tolist() for r in
                  model.transform(test).orderBy("id").select("probability").collect()]
        after = [r.probability.toArray().tolist() for r in
                 loaded.transform(test).orderBy("id").select("probability").collect()]
        summary = model.trainingSummary
        return {"digests": summary["digests"], "history": summary["history"],
                "worker_cores": summary["worker_cores"],
                "top1": top1(model, test), "model_path": model.getModelPath(),
                "epoch_seconds": summary["epoch_seconds"],
                "tensorboard": tensorboard(boards / "two"),
                "loaded_uid_equal": loaded.uid == model.uid,
                "loaded_params_equal": loaded.extractParamMap() == model.extractParamMap(),
                "probabilities_equal": before == after, "rows": len(before)}

    def driver():
        model = estimator(numWorkers=0, tensorboardDir=str(boards / "driver")).fit(labelled)
        return {"top1": top1(model, test), "history": model.trainingSummary["history"],
                "tensorboard": tensorboard(boards / "driver")}

    def cross_validation():
        est = estimator(numWorkers=1, epochs=1, tensorboardDir=str(boards / "cv"))
        grid = ParamGridBuilder().addGrid(est.learningRate, [0.01, 0.003]).build()
        evaluator = MulticlassClassificationEvaluator(metricName="accuracy")
        cv = CrossValidator(estimator=est, estimatorParamMaps=grid, evaluator=evaluator,
                            numFolds=2, parallelism=2, collectSubModels=True, seed=1)
        fitted = cv.fit(labelled.where(~F.col("is_validation")))
        folds = [[{k: m.trainingSummary[k] for k in ("started", "ended", "pid", "host")}
                  for m in fold] for fold in fitted.subModels]
        learning_rates = [[m.trainingSummary["plan"]["spec"]["learning_rate"] for m in fold]
                          for fold in fitted.subModels]
        return {"folds": folds, "learning_rates": learning_rates,
                "metrics": list(fitted.avgMetrics),
                "best_top1": top1(fitted.bestModel, test),
                "tensorboard_runs": sorted(str(p.parent.relative_to(boards / "cv"))
                                           for p in (boards / "cv").rglob("events.out.*"))}

    def killed_worker():
        spark.conf.set(KILL_CONF, "1:3")
        try:
            estimator(numWorkers=2, epochs=3).fit(labelled)
            return {"error": None}
        finally:
            spark.conf.unset(KILL_CONF)

    checkpoints = Path(out_path).parent / "checkpoints"

    def resumed(name: str, kill: str, **params):
        # Killed once, in epoch 2 of 3: the retried stage (or task) resumes from epoch 1.
        spark.conf.set(KILL_CONF, kill)
        try:
            model = estimator(epochs=3, checkpointDir=str(checkpoints),
                              tensorboardDir=str(boards / name),
                              **params).fit(labelled)
        finally:
            spark.conf.unset(KILL_CONF)
        summary = model.trainingSummary
        runs = summary.get("members", [summary])
        return {"resumed_from_epoch": [r["resumed_from_epoch"] for r in runs],
                "epochs": [len(r["history"]["loss"]) for r in runs],
                "digests": summary.get("digests"), "top1": top1(model, test),
                "histories": [r["history"] for r in runs],
                # One run per member, or the one model's run.
                "tensorboard": [tensorboard(run) for run in
                                sorted((boards / name).glob("member-*")) or [boards / name]],
                "left_behind": sorted(p.name for p in checkpoints.glob("*"))}

    scenario("two_workers", two_workers)
    scenario("driver", driver)
    scenario("cross_validation", cross_validation)
    scenario("killed_worker", killed_worker)
    scenario("resumed_workers", lambda: resumed("resumed_workers", "1:16:once", numWorkers=2))
    scenario("resumed_member", lambda: resumed("resumed_member", "0:16:once", numWorkers=1,
                                               ensembleSize=2))
    Path(out_path).write_text(json.dumps(record, indent=2))
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1])
