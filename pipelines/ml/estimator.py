"""KerasImageEstimator: a Spark ML Estimator that trains a Keras image classifier.

The successor of sparkdl's ``KerasImageFileEstimator``. Image column (Spark's image struct) and
label column in; a fitted :class:`~pipelines.ml.classifier.KerasImageClassifier` out, whose
``.keras`` file is written to ``modelDir``. Where the training runs:

* ``numWorkers=0``: on the driver (the training set is collected there as ``uint8``), Keras
  ``fit`` (:mod:`pipelines.ml.training`);
* ``numWorkers=N``: N executor tasks training one model together, synchronously, with
  TensorFlow's ``MultiWorkerMirroredStrategy``; each task reads its own shard of the DataFrame
  (:func:`pipelines.ml.distributed.fit_multi_worker`);
* ``ensembleSize=K`` > 1: K members (seeds ``seed``, ``seed + 1``, ...) trained independently, as
  K Spark tasks in parallel when ``numWorkers`` > 0 (on the driver one after the other
  otherwise), and combined into one Keras model that averages their probabilities;
* :meth:`fitMultiple` (what ``CrossValidator`` and ``TrainValidationSplit`` call) trains all
  candidate param maps as parallel Spark tasks of one job, one model per task, when
  ``numWorkers`` > 0.

Validation: ``validationIndicatorCol`` (a boolean column; true rows validate, as in Spark's
gradient-boosted trees) or ``validationFraction`` (a seeded random share of the rows). The
validation rows are collected to the driver and given to every trainer: keep them small.

Fitting works on classic and Spark Connect sessions alike (DataFrame operations only; see
:mod:`pipelines.ml.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasInputCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasSeed,
)
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegralType

from pipelines.imaging.image_struct import is_image_struct
from pipelines.ml.architectures import ArchitectureSpec, builtin_names, resolve_architecture
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.training import TrainingPlan

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("", "constant", "cosine")


def _architecture(value: Any) -> str:
    """A built-in name, a spec (dict or JSON text) or a ``.keras`` path; checked when set."""
    if isinstance(value, dict):
        value = json.dumps(value)
    text = TypeConverters.toString(value)
    if text.lstrip().startswith("{"):
        try:
            ArchitectureSpec.model_validate_json(text)
        except ValueError as exc:
            raise ValueError(f"architecture is not a valid spec: {exc}. Received: {text[:200]!r}"
                             ) from None
    elif not text.endswith(".keras") and text not in builtin_names():
        raise ValueError(
            f"architecture must be one of {builtin_names()}, a spec as JSON or a .keras file. "
            f"Received: architecture={text!r}"
        )
    return text


def _at_least(minimum: int):
    def convert(value: Any) -> int:
        number = TypeConverters.toInt(value)
        if number < minimum:
            raise ValueError(f"must be >= {minimum}. Received: {value!r}")
        return number
    return convert


def _fraction(value: Any) -> float:
    number = TypeConverters.toFloat(value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"validationFraction must be in [0, 1). Received: {value!r}")
    return number


def _schedule(value: Any) -> str:
    text = TypeConverters.toString(value)
    if text not in LR_SCHEDULES:
        raise ValueError(f"lrSchedule must be one of {LR_SCHEDULES}. Received: {value!r}")
    return text


class _KerasImageEstimatorParams(HasInputCol, HasLabelCol, HasProbabilityCol, HasPredictionCol,
                                 HasSeed):
    architecture = Param(Params._dummy(), "architecture",
                         "built-in architecture name, an architecture spec as JSON, or a .keras "
                         "file to start from", typeConverter=_architecture)
    numClasses = Param(Params._dummy(), "numClasses",
                       "model outputs; 0 = largest label + 1", typeConverter=_at_least(0))
    epochs = Param(Params._dummy(), "epochs", "epochs; 0 = the architecture's",
                   typeConverter=_at_least(0))
    batchSize = Param(Params._dummy(), "batchSize",
                      "global batch size (split over the workers); 0 = the architecture's",
                      typeConverter=_at_least(0))
    learningRate = Param(Params._dummy(), "learningRate",
                         "peak learning rate; 0 = the architecture's",
                         typeConverter=TypeConverters.toFloat)
    lrSchedule = Param(Params._dummy(), "lrSchedule",
                       "constant or cosine (warm-up then cosine decay); '' = the architecture's",
                       typeConverter=_schedule)
    shiftPixels = Param(Params._dummy(), "shiftPixels",
                        "training images moved by up to this many pixels; -1 = the "
                        "architecture's", typeConverter=_at_least(-1))
    validationFraction = Param(Params._dummy(), "validationFraction",
                               "share of rows held out for validation when "
                               "validationIndicatorCol is not set", typeConverter=_fraction)
    validationIndicatorCol = Param(Params._dummy(), "validationIndicatorCol",
                                   "boolean column: true rows validate, false rows train",
                                   typeConverter=TypeConverters.toString)
    monitor = Param(Params._dummy(), "monitor",
                    "metric choosing the best epoch and early stopping (*loss minimised)",
                    typeConverter=TypeConverters.toString)
    earlyStoppingPatience = Param(Params._dummy(), "earlyStoppingPatience",
                                  "epochs without improvement before stopping; 0 = never",
                                  typeConverter=_at_least(0))
    numWorkers = Param(Params._dummy(), "numWorkers",
                       "0 = train on the driver; N = N executor tasks", typeConverter=_at_least(0))
    ensembleSize = Param(Params._dummy(), "ensembleSize",
                         "members trained with seeds seed, seed+1, ... and averaged",
                         typeConverter=_at_least(1))
    timeoutSeconds = Param(Params._dummy(), "timeoutSeconds",
                           "seconds a worker waits for its peers in a collective before failing",
                           typeConverter=TypeConverters.toFloat)
    modelDir = Param(Params._dummy(), "modelDir",
                     "driver-local folder for the fitted .keras files; '' = a new temp folder",
                     typeConverter=TypeConverters.toString)
    checkpointDir = Param(Params._dummy(), "checkpointDir",
                          "folder every executor reads and writes (a shared mount) for executor "
                          "training's epoch checkpoints; a retried or repeated fit resumes; "
                          "'' = none", typeConverter=TypeConverters.toString)
    tensorboardDir = Param(Params._dummy(), "tensorboardDir",
                           "folder for TensorBoard logs written as each epoch ends (executor "
                           "training: a folder the executors write, a shared mount); "
                           "'' = none", typeConverter=TypeConverters.toString)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._setDefault(
            inputCol="image", labelCol="label", probabilityCol="probability",
            predictionCol="prediction", seed=0, architecture="default", numClasses=0, epochs=0,
            batchSize=0, learningRate=0.0, lrSchedule="", shiftPixels=-1,
            validationFraction=0.0, validationIndicatorCol="", monitor="val_loss",
            earlyStoppingPatience=0, numWorkers=0, ensembleSize=1, timeoutSeconds=600.0,
            modelDir="", checkpointDir="", tensorboardDir="",
        )


class KerasImageEstimator(Estimator, _KerasImageEstimatorParams, DefaultParamsReadable,
                          DefaultParamsWritable):
    """Train a Keras image classifier on an image DataFrame; fits a ``KerasImageClassifier``.

    Args:
        inputCol: Spark image struct column (every image the architecture's height x width).
        labelCol: integer class labels in ``[0, numClasses)``.
        architecture: ``"seed"``, ``"default"`` (see ``architectures.yaml``), an
            :class:`~pipelines.ml.architectures.ArchitectureSpec` as JSON (or a dict), or a
            ``.keras`` file to continue training (trained with Adam and categorical
            cross-entropy).
        numClasses: model outputs; 0 = the largest label + 1.
        epochs, batchSize, learningRate, lrSchedule, shiftPixels: override the architecture's
            (0, 0, 0.0, '' and -1 keep it). ``batchSize`` is global: each of N workers takes
            ``batchSize / N`` rows per step.
        validationFraction, validationIndicatorCol: validation rows (see the module doc).
        monitor, earlyStoppingPatience: best-epoch metric and early stopping.
        seed: seeds initialisation, shuffling and augmentation (member i of an ensemble:
            ``seed + i``).
        numWorkers: 0 = the driver; N = N executor tasks (needs N free task slots).
        ensembleSize: K > 1 trains K members and averages their probabilities.
        timeoutSeconds: how long a worker waits for its peers before it fails the fit.
        modelDir: where the fitted ``.keras`` files go (driver-local).
        checkpointDir: executor training (``numWorkers`` > 0) keeps each epoch's state here, in
            a folder per model named by its plan, worker count and training rows, so a barrier
            stage that Spark retries, a retried task, or the same fit run again, resumes from
            the last finished epoch; removed when the fit ends. Every executor must see the
            same folder (a shared file system mount). ``''``: no checkpoints.
        tensorboardDir: TensorBoard logs of each epoch's metrics, written while training (the
            epoch scalars of Keras' ``TensorBoard`` callback: ``train/`` and ``validation/``
            runs). On the driver by that callback; on the executors by the multi-worker chief,
            or by each task's callback, so with ``numWorkers`` > 0 it must be a folder the
            executors write and the user's TensorBoard reads (a shared mount). An ensemble
            writes one run per member (``member-<i>/``); each ``fitMultiple`` call one per
            param map (``fit-<id>/model-<i>/``, a new id per call, so a ``CrossValidator``'s
            folds keep apart). ``''``: no logs (``trainingSummary["history"]`` has the same
            values once the fit ends).
        probabilityCol, predictionCol: output columns of the fitted classifier.
    """

    @keyword_only
    def __init__(self, *, inputCol=None, labelCol=None, probabilityCol=None, predictionCol=None,
                 architecture=None, numClasses=None, epochs=None, batchSize=None,
                 learningRate=None, lrSchedule=None, shiftPixels=None, validationFraction=None,
                 validationIndicatorCol=None, monitor=None, earlyStoppingPatience=None,
                 seed=None, numWorkers=None, ensembleSize=None, timeoutSeconds=None,
                 modelDir=None, checkpointDir=None, tensorboardDir=None):
        super().__init__()
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, inputCol=None, labelCol=None, probabilityCol=None,
                  predictionCol=None, architecture=None, numClasses=None, epochs=None,
                  batchSize=None, learningRate=None, lrSchedule=None, shiftPixels=None,
                  validationFraction=None, validationIndicatorCol=None, monitor=None,
                  earlyStoppingPatience=None, seed=None, numWorkers=None, ensembleSize=None,
                  timeoutSeconds=None, modelDir=None, checkpointDir=None,
                  tensorboardDir=None):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def setArchitecture(self, value: str | dict) -> KerasImageEstimator:
        return self._set(architecture=value)

    def setEpochs(self, value: int) -> KerasImageEstimator:
        return self._set(epochs=value)

    def setLearningRate(self, value: float) -> KerasImageEstimator:
        return self._set(learningRate=value)

    def setNumWorkers(self, value: int) -> KerasImageEstimator:
        return self._set(numWorkers=value)

    def setEnsembleSize(self, value: int) -> KerasImageEstimator:
        return self._set(ensembleSize=value)

    def setModelDir(self, value: str) -> KerasImageEstimator:
        return self._set(modelDir=value)

    def setCheckpointDir(self, value: str) -> KerasImageEstimator:
        return self._set(checkpointDir=value)

    def setTensorboardDir(self, value: str) -> KerasImageEstimator:
        return self._set(tensorboardDir=value)

    # ----------------------------------------------------------------------- fitting

    def _fit(self, dataset: DataFrame) -> KerasImageClassifier:
        self._check_folders()
        inputs = self._inputs(dataset)
        workers = self.getOrDefault(self.numWorkers)
        members = self.getOrDefault(self.ensembleSize)
        plan = self._plan(inputs.num_classes, bool(inputs.validation_rows))
        logger.info("fitting %s: %s epochs, batch %s, %s classes, %s, ensemble of %s",
                    self.uid, plan.epochs, plan.batch_size, plan.num_classes,
                    f"{workers} executor workers" if workers else "on the driver", members)
        if members > 1:
            plans = [dataclasses.replace(plan, seed=plan.seed + i) for i in range(members)]
            boards = [self._tensorboard_dir(f"member-{i}") for i in range(members)]
            trained = self._train_independent(dataset, inputs, plans, boards)
            return self._ensemble_model(trained, plan)
        if workers == 0:
            (trained,) = self._train_independent(dataset, inputs, [plan],
                                                 [self._tensorboard_dir()])
        else:
            from pipelines.ml.distributed import fit_multi_worker

            outputs = fit_multi_worker(inputs.train_frame, plan, inputs.validation(), workers,
                                       self.getOrDefault(self.timeoutSeconds),
                                       self._checkpoint_dir(), self._tensorboard_dir())
            trained = (outputs[0].model, {**outputs[0].result,
                                          "digests": [o.result["digest"] for o in outputs],
                                          "worker_cores": [o.result["cores"] for o in outputs]})
        return self._classifier([trained], plan)

    def fitMultiple(self, dataset: DataFrame, paramMaps):
        """Models for every param map; with ``numWorkers`` > 0, trained as parallel tasks.

        All candidates train in one Spark job, one model per task, each on a full copy of the
        training rows that Spark delivers to its task, so ``CrossValidator``
        and ``TrainValidationSplit`` tune across the executors. Candidates with
        ``ensembleSize`` > 1, or ``numWorkers=0``, are fitted one by one as ``fit`` does.
        """
        from pyspark.ml.base import _FitMultipleIterator

        estimators = [self.copy(m) for m in paramMaps]
        # One TensorBoard run per candidate, under a folder per call (a CrossValidator calls
        # once per fold, and its folds must not write into each other's runs).
        call = f"fit-{uuid.uuid4().hex[:8]}"
        for i, estimator in enumerate(estimators):
            if estimator.getOrDefault(estimator.tensorboardDir):
                estimator._set(tensorboardDir=estimator._tensorboard_dir(f"{call}/model-{i}"))
        parallel = self.getOrDefault(self.numWorkers) > 0 and all(
            e.getOrDefault(e.ensembleSize) == 1 for e in estimators)
        if not parallel or len(estimators) < 2:
            return _FitMultipleIterator(lambda index: estimators[index].fit(dataset),
                                        len(estimators))
        lock = threading.Lock()
        fitted: list[KerasImageClassifier] = []

        def fit_one(index: int) -> KerasImageClassifier:
            with lock:
                if not fitted:
                    fitted.extend(self._fit_in_tasks(dataset, estimators))
            return fitted[index]

        return _FitMultipleIterator(fit_one, len(estimators))

    def _fit_in_tasks(self, dataset: DataFrame, estimators: list[KerasImageEstimator]
                      ) -> list[KerasImageClassifier]:
        from pipelines.ml.distributed import fit_independent

        for estimator in estimators:
            estimator._check_folders()
        inputs = self._inputs(dataset)
        plans = [e._plan(inputs.num_classes, bool(inputs.validation_rows)) for e in estimators]
        logger.info("fitting %s candidates as parallel Spark tasks", len(plans))
        outputs = fit_independent(inputs.train_frame, plans, inputs.validation(),
                                  self.getOrDefault(self.timeoutSeconds), self._checkpoint_dir(),
                                  [e._tensorboard_dir() for e in estimators])
        return [e._classifier([(o.model, o.result)], plan)
                for e, o, plan in zip(estimators, outputs, plans, strict=True)]

    def _train_independent(self, dataset: DataFrame, inputs: _Inputs,
                           plans: list[TrainingPlan], boards: list[str | None]
                           ) -> list[tuple[bytes, dict[str, Any]]]:
        """Each plan trained on the whole training set: as tasks, or on the driver in turn;
        ``boards``: each plan's TensorBoard folder (or None)."""
        if self.getOrDefault(self.numWorkers) > 0:
            from pipelines.ml.distributed import fit_independent

            outputs = fit_independent(inputs.train_frame, plans, inputs.validation(),
                                      self.getOrDefault(self.timeoutSeconds),
                                      self._checkpoint_dir(), boards)
            return [(o.model, o.result) for o in outputs]
        return [_train_on_driver(plan, inputs.train_arrays(), inputs.validation(), board)
                for plan, board in zip(plans, boards, strict=True)]

    # ----------------------------------------------------------------------- resolving

    def _plan(self, num_classes: int, validation: bool = True) -> TrainingPlan:
        """Every Param resolved to plain values on the driver (nothing of ``self`` is shipped).

        Without validation rows a ``val_*`` monitor falls back to the training metric.
        """
        text = self.getOrDefault(self.architecture)
        start = None
        if text.lstrip().startswith("{"):
            spec = ArchitectureSpec.model_validate_json(text)
        elif text.endswith(".keras"):
            start = _local_model(text)
            spec = _spec_for_start_model(start)
        else:
            spec = resolve_architecture(text)
        update: dict[str, Any] = {}
        for param, key in ((self.epochs, "epochs"), (self.batchSize, "batch_size")):
            if self.getOrDefault(param) > 0:
                update[key] = self.getOrDefault(param)
        if self.getOrDefault(self.learningRate) > 0:
            update["learning_rate"] = self.getOrDefault(self.learningRate)
        if self.getOrDefault(self.lrSchedule):
            update["lr_schedule"] = self.getOrDefault(self.lrSchedule)
        if self.getOrDefault(self.shiftPixels) >= 0:
            update["shift_pixels"] = self.getOrDefault(self.shiftPixels)
        spec = ArchitectureSpec.model_validate({**spec.model_dump(), **update})
        patience = self.getOrDefault(self.earlyStoppingPatience) or None
        workers = self.getOrDefault(self.numWorkers)
        if workers > 1 and spec.batch_size % workers:
            raise ValueError(
                f"batchSize must be a multiple of numWorkers (each worker takes an equal share "
                f"of the global batch). Received: batchSize={spec.batch_size}, "
                f"numWorkers={workers}"
            )
        monitor = self.getOrDefault(self.monitor)
        if not validation and monitor.startswith("val_"):
            monitor = monitor.removeprefix("val_")
        return TrainingPlan(spec=spec, num_classes=num_classes, seed=self.getOrDefault(self.seed),
                            start_model=start, monitor=monitor, patience=patience)

    def _inputs(self, dataset: DataFrame) -> _Inputs:
        column = self.getOrDefault(self.inputCol)
        label = self.getOrDefault(self.labelCol)
        indicator = self.getOrDefault(self.validationIndicatorCol)
        for name in (column, label, *([indicator] if indicator else [])):
            if name not in dataset.columns:
                raise ValueError(f"column {name!r} is not in the DataFrame. "
                                 f"Received columns: {dataset.columns}")
        if not is_image_struct(dataset.schema[column].dataType):
            raise TypeError(f"inputCol {column!r} must hold Spark's image struct. "
                            f"Received: {dataset.schema[column].dataType.simpleString()}")
        if not isinstance(dataset.schema[label].dataType, IntegralType):
            raise TypeError(f"labelCol {label!r} must hold integers. "
                            f"Received: {dataset.schema[label].dataType.simpleString()}")
        if indicator and not isinstance(dataset.schema[indicator].dataType, BooleanType):
            raise TypeError(f"validationIndicatorCol {indicator!r} must be boolean. "
                            f"Received: {dataset.schema[indicator].dataType.simpleString()}")
        frame = dataset.select(
            F.col(label).cast("int").alias("label"),
            F.col(f"{column}.data").alias("data"),
            F.col(f"{column}.height").alias("height"),
            F.col(f"{column}.width").alias("width"),
            F.col(f"{column}.nChannels").alias("channels"),
            (F.col(indicator) if indicator else F.lit(False)).alias("_validation"),
        )
        fraction = self.getOrDefault(self.validationFraction)
        if not indicator and fraction > 0:
            frame = frame.withColumn(
                "_validation", F.rand(self.getOrDefault(self.seed)) < F.lit(fraction))
        stats = frame.agg(F.min("label").alias("low"), F.max("label").alias("high"),
                          F.count(F.lit(1)).alias("rows"),
                          F.sum(F.col("_validation").cast("int")).alias("validation")).first()
        if not stats["rows"]:
            raise ValueError("the DataFrame has no rows to train on. Received: 0 rows")
        configured = self.getOrDefault(self.numClasses)
        classes = configured or int(stats["high"]) + 1
        if stats["low"] < 0 or stats["high"] >= classes or classes < 2:
            raise ValueError(
                f"labels must be in [0, numClasses={classes}) with numClasses >= 2. "
                f"Received labels from {stats['low']} to {stats['high']}")
        spec = self._plan(classes).spec
        return _Inputs(frame, classes, tuple(spec.input_shape), int(stats["validation"] or 0))

    # ----------------------------------------------------------------------- the fitted model

    def _check_folders(self) -> None:
        """Creates ``checkpointDir`` and ``tensorboardDir`` before any training starts: a folder
        that cannot be written would otherwise fail the fit only once the first epoch ends."""
        for name, folder in (("checkpointDir", self._checkpoint_dir()),
                             ("tensorboardDir", self._tensorboard_dir())):
            if not folder:
                continue
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"{name} must be a folder this process can create and write "
                                 f"({exc.strerror}). Received: {name}={folder!r}") from exc
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"{name} must be a folder this process can write (permission "
                                 f"denied). Received: {name}={folder!r}")

    def _checkpoint_dir(self) -> str | None:
        return self.getOrDefault(self.checkpointDir).removeprefix("file://") or None

    def _tensorboard_dir(self, run: str = "") -> str | None:
        """``tensorboardDir`` (its sub-folder ``run``), or None when it is not set."""
        folder = self.getOrDefault(self.tensorboardDir).removeprefix("file://")
        if not folder:
            return None
        return str(Path(folder) / run) if run else folder

    def _model_dir(self) -> Path:
        folder = self.getOrDefault(self.modelDir)
        path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="keras-estimator-"))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _classifier(self, trained: list[tuple[bytes, dict[str, Any]]],
                    plan: TrainingPlan) -> KerasImageClassifier:
        (model_bytes, result), = trained
        path = self._model_dir() / f"{self.uid}-{uuid.uuid4().hex[:8]}.keras"
        path.write_bytes(model_bytes)
        return self._wrap(path, plan, result)

    def _ensemble_model(self, trained: list[tuple[bytes, dict[str, Any]]],
                        plan: TrainingPlan) -> KerasImageClassifier:
        folder = self._model_dir()
        stem = f"{self.uid}-{uuid.uuid4().hex[:8]}"
        paths = []
        for i, (model_bytes, _) in enumerate(trained):
            paths.append(folder / f"{stem}-member{i}.keras")
            paths[-1].write_bytes(model_bytes)
        path = folder / f"{stem}.keras"
        average_models([str(p) for p in paths], str(path))
        summary = {"members": [r for _, r in trained],
                   "member_models": [str(p) for p in paths]}
        return self._wrap(path, plan, summary)

    def _wrap(self, path: Path, plan: TrainingPlan, summary: dict[str, Any]
              ) -> KerasImageClassifier:
        model = KerasImageClassifier(
            modelPath=str(path), inputCol=self.getOrDefault(self.inputCol),
            probabilityCol=self.getOrDefault(self.probabilityCol),
            predictionCol=self.getOrDefault(self.predictionCol))
        # Not Params: what the fit did, for the caller's reports (not saved with the model).
        model.trainingSummary = {**summary, "plan": json.loads(plan.to_json())}
        return model


