"""The train_cnn job: a Keras CNN trained from image Parquet, on the driver or the executors.

With ``cnn.num_workers: 0`` and ``cnn.ensemble: 1`` (the defaults) the driver trains, through
the loop shared with the estimator (:mod:`pipelines.ml.training`). Otherwise the job applies
:class:`~pipelines.ml.estimator.KerasImageEstimator` to the train and validation rows: one model
on ``num_workers`` executor tasks, or ``ensemble`` members averaged into one model. Either way
the job then evaluates on the test split and publishes the same outputs.

On the driver:

Data comes from Parquet through Arrow batches into ``tf.data`` (:mod:`pipelines.ml.datasets`):
held in memory when the train and validation splits fit ``cnn.in_memory_mb``, else streamed each
epoch; the architecture is data (:mod:`pipelines.ml.architectures`). Each epoch is validated on the
validation split; training stops early when ``cnn.monitor`` stops improving; the best epoch's
weights are kept. The run is resumable: at every epoch end Keras' ``BackupAndRestore`` saves the
weights, the optimizer state and the epoch in ``cnn.checkpoint_dir``, and a rerun with the same
settings continues from there.

Outputs in ``cnn.output`` (replaced atomically at the end, nothing published on failure):
``model.keras``, ``summary.txt``, ``metrics.json``, ``history.csv``, ``training_curves.png``,
``confusion_matrix.png`` and ``tensorboard/``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import CnnConfig, Config
from pipelines.faults import maybe_fail
from pipelines.io.digest import sha256_json
from pipelines.io.storage import Storage
from pipelines.ml.architectures import ArchitectureSpec, resolve_architecture
from pipelines.ml.datasets import class_names, make_dataset, open_split
from pipelines.ml.models import compile_model, steps, summary_text
from pipelines.ml.training import (
    TrainingPlan,
    TrainResult,
    best_epoch,
    last_or_best,
    prepare_work_dir,
    train_model,
    write_history,
    write_tensorboard,
)
from pipelines.stages.evaluation import (
    classification_metrics,
    confusion_matrix,
    confusion_matrix_png,
    training_curves_png,
)
from pipelines.stages.tracker import NO_TRACKER, Tracker

logger = logging.getLogger(__name__)

OUTPUT_FILES = (
    "model.keras", "summary.txt", "metrics.json", "history.csv",
    "training_curves.png", "confusion_matrix.png",
)
#: Settings that do not change what is trained (a run may resume across changes of these).
#: ``num_workers`` and ``ensemble`` are left out of this set: they change how it is trained.
_NOT_TRAINING = {"output", "checkpoint_dir", "resume", "progress", "tensorboard", "architectures",
                 "executor_checkpoint_dir"}


def checkpoint_dir(cfg: CnnConfig) -> Path:
    """The driver-local folder for resumable training state (see ``cnn.checkpoint_dir``)."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir.removeprefix("file://"))
    output = cfg.output.rstrip("/")
    if "://" not in output or output.startswith("file://"):
        return Path(output.removeprefix("file://")).parent / "_checkpoints" / "cnn"
    digest = hashlib.sha256(output.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "spark-image-pipelines" / f"cnn-{digest}"


def run_train_cnn(spark: SparkSession, config: Config,
                  tracker: Tracker = NO_TRACKER) -> dict[str, Any]:
    """The train_cnn job: train, evaluate on the test split, publish the outputs.

    ``tracker`` gets the metrics of every epoch, the model summary and history, and the
    trained model (the runner logs the files in ``artifacts``).
    """
    cfg = config.cnn
    storage = Storage(spark)
    summary, publish_dir = train_cnn(cfg, spark, tracker, config.pipeline.progress_seconds)
    for name in ("summary.txt", "history.csv"):  # beside the files listed in "artifacts"
        tracker.log_artifact(str(publish_dir / name))
    with storage.staged_dir(cfg.output) as tmp:
        for path in sorted(publish_dir.rglob("*")):
            if path.is_file():
                storage.write_bytes(f"{tmp}/{path.relative_to(publish_dir)}", path.read_bytes())
    output = cfg.output.rstrip("/")
    summary["output"] = cfg.output
    summary["model"] = f"{output}/model.keras"
    summary["artifacts"] = {
        "metrics": f"{output}/metrics.json",
        "training_curves": f"{output}/training_curves.png",
        **({"confusion_matrix": f"{output}/confusion_matrix.png"} if "test" in summary else {}),
    }
    return summary


def train_cnn(cfg: CnnConfig, spark: SparkSession | None = None,
              tracker: Tracker = NO_TRACKER, progress_seconds: float = 15.0
              ) -> tuple[dict[str, Any], Path]:
    """Train and evaluate; write every output under ``<checkpoint_dir>/publish``.

    Returns the summary written to ``metrics.json`` and the publish folder.
    Training on the driver needs no SparkSession (the driver reads Parquet itself); on the
    executors (``num_workers`` > 0 or ``ensemble`` > 1) it needs ``spark``. Driver training
    logs progress at most every ``progress_seconds`` within an epoch and at every epoch's end.
    """
    started = time.perf_counter()
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("cnn.tensorboard is true but the tensorboard package is not installed; "
                         "install it or set cnn.tensorboard=false. Received: cnn.tensorboard=True")
    spec = resolve_architecture(cfg.architecture, cfg.architectures)
    if cfg.input_shape is not None:
        spec = spec.model_copy(update={"input_shape": tuple(cfg.input_shape)})
    epochs = cfg.epochs or spec.epochs
    batch_size = cfg.batch_size or spec.batch_size
    shape = tuple(spec.input_shape)
    train = open_split(cfg.inputs, cfg.train_split, shape, cfg.resize_method)
    validation = open_split(cfg.inputs, cfg.validation_split, shape, cfg.resize_method)
    test = open_split(cfg.inputs, cfg.test_split, shape, cfg.resize_method)
    counts = {s.split: s.count() for s in (train, validation, test)}
    if not counts[cfg.train_split] or not counts[cfg.validation_split]:
        raise ValueError(
            f"the train and validation splits must not be empty. Received row counts {counts} "
            f"from inputs {cfg.inputs}"
        )
    for source in (train, validation, test):
        source.check()
    labels = train.label_counts()
    names = class_names(cfg.inputs)
    num_classes = cfg.num_classes or max(
        2, 1 + max([*labels, *validation.label_counts(), *test.label_counts(), *names]))
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(
            f"labels must be in [0, num_classes={num_classes}). "
            f"Received label counts {labels} in split {cfg.train_split!r}"
        )
    logger.info("cnn: architecture %r, input %s, %s classes, %s epochs, batch %s, rows %s, "
                "train labels %s", cfg.architecture, shape, num_classes, epochs, batch_size,
                counts, labels)

    work = checkpoint_dir(cfg)
    digest = _run_digest(cfg, spec, epochs, batch_size)
    resume_epoch = prepare_work_dir(work, digest, cfg.resume)
    plan = TrainingPlan(spec=spec.model_copy(update={"epochs": epochs, "batch_size": batch_size}),
                        num_classes=num_classes, seed=cfg.seed, monitor=cfg.monitor,
                        patience=cfg.early_stopping_patience, deterministic=cfg.deterministic)
    if cfg.num_workers or cfg.ensemble > 1:
        if spark is None:
            raise ValueError("training on the executors needs a SparkSession. Received: "
                             f"cnn.num_workers={cfg.num_workers}, cnn.ensemble={cfg.ensemble}")
        trained, feed, extra = _train_with_estimator(spark, cfg, plan, work, digest)
    else:
        trained, feed = _train_on_driver(cfg, plan, train, validation, counts, work, resume_epoch,
                                         tracker, progress_seconds)
        extra = {}
    model, history = trained.model, trained.history
    text = summary_text(model)
    logger.info("cnn model summary:\n%s", text)
    fit_seconds = trained.fit_seconds
    best = trained.best_epoch

    evaluation = (_evaluate(model, test, batch_size, num_classes, cfg, spec)
                  if counts[cfg.test_split] else None)
    publish = work / "publish"
    shutil.rmtree(publish, ignore_errors=True)
    publish.mkdir(parents=True)
    model.save(publish / "model.keras")
    (publish / "summary.txt").write_text(text + "\n")
    write_history(publish / "history.csv", history)
    if cfg.tensorboard and (work / "tensorboard").exists():
        shutil.copytree(work / "tensorboard", publish / "tensorboard")
    title = f"architecture {cfg.architecture!r}"
    (publish / "training_curves.png").write_bytes(training_curves_png(history, title))
    summary: dict[str, Any] = {
        "architecture": cfg.architecture,
        "architecture_spec": spec.model_dump(mode="json"),
        "weights": "trained from scratch (random initialisation, seed "
                   f"{cfg.seed}); best epoch by {cfg.monitor}",
        "inputs": list(cfg.inputs),
        "input_shape": list(shape),
        "num_classes": num_classes,
        "class_names": [names.get(i, str(i)) for i in range(num_classes)],
        "rows": counts,
        "epochs": epochs,
        "batch_size": batch_size,
        "input": feed,
        "num_workers": cfg.num_workers,
        "ensemble": cfg.ensemble,
        "epochs_run": len(history.get("loss", [])),
        "resumed_from_epoch": trained.resumed_from_epoch,
        "best_epoch": best,
        "validation": {k: last_or_best(history, k, best) for k in history
                       if k.startswith("val_")},
        "fit_seconds": round(fit_seconds, 1),
        "params": int(model.count_params()),
        **extra,
    }
    if evaluation is not None:
        summary["test"] = evaluation
        (publish / "confusion_matrix.png").write_bytes(confusion_matrix_png(
            evaluation["confusion_matrix"], summary["class_names"],
            f"{title}: test top-1 {evaluation['top1']:.4f}"))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    (publish / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("cnn: test %s, fit %.1fs, wall %.1fs",
                {k: v for k, v in (evaluation or {}).items() if k in ("loss", "top1", "keras")},
                fit_seconds, summary["wall_seconds"])
    tracker.log_keras_model(model)
    return summary, publish


def _train_on_driver(cfg: CnnConfig, plan: TrainingPlan, train: Any, validation: Any,
                     counts: dict[str, int], work: Path, resume_epoch: int | None,
                     tracker: Tracker, progress_seconds: float) -> tuple[TrainResult, str]:
    """Keras ``fit`` on the driver, fed from Parquet in memory or streamed; resumable.

    Progress: plain log lines (:class:`~pipelines.ml.callbacks.EpochProgress`), Keras' own bar
    only on a terminal; ``tracker`` gets every epoch's metrics.
    """
    import keras

    from pipelines.ml.callbacks import EpochProgress  # imports Keras

    held_mb = (train.nbytes() + validation.nbytes()) / 2**20
    in_memory = held_mb <= cfg.in_memory_mb
    logger.info("cnn: train + validation images take %.1f MiB as uint8: %s (cnn.in_memory_mb=%s)",
                held_mb, "held in memory" if in_memory else "streamed from Parquet each epoch",
                cfg.in_memory_mb)
    batch_size = plan.batch_size
    train_ds = make_dataset(train, batch_size, plan.num_classes, cfg.read_batch_rows,
                            cfg.shuffle_buffer, cfg.seed, plan.spec.shift_pixels, in_memory,
                            plan.spec.elastic_distortion)
    val_ds = make_dataset(validation, batch_size, plan.num_classes, cfg.read_batch_rows,
                          in_memory=in_memory)
    verbose = _keras_verbose(cfg.progress)
    callbacks = [_failpoint_callback(), EpochProgress(
        "cnn", plan.spec.epochs, counts[cfg.train_split], batch_size, progress_seconds,
        within_epoch=cfg.progress != "off" and not verbose)]
    if tracker.enabled:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracker.log_metrics(logs or {}, step=epoch + 1)))
    trained = train_model(plan, train_ds, val_ds, steps(counts[cfg.train_split], batch_size),
                          work, verbose=verbose,
                          tensorboard=work / "tensorboard" if cfg.tensorboard else None,
                          resumed_from_epoch=resume_epoch, extra_callbacks=callbacks)
    return trained, "in_memory" if in_memory else "streamed"


