"""The train_cnn job: a Keras CNN trained on the driver from image Parquet.

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

import csv
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

from pyspark.sql import SparkSession

from pipelines.config import CnnConfig, Config
from pipelines.faults import maybe_fail
from pipelines.io.digest import sha256_json
from pipelines.io.storage import Storage
from pipelines.ml.architectures import ArchitectureSpec, resolve_architecture
from pipelines.ml.datasets import make_dataset, open_split
from pipelines.ml.models import build_architecture, compile_model, steps, summary_text
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
_NOT_TRAINING = {"output", "checkpoint_dir", "resume", "progress", "tensorboard", "architectures"}


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
    summary, publish_dir = train_cnn(cfg, tracker, config.pipeline.progress_seconds)
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


def train_cnn(cfg: CnnConfig, tracker: Tracker = NO_TRACKER,
              progress_seconds: float = 15.0) -> tuple[dict[str, Any], Path]:
    """Train and evaluate; write every output under ``<checkpoint_dir>/publish``.

    Returns the summary written to ``metrics.json`` and the publish folder.
    Needs no SparkSession: the driver reads Parquet itself. Progress is logged at most every
    ``progress_seconds`` within an epoch and at every epoch's end.
    """
    import keras
    import tensorflow as tf

    from pipelines.ml.callbacks import EpochProgress  # imports Keras

    started = time.perf_counter()
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("cnn.tensorboard is true but the tensorboard package is not installed; "
                         "install it or set cnn.tensorboard=false. Received: cnn.tensorboard=True")
    spec = resolve_architecture(cfg.architecture, cfg.architectures)
    epochs = cfg.epochs or spec.epochs
    batch_size = cfg.batch_size or spec.batch_size
    shape = tuple(spec.input_shape)
    train = open_split(cfg.inputs, cfg.train_split, shape)
    validation = open_split(cfg.inputs, cfg.validation_split, shape)
    test = open_split(cfg.inputs, cfg.test_split, shape)
    counts = {s.split: s.count() for s in (train, validation, test)}
    if not counts[cfg.train_split] or not counts[cfg.validation_split]:
        raise ValueError(
            f"the train and validation splits must not be empty. Received row counts {counts} "
            f"from inputs {cfg.inputs}"
        )
    for source in (train, validation, test):
        source.check()
    labels = train.label_counts()
    if min(labels) < 0 or max(labels) >= cfg.num_classes:
        raise ValueError(
            f"labels must be in [0, num_classes={cfg.num_classes}). "
            f"Received label counts {labels} in split {cfg.train_split!r}"
        )
    logger.info("cnn: architecture %r, %s epochs, batch %s, rows %s, train labels %s",
                cfg.architecture, epochs, batch_size, counts, labels)

    work = checkpoint_dir(cfg)
    resume_epoch = _prepare_work_dir(work, _run_digest(cfg, spec, epochs, batch_size), cfg.resume)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()

    model = build_architecture(spec, cfg.num_classes)
    steps_per_epoch = steps(counts[cfg.train_split], batch_size)
    compile_model(model, spec, steps_per_epoch, epochs)
    text = summary_text(model)
    logger.info("cnn model summary:\n%s", text)

    held_mb = (train.nbytes() + validation.nbytes()) / 2**20
    in_memory = held_mb <= cfg.in_memory_mb
    logger.info("cnn: train + validation images take %.1f MiB as uint8: %s (cnn.in_memory_mb=%s)",
                held_mb, "held in memory" if in_memory else "streamed from Parquet each epoch",
                cfg.in_memory_mb)
    train_ds = make_dataset(train, batch_size, cfg.num_classes, cfg.read_batch_rows,
                            cfg.shuffle_buffer, cfg.seed, spec.shift_pixels, in_memory)
    val_ds = make_dataset(validation, batch_size, cfg.num_classes, cfg.read_batch_rows,
                          in_memory=in_memory)
    verbose = _keras_verbose(cfg.progress)
    callbacks = _callbacks(cfg, work) + [EpochProgress(
        "cnn", epochs, counts[cfg.train_split], batch_size, progress_seconds,
        within_epoch=cfg.progress != "off" and not verbose)]
    if tracker.enabled:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracker.log_metrics(logs or {}, step=epoch + 1)))
    fit_started = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
              shuffle=False, verbose=verbose)
    fit_seconds = time.perf_counter() - fit_started
    history = _read_history(work / "history.csv")
    best = work / "best.weights.h5"
    if best.exists():
        model.load_weights(str(best))
    best_epoch = _best_epoch(history, cfg.monitor)

    evaluation = _evaluate(model, test, batch_size, cfg, spec) if counts[cfg.test_split] else None
    publish = work / "publish"
    shutil.rmtree(publish, ignore_errors=True)
    publish.mkdir(parents=True)
    model.save(publish / "model.keras")
    (publish / "summary.txt").write_text(text + "\n")
    shutil.copy(work / "history.csv", publish / "history.csv")
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
        "rows": counts,
        "epochs": epochs,
        "batch_size": batch_size,
        "input": "in_memory" if in_memory else "streamed",
        "epochs_run": len(history.get("loss", [])),
        "resumed_from_epoch": resume_epoch,
        "best_epoch": best_epoch,
        "validation": {k: _last_or_best(history, k, best_epoch) for k in history
                       if k.startswith("val_")},
        "fit_seconds": round(fit_seconds, 1),
        "params": int(model.count_params()),
    }
    if evaluation is not None:
        summary["test"] = evaluation
        (publish / "confusion_matrix.png").write_bytes(confusion_matrix_png(
            evaluation["confusion_matrix"], [str(i) for i in range(cfg.num_classes)],
            f"{title}: test top-1 {evaluation['top1']:.4f}"))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    (publish / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("cnn: test %s, fit %.1fs, wall %.1fs",
                {k: v for k, v in (evaluation or {}).items() if k in ("loss", "top1", "keras")},
                fit_seconds, summary["wall_seconds"])
    tracker.log_keras_model(model)
    return summary, publish


def _callbacks(cfg: CnnConfig, work: Path) -> list[Any]:
    import keras

    history = _read_history(work / "history.csv")
    previous = history.get(cfg.monitor)
    mode = "min" if "loss" in cfg.monitor else "max"
    best_so_far = None
    if previous:
        best_so_far = min(previous) if mode == "min" else max(previous)
    callbacks: list[Any] = [
        keras.callbacks.BackupAndRestore(str(work / "backup")),
        keras.callbacks.CSVLogger(str(work / "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(
            str(work / "best.weights.h5"), monitor=cfg.monitor, mode=mode,
            save_best_only=True, save_weights_only=True, initial_value_threshold=best_so_far,
        ),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: maybe_fail("cnn.epoch")),
    ]
    if cfg.early_stopping_patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=cfg.monitor, mode=mode, patience=cfg.early_stopping_patience))
    if cfg.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(
            str(work / "tensorboard"), write_graph=False, update_freq="epoch"))
    return callbacks


def _keras_verbose(progress: str) -> int:
    """Keras' own progress bar only on a terminal: elsewhere (a scheduler's log) it writes
    carriage returns and escapes; :class:`EpochProgress` logs plain lines instead."""
    return int(progress == "bar" and sys.stdout.isatty() and sys.stderr.isatty())


def _evaluate(model: Any, test: Any, batch_size: int, cfg: CnnConfig,
              spec: ArchitectureSpec) -> dict[str, Any]:
    """Keras' loss and metrics, and top-1 / per-class metrics from a streamed confusion matrix."""
    import numpy as np

    dataset = make_dataset(test, batch_size, cfg.num_classes, cfg.read_batch_rows)
    keras_metrics = model.evaluate(dataset, verbose=0, return_dict=True)
    matrix = np.zeros((cfg.num_classes, cfg.num_classes), np.int64)
    for images, onehot in dataset:
        predicted = np.argmax(model.predict_on_batch(images), axis=1)
        matrix += confusion_matrix(np.argmax(onehot.numpy(), axis=1), predicted, cfg.num_classes)
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