class _Inputs:
    """The estimator's input rows as (label, data, height, width, channels, _validation)."""

    def __init__(self, frame: DataFrame, num_classes: int, shape: tuple[int, int, int],
                 validation_rows: int) -> None:
        self.frame = frame
        self.num_classes = num_classes
        self.shape = shape
        self.validation_rows = validation_rows
        self._train: tuple[np.ndarray, np.ndarray] | None = None
        self._validation: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def train_frame(self) -> DataFrame:
        return self.frame.where(~F.col("_validation")).drop("_validation")

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._train is None:
            self._train = _collect(self.train_frame, self.shape, "training rows")
        return self._train

    def validation(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.validation_rows:
            return None
        if self._validation is None:
            rows = self.frame.where(F.col("_validation")).drop("_validation")
            self._validation = _collect(rows, self.shape, "validation rows")
        return self._validation


def _collect(frame: DataFrame, shape: tuple[int, int, int], where: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (uint8 images, int32 labels) on the driver, through Arrow."""
    from pipelines.ml.datasets import decode_batch

    images, labels = [], []
    for batch in frame.toArrow().to_batches():
        if batch.num_rows:
            x, y = decode_batch(batch, shape, where)
            images.append(np.array(x))
            labels.append(np.array(y))
    if not images:
        raise ValueError(f"no {where} to train on. Received: 0 rows")
    return np.concatenate(images), np.concatenate(labels)


def _train_on_driver(plan: TrainingPlan, train: tuple[np.ndarray, np.ndarray],
                     validation: tuple[np.ndarray, np.ndarray] | None, tensorboard: str | None
                     ) -> tuple[bytes, dict[str, Any]]:
    from pipelines.ml.datasets import array_dataset
    from pipelines.ml.distributed import weights_digest
    from pipelines.ml.models import steps
    from pipelines.ml.training import prepare_work_dir, train_model

    with tempfile.TemporaryDirectory(prefix="keras-estimator-") as tmp:
        work = Path(tmp)
        prepare_work_dir(work / "state", "driver", resume=False)
        train_ds = array_dataset(*train, plan.batch_size, plan.num_classes, plan.seed,
                                 plan.spec.shift_pixels, plan.spec.elastic_distortion)
        val_ds = (array_dataset(*validation, plan.batch_size, plan.num_classes)
                  if validation else None)
        result = train_model(plan, train_ds, val_ds, steps(len(train[1]), plan.batch_size),
                             work / "state",
                             tensorboard=Path(tensorboard) if tensorboard else None)
        result.model.save(work / "model.keras")
        summary = {"history": result.history, "best_epoch": result.best_epoch,
                   "fit_seconds": result.fit_seconds, "epoch_seconds": result.epoch_seconds,
                   "digest": weights_digest(result.model.get_weights()), "workers": 0,
                   "rows": len(train[1])}
        return (work / "model.keras").read_bytes(), summary


def _local_model(path: str) -> str:
    local = Path(path.removeprefix("file://"))
    if not local.is_file():
        raise FileNotFoundError(f"no .keras file to start from. Received: architecture={path!r}")
    return str(local)


def _spec_for_start_model(path: str) -> ArchitectureSpec:
    """Training settings for a ``.keras`` start model: its input shape, Adam, categorical CE."""
    import keras

    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3:
        raise ValueError(f"the start model must take images (H, W, C). "
                         f"Received: input_shape={model.input_shape} ({path})")
    return ArchitectureSpec(input_shape=shape, layers=[{"Identity": {}}],
                            learning_rate=1e-3, epochs=1)


def average_models(paths: list[str], out: str) -> None:
    """One Keras model whose output is the mean of the models' outputs, saved to ``out``.

    Loadable with ``safe_mode=True`` like any single model, so ``KerasImageClassifier`` scores
    an ensemble as it scores one network (one ``predict`` per batch runs every member).
    """
    import keras

    members = [keras.saving.load_model(p, safe_mode=True, compile=False) for p in paths]
    shapes = {tuple(m.input_shape) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members must share one input shape. Received: {shapes}")
    for i, member in enumerate(members):
        member.name = f"member_{i}"
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    outputs = keras.layers.Average(name="mean_probability")([m(inputs) for m in members])
    keras.Model(inputs, outputs, name=f"ensemble_of_{len(members)}").save(out)