def _failpoint_callback() -> Any:
    import keras

    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: maybe_fail("cnn.epoch"))


def _train_with_estimator(spark: SparkSession, cfg: CnnConfig, plan: TrainingPlan, work: Path,
                          digest: str) -> tuple[TrainResult, str, dict[str, Any]]:
    """The estimator on the train + validation rows: executor tasks, or an ensemble.

    TensorBoard logs are written while training into ``work`` (members on the driver) or into
    ``executor_checkpoint_dir`` (a folder the executors share), then copied into ``work``; with
    neither, they are written from the history the tasks return, after the fit.
    """
    import keras

    from pipelines.ml.estimator import KerasImageEstimator

    rows = _image_rows(spark, cfg.inputs).where(
        F.col("split").isin(cfg.train_split, cfg.validation_split)
    ).withColumn("_is_validation", F.col("split") == cfg.validation_split)
    spec = plan.spec
    live = _live_tensorboard_dir(cfg, work, digest)
    estimator = KerasImageEstimator(
        architecture=spec.model_dump_json(), numClasses=plan.num_classes, epochs=spec.epochs,
        batchSize=spec.batch_size, validationIndicatorCol="_is_validation",
        monitor=cfg.monitor, earlyStoppingPatience=cfg.early_stopping_patience or 0,
        seed=cfg.seed, numWorkers=cfg.num_workers, ensembleSize=cfg.ensemble,
        modelDir=str(work / "estimator"), checkpointDir=cfg.executor_checkpoint_dir or "",
        tensorboardDir=str(live or ""))
    fitted = estimator.fit(rows)
    if live is not None and live != work / "tensorboard":
        shutil.copytree(live, work / "tensorboard", dirs_exist_ok=True)
        shutil.rmtree(live, ignore_errors=True)
    from_history = cfg.tensorboard and live is None  # no live logs: write them now
    model = keras.saving.load_model(fitted.getModelPath(), safe_mode=True, compile=False)
    compile_model(model, spec, 1, spec.epochs)  # for evaluate() only: it is not trained further
    # Built, so the published file's optimizer matches what load_model(compile=True) creates.
    model.optimizer.build(model.trainable_variables)
    summary = fitted.trainingSummary
    if cfg.ensemble > 1:
        members = summary["members"]
        history = _mean_history([m["history"] for m in members])
        extra = {"members": [{"seed": cfg.seed + i, "best_epoch": m["best_epoch"],
                              "fit_seconds": round(m["fit_seconds"], 1),
                              "resumed_from_epoch": m.get("resumed_from_epoch"),
                              "validation": {k: last_or_best(m["history"], k, m["best_epoch"])
                                             for k in m["history"] if k.startswith("val_")}}
                             for i, m in enumerate(members)]}
        fit_seconds = max(m["ended"] for m in members) - min(m["started"] for m in members) \
            if cfg.num_workers else sum(m["fit_seconds"] for m in members)
        best = best_epoch(history, cfg.monitor)
        resumed = None
        if from_history:
            for i, member in enumerate(members):
                write_tensorboard(work / "tensorboard" / f"member-{i}", member["history"])
    else:
        history = summary["history"]
        extra = {"worker_digests": summary.get("digests")}
        fit_seconds, best = summary["fit_seconds"], summary["best_epoch"]
        resumed = summary.get("resumed_from_epoch")
        if from_history:
            write_tensorboard(work / "tensorboard", history)
    feed = "executors" if cfg.num_workers else "collected_to_driver"
    return TrainResult(model, history, best, fit_seconds, resumed), feed, extra