def _prepare_work_dir(work: Path, digest: str, resume: bool) -> int | None:
    """Keep the state of an interrupted identical run (returns its epoch) or start clean."""
    state = work / "run.json"
    metadata = work / "backup" / "training_metadata.json"
    if resume and metadata.exists() and state.exists():
        if json.loads(state.read_text()).get("digest") == digest:
            epoch = int(json.loads(metadata.read_text())["epoch"])
            logger.info("cnn: resuming an interrupted run from epoch %s (%s)", epoch, work)
            return epoch
        logger.warning("cnn: checkpoints in %s are from other settings; starting over", work)
    for name in ("backup", "tensorboard", "publish"):
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("history.csv", "best.weights.h5"):
        (work / name).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"digest": digest}))
    return None


def _read_history(path: Path) -> dict[str, list[float]]:
    if not path.exists():
        return {}
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    return {k: [float(r[k]) for r in rows] for k in keys}


def _best_epoch(history: dict[str, list[float]], monitor: str) -> int | None:
    values = history.get(monitor)
    if not values:
        return None
    pick = min if "loss" in monitor else max
    return 1 + values.index(pick(values))


def _last_or_best(history: dict[str, list[float]], key: str, best_epoch: int | None) -> float:
    values = history[key]
    return round(values[(best_epoch or len(values)) - 1], 6)

