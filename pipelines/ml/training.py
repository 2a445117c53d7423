"""Training one Keras image classifier in one process: on the driver, or in one executor task.

Shared by the ``train_cnn`` job and :class:`~pipelines.ml.estimator.KerasImageEstimator`
(``numWorkers=0``, and every ensemble member or tuning candidate trained as its own Spark task):

* :class:`TrainingPlan` holds everything that decides what is trained, resolved to plain values
  on the driver (the architecture spec with its epochs, batch size, learning-rate schedule and
  shift augmentation; the classes; the seed; an optional ``.keras`` model to start from), so it
  can be shipped to executors as JSON;
* :func:`train_model` builds and compiles the model, runs Keras ``fit`` with validation each
  epoch, keeps the best epoch by ``monitor``, stops early, and (in a work folder) writes what a
  rerun needs to resume: Keras' ``BackupAndRestore`` state, ``history.csv`` and the best weights.

Multi-worker training on the executors has its own loop (:mod:`pipelines.ml.distributed`).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.ml.architectures import ArchitectureSpec
from pipelines.ml.models import build_architecture, compile_model

logger = logging.getLogger(__name__)
#: One line per epoch, on its own logger so a relay (or a user) can tell epoch lines apart.
epoch_logger = logging.getLogger(f"{__name__}.epochs")


@dataclass(frozen=True)
class TrainingPlan:
    """What one training run trains, as plain values (JSON round-trip: :meth:`to_json`).

    Args:
        spec: the architecture and its training settings (epochs, batch size, learning rate
            and schedule, shift augmentation), already overridden by the caller's settings.
        num_classes: model outputs; labels are in ``[0, num_classes)``.
        seed: seeds Python, numpy, TensorFlow and the shuffle order.
        start_model: a local ``.keras`` file to start from instead of building ``spec``'s
            layers (its input and output shapes must fit the data).
        monitor: metric for the best epoch and early stopping (``*loss`` minimised).
        patience: epochs without improvement before stopping; ``None`` never stops early.
        deterministic: TensorFlow's deterministic ops.
    """

    spec: ArchitectureSpec
    num_classes: int
    seed: int = 0
    start_model: str | None = None
    monitor: str = "val_loss"
    patience: int | None = None
    deterministic: bool = False

    @property
    def epochs(self) -> int:
        return self.spec.epochs

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["spec"] = self.spec.model_dump(mode="json")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingPlan:
        data = json.loads(text)
        data["spec"] = ArchitectureSpec.model_validate(data["spec"])
        return cls(**data)


@dataclass
class TrainResult:
    """A trained model (best epoch's weights) and how it got there."""

    model: Any
    history: dict[str, list[float]]
    best_epoch: int | None
    fit_seconds: float
    resumed_from_epoch: int | None = None
    epoch_seconds: list[float] = field(default_factory=list)


def build_model(plan: TrainingPlan, steps_per_epoch: int, compile: bool = True) -> Any:
    """The plan's model, compiled with its loss, optimizer, schedule and metrics (+ top-1).

    Raises:
        ValueError: a start model whose output is not ``(None, num_classes)``.
    """
    import keras

    if plan.start_model:
        model = keras.saving.load_model(plan.start_model, safe_mode=True, compile=False)
        if tuple(model.output_shape) != (None, plan.num_classes):
            raise ValueError(
                f"the start model must output (None, num_classes={plan.num_classes}). "
                f"Received: output_shape={model.output_shape} ({plan.start_model})"
            )
    else:
        model = build_architecture(plan.spec, plan.num_classes)
    if compile:
        compile_model(model, plan.spec, steps_per_epoch, plan.epochs)
    return model


def seed_everything(plan: TrainingPlan) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(plan.seed)
    if plan.deterministic:
        tf.config.experimental.enable_op_determinism()


def train_model(
    plan: TrainingPlan, train_ds: Any, val_ds: Any, steps_per_epoch: int, work: Path, *,
    verbose: int = 0, tensorboard: Path | None = None, resumed_from_epoch: int | None = None,
    extra_callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Keras ``fit`` with validation every epoch; returns the model with its best epoch's weights.

    ``work`` holds the resumable state (prepared by :func:`prepare_work_dir`); ``val_ds`` may be
    ``None`` (no validation: the last epoch is kept, ``monitor`` must then be a training metric).
    ``tensorboard``: a folder for Keras' ``TensorBoard`` callback, or None.
    ``extra_callbacks`` are added after the others (the job's failpoint, for example).
    """
    seed_everything(plan)
    model = build_model(plan, steps_per_epoch)
    callbacks = epoch_callbacks(work, plan.monitor, plan.patience, tensorboard)
    timer = epoch_timer()
    callbacks += [timer, *extra_callbacks]
    started = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=plan.epochs, callbacks=callbacks,
              shuffle=False, verbose=verbose)
    fit_seconds = time.perf_counter() - started
    history = read_history(work / "history.csv")
    best = work / "best.weights.h5"
    if best.exists():
        model.load_weights(str(best))
    return TrainResult(model, history, best_epoch(history, plan.monitor), fit_seconds,
                       resumed_from_epoch, timer.seconds)


def epoch_callbacks(work: Path, monitor: str, patience: int | None,
                    tensorboard: Path | None) -> list[Any]:
    """Resumable state, history, best weights, per-epoch log lines, early stopping, TensorBoard."""
    import keras

    history = read_history(work / "history.csv")
    previous = history.get(monitor)
    mode = "min" if "loss" in monitor else "max"
    best_so_far = None
    if previous:
        best_so_far = min(previous) if mode == "min" else max(previous)
    callbacks: list[Any] = [
        keras.callbacks.BackupAndRestore(str(work / "backup")),
        keras.callbacks.CSVLogger(str(work / "history.csv"), append=True),
        keras.callbacks.ModelCheckpoint(
            str(work / "best.weights.h5"), monitor=monitor, mode=mode,
            save_best_only=True, save_weights_only=True, initial_value_threshold=best_so_far,
        ),
        keras.callbacks.LambdaCallback(on_epoch_end=log_epoch),
    ]
    if patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                                       patience=patience))
    if tensorboard is not None:
        callbacks.append(keras.callbacks.TensorBoard(
            str(tensorboard), write_graph=False, update_freq="epoch"))
    return callbacks


def epoch_timer() -> Any:
    """A Keras callback whose ``seconds`` list gets each epoch's wall seconds."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def log_epoch(epoch: int, logs: dict[str, Any] | None) -> None:
    shown = ", ".join(f"{k}={float(v):.4f}" for k, v in sorted((logs or {}).items()))
    epoch_logger.info("epoch %s: %s", epoch + 1, shown)


def prepare_work_dir(work: Path, digest: str, resume: bool) -> int | None:
    """Keep the state of an interrupted run with the same ``digest`` (returns its epoch), or
    start clean."""
    state = work / "run.json"
    metadata = work / "backup" / "training_metadata.json"
    if resume and metadata.exists() and state.exists():
        if json.loads(state.read_text()).get("digest") == digest:
            epoch = int(json.loads(metadata.read_text())["epoch"])
            logger.info("resuming an interrupted run from epoch %s (%s)", epoch, work)
            return epoch
        logger.warning("checkpoints in %s are from other settings; starting over", work)
    for name in ("backup", "tensorboard", "publish"):
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("history.csv", "best.weights.h5"):
        (work / name).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"digest": digest}))
    return None