def _live_tensorboard_dir(cfg: CnnConfig, work: Path, digest: str) -> Path | None:
    """Where the estimator writes TensorBoard logs as epochs end, or None (written afterwards).

    Executor tasks need a folder they share: ``executor_checkpoint_dir``, in a sub-folder named
    by the run's settings, so a rerun that resumes its checkpoints adds to its own logs.
    """
    if not cfg.tensorboard:
        return None
    if not cfg.num_workers:  # ensemble members trained on the driver
        return work / "tensorboard"
    if cfg.executor_checkpoint_dir:
        folder = Path(cfg.executor_checkpoint_dir.removeprefix("file://"))
        live = folder / f"tensorboard-{digest[:16]}"
        logger.info("cnn: TensorBoard logs are written as epochs end to %s "
                    "(copied to the output when the fit ends)", live)
        return live
    logger.info("cnn: TensorBoard logs are written from the training history when the fit "
                "ends; set cnn.executor_checkpoint_dir to a folder the executors share to "
                "follow them live")
    return None


def _keras_verbose(progress: str) -> int:
    """Keras' own progress bar only on a terminal: elsewhere (a scheduler's log) it writes
    carriage returns and escapes; :class:`EpochProgress` logs plain lines instead."""
    return int(progress == "bar" and sys.stdout.isatty() and sys.stderr.isatty())


def _image_rows(spark: SparkSession, inputs: list[str]) -> DataFrame:
    frames = [spark.read.parquet(path).select("split", "label", "image") for path in inputs]
    return functools.reduce(DataFrame.unionByName, frames)


def _mean_history(histories: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-epoch means of the members' metrics, over the epochs every member ran."""
    keys = set.intersection(*(set(h) for h in histories))
    epochs = min(len(h[k]) for h in histories for k in keys)
    return {k: [sum(h[k][i] for h in histories) / len(histories) for i in range(epochs)]
            for k in sorted(keys)}


def _evaluate(model: Any, test: Any, batch_size: int, num_classes: int, cfg: CnnConfig,
              spec: ArchitectureSpec) -> dict[str, Any]:
    """Keras' loss and metrics, and top-1 / per-class metrics from a streamed confusion matrix."""
    import numpy as np

    dataset = make_dataset(test, batch_size, num_classes, cfg.read_batch_rows)
    keras_metrics = model.evaluate(dataset, verbose=0, return_dict=True)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for images, onehot in dataset:
        predicted = np.argmax(model.predict_on_batch(images), axis=1)
        matrix += confusion_matrix(np.argmax(onehot.numpy(), axis=1), predicted, num_classes)
    result = classification_metrics(matrix)
    note = None
    if "binary" in json.dumps(spec.loss).lower():
        note = ("binary_accuracy (what Keras 2, the seed notebook's Keras, reported as "
                "'accuracy' for binary cross-entropy) scores 10 yes/no outputs per image; "
                "top1 is the arg-max accuracy")
    return {
        "loss": round(float(keras_metrics["loss"]), 6),
        "top1": result["top1"],
        "keras": {k: round(float(v), 6) for k, v in keras_metrics.items()},
        "keras_accuracy_note": note,
        **{k: v for k, v in result.items() if k != "top1"},
    }


def _run_digest(cfg: CnnConfig, spec: ArchitectureSpec, epochs: int, batch_size: int) -> str:
    settings = cfg.model_dump(mode="json", exclude=_NOT_TRAINING)
    return sha256_json([settings, spec.model_dump(mode="json"), epochs, batch_size])