def read_history(path: Path) -> dict[str, list[float]]:
    """``history.csv`` (Keras' ``CSVLogger``) -> metric -> value per epoch."""
    if not path.exists():
        return {}
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    # Keras' CSVLogger adds val_* columns filled with "NA" when there is no validation data.
    return {k: [float(r[k]) for r in rows] for k in keys
            if not any(r[k] in ("NA", "", None) for r in rows)}


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """The inverse of :func:`read_history` (epochs numbered from 0, as ``CSVLogger`` does)."""
    keys = sorted(history)
    epochs = len(next(iter(history.values()), []))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *keys])
        for i in range(epochs):
            writer.writerow([i, *(history[k][i] for k in keys)])


class EpochScalars:
    """Per-epoch scalars as TensorBoard logs, laid out as Keras' ``TensorBoard`` callback lays
    out ``update_freq="epoch"``: ``train/`` and ``validation/`` runs (``val_`` dropped), tags
    ``epoch_<metric>``, steps from 0. Each :meth:`write` is flushed, so TensorBoard shows an
    epoch as soon as it ends.

    For training loops without Keras callbacks (the multi-worker chief) and for histories that
    come back as values (:func:`write_tensorboard`).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writers: dict[str, Any] = {}

    def write(self, epoch: int, logs: dict[str, float]) -> None:
        import tensorflow as tf

        runs = {"train": {k: v for k, v in logs.items() if not k.startswith("val_")},
                "validation": {k[4:]: v for k, v in logs.items() if k.startswith("val_")}}
        for run, metrics in runs.items():
            if not metrics:
                continue
            if run not in self._writers:
                self._writers[run] = tf.summary.create_file_writer(str(self.log_dir / run))
            with self._writers[run].as_default():
                for name, value in sorted(metrics.items()):
                    tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
            self._writers[run].flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def write_tensorboard(log_dir: Path, history: dict[str, list[float]]) -> None:
    """Every epoch of ``history`` through :class:`EpochScalars`: for training whose history
    comes back as values (executor tasks without a shared ``tensorboardDir``)."""
    scalars = EpochScalars(log_dir)
    epochs = len(next(iter(history.values()), []))
    for epoch in range(epochs):
        scalars.write(epoch, {k: v[epoch] for k, v in history.items()})
    scalars.close()


def best_epoch(history: dict[str, list[float]], monitor: str) -> int | None:
    """1-based epoch with the best ``monitor`` value (the first of ties), or None."""
    values = history.get(monitor)
    if not values:
        return None
    pick = min if "loss" in monitor else max
    return 1 + values.index(pick(values))


def last_or_best(history: dict[str, list[float]], key: str, best: int | None) -> float:
    values = history[key]
    return round(values[(best or len(values)) - 1], 6)
