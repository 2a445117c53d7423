"""KerasImageClassifier: a saved Keras classifier applied to an image column on the executors.

The successor of sparkdl's ``KerasImageFileTransformer`` / ``KerasTransformer``. The ``.keras``
file named by ``modelPath`` (a local path or any URI Spark reads: ``hdfs://``, ``s3a://``, ...)
is shipped to the workers with ``SparkContext.addFile`` under a name derived from its content,
and loaded once per Python worker by ``predict_batch_udf`` with Keras ``safe_mode=True`` (no code
in the file is ever run). The driver loads it once too, to check it and read its input shape.

Input: Spark's image struct or encoded image bytes (``binaryFile``'s ``content``). One
``predict_batch_udf`` (:func:`~pipelines.ml.inference.image_predict_udf`) gets the images and
converts each batch to the model's input height, width and channels right before ``predict``.
Output: ``probabilityCol`` (a Spark ML vector of the model's outputs) and ``predictionCol``
(the arg-max index as a double, as Spark ML classifiers give). Rows whose image is null or
cannot be decoded get nulls in both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pyspark import SparkFiles, keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasPredictionCol, HasProbabilityCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

from pipelines.imaging.resize import RESIZE_METHODS
from pipelines.ml.inference import (
    VALID,
    InputKind,
    image_inputs,
    image_predict_udf,
    input_kind,
)
from pipelines.ml.model_cache import get_or_build, model_key

logger = logging.getLogger(__name__)

#: Model files already given to ``addFile``, by application id (a cache, not configuration).
_SHIPPED: dict[str, set[str]] = {}


class KerasImageClassifier(Transformer, HasInputCol, HasProbabilityCol, HasPredictionCol,
                           DefaultParamsReadable, DefaultParamsWritable):
    """Score images with a saved Keras classifier (``.keras`` file).

    Args:
        modelPath: the ``.keras`` file; a local path or a URI Spark can read.
        inputCol: image struct or encoded image bytes column.
        probabilityCol: output vector of the model's outputs (probabilities for softmax).
        predictionCol: output arg-max class index (double).
        batchSize: images per ``predict`` call on a worker, > 0.
        scale: pixel values in [0, 255] are multiplied by this before the model.
        scaleHint: resampling when the image size differs from the model input
            (nearest, bilinear, bicubic, lanczos, area).
    """

    modelPath = Param(Params._dummy(), "modelPath", "the .keras model file (path or URI)",
                      typeConverter=TypeConverters.toString)
    batchSize = Param(Params._dummy(), "batchSize", "images per predict call (> 0)",
                      typeConverter=TypeConverters.toInt)
    scale = Param(Params._dummy(), "scale", "multiplier of [0, 255] pixel values",
                  typeConverter=TypeConverters.toFloat)
    scaleHint = Param(Params._dummy(), "scaleHint", f"resize method, one of {RESIZE_METHODS}",
                      typeConverter=TypeConverters.toString)

    @keyword_only
    def __init__(self, *, modelPath="", inputCol="image", probabilityCol="probability",
                 predictionCol="prediction", batchSize=256, scale=1.0 / 255.0,
                 scaleHint="bilinear"):
        super().__init__()
        self._setDefault(modelPath="", inputCol="image", probabilityCol="probability",
                         predictionCol="prediction", batchSize=256, scale=1.0 / 255.0,
                         scaleHint="bilinear")
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, modelPath="", inputCol="image", probabilityCol="probability",
                  predictionCol="prediction", batchSize=256, scale=1.0 / 255.0,
                  scaleHint="bilinear"):
        return self._set(**self._input_kwargs)

    def setModelPath(self, value: str) -> KerasImageClassifier:
        return self._set(modelPath=value)

    def getModelPath(self) -> str:
        return self.getOrDefault(self.modelPath)

    def setInputCol(self, value: str) -> KerasImageClassifier:
        return self._set(inputCol=value)

    def setBatchSize(self, value: int) -> KerasImageClassifier:
        return self._set(batchSize=value)

    def setScale(self, value: float) -> KerasImageClassifier:
        return self._set(scale=value)

    def setScaleHint(self, value: str) -> KerasImageClassifier:
        return self._set(scaleHint=value)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        path = self.getOrDefault(self.modelPath)
        column = self.getOrDefault(self.inputCol)
        prob_col = self.getOrDefault(self.probabilityCol)
        pred_col = self.getOrDefault(self.predictionCol)
        batch_size = self.getOrDefault(self.batchSize)
        scale = float(self.getOrDefault(self.scale))
        method = self.getOrDefault(self.scaleHint)
        if batch_size <= 0:
            raise ValueError(f"batchSize must be > 0. Received: batchSize={batch_size}")
        if method not in RESIZE_METHODS:
            raise ValueError(f"scaleHint must be one of {RESIZE_METHODS}. Received: {method!r}")
        if column not in dataset.columns:
            raise ValueError(
                f"inputCol {column!r} is not a column of the DataFrame. "
                f"Received columns: {dataset.columns}"
            )
        kind = input_kind(dataset.schema[column].dataType, column)
        spark = dataset.sparkSession
        file_name, (height, width, channels, classes) = prepared_model(spark, path)
        logger.info("scoring %r with %s (input %sx%sx%s, %s outputs, batch %s)",
                    column, path, height, width, channels, classes, batch_size)

        scored = _predict_udf(file_name, kind, (height, width, channels), scale, batch_size,
                              method)
        tmp = f"__keras_scorer_{self.uid}"
        out = dataset.withColumn(tmp, scored(*image_inputs(column, kind)))
        valid = F.col(tmp)[VALID] == 1
        out = out.withColumn(
            prob_col, F.when(valid, array_to_vector(F.col(tmp)["probability"]))
        ).withColumn(
            pred_col, F.when(valid, F.col(tmp)["prediction"].cast("double"))
        )
        return out.drop(tmp)


#: What the model side of the UDF returns per image (see :func:`_predict_udf`).
OUTPUTS = StructType([
    StructField("probability", ArrayType(FloatType()), True),
    StructField("prediction", IntegerType(), True),
])


def _predict_udf(file_name: str, kind: InputKind, shape: tuple[int, int, int], scale: float,
                 batch_size: int, method: str):
    """The ``predict_batch_udf``; its closure holds plain values only (no ``self``).

    ``file_name`` names the model by its content, so the same key means the same model: later
    ``transform`` calls reuse the UDF, and workers keep the model loaded.
    """

    def make_predict_fn():
        def load():
            import keras  # on the worker, once per model (see pipelines.ml.model_cache)

            return keras.saving.load_model(SparkFiles.get(file_name), safe_mode=True,
                                           compile=False)

        model = get_or_build(model_key("file", digest=file_name), load)

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            batch = np.multiply(images, np.float32(scale), dtype=np.float32)
            outputs = np.asarray(model.predict_on_batch(batch), dtype=np.float32)
            return {"probability": outputs, "prediction": outputs.argmax(axis=1).astype(np.int32)}

        return predict

    return image_predict_udf(make_predict_fn, kind, shape, method, OUTPUTS, batch_size)


#: (modelPath, its size and modification time) -> (shipped file name, model signature).
_PREPARED: dict[tuple, tuple[str, tuple[int, int, int, int]]] = {}


def prepared_model(spark: SparkSession, path: str) -> tuple[str, tuple[int, int, int, int]]:
    """:func:`stage_model` and :func:`model_signature` of ``path``, done once per file version.

    A later ``transform`` of the same unchanged file (same size and modification time) reads,
    hashes and loads nothing on the driver.
    """
    stamp = _file_stamp(spark, path)
    key = (spark.sparkContext.applicationId, path, stamp)
    if stamp is None or key not in _PREPARED:
        local, file_name = stage_model(spark, path)
        _PREPARED[key] = file_name, model_signature(local, path)
    return _PREPARED[key]


def _file_stamp(spark: SparkSession, path: str) -> tuple[int, int] | None:
    """(size, modification time) of the model file; None when it cannot be read."""
    if not path:
        return None
    if "://" not in path or path.startswith("file:"):
        local = Path(path.removeprefix("file://").removeprefix("file:"))
        if not local.is_file():
            return None
        stat = local.stat()
        return stat.st_size, stat.st_mtime_ns
    from pipelines.io.storage import Storage

    info = Storage(spark).stat(path)
    return None if info is None else (int(info["bytes"]), int(info["mtime"]))


def stage_model(spark: SparkSession, path: str) -> tuple[str, str]:
    """Copy the model to a driver-local file named after its content and ``addFile`` it.

    Returns (local path, file name for ``SparkFiles.get``). Content naming lets several models
    called ``model.keras`` be used in one session and re-registers nothing already shipped.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is empty or not a ``.keras`` file.
    """
    if not path:
        raise ValueError("modelPath is not set. Received: modelPath=''")
    if not path.endswith(".keras"):
        raise ValueError(f"modelPath must name a .keras file. Received: modelPath={path!r}")
    data = _read_model_bytes(spark, path)
    digest = hashlib.sha256(data).hexdigest()[:16]
    file_name = f"keras-model-{digest}.keras"
    local = Path(tempfile.gettempdir()) / "pipelines-keras-models" / file_name
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(local)
    context = spark.sparkContext
    shipped = _SHIPPED.setdefault(context.applicationId, set())
    if file_name not in shipped:  # Spark refuses to re-add a path; skip its warning too
        context.addFile(str(local))
        shipped.add(file_name)
    return str(local), file_name


def _read_model_bytes(spark: SparkSession, path: str) -> bytes:
    if "://" not in path or path.startswith("file:"):
        local = Path(path.removeprefix("file://").removeprefix("file:"))
        if not local.is_file():
            raise FileNotFoundError(f"no model file at modelPath. Received: modelPath={path!r}")
        return local.read_bytes()
    from pipelines.io.storage import Storage

    storage = Storage(spark)
    if not storage.exists(path):
        raise FileNotFoundError(f"no model file at modelPath. Received: modelPath={path!r}")
    return storage.read_bytes(path)


def model_signature(local: str, shown: str) -> tuple[int, int, int, int]:
    """(height, width, channels, classes) of an image classifier; loads it on the driver.

    Raises:
        ValueError: the file is not a loadable Keras model, or its input is not
            (None, H, W, 1|3) with fixed H and W, or its output is not (None, classes).
    """
    import keras

    try:
        model = keras.saving.load_model(local, safe_mode=True, compile=False)
    except Exception as exc:  # zip, JSON, h5 or deserialization errors
        raise ValueError(
            f"cannot load a Keras model from modelPath: {type(exc).__name__}: {exc}. "
            f"Received: modelPath={shown!r}"
        ) from None
    in_shape, out_shape = _shape(model.input_shape), _shape(model.output_shape)
    if (len(in_shape) != 4 or in_shape[3] not in (1, 3)
            or any(d is None or d <= 0 for d in in_shape[1:3])):
        raise ValueError(
            "the model's input must be images (None, height, width, 1 or 3 channels). "
            f"Received: input_shape={in_shape} (modelPath={shown!r})"
        )
    if len(out_shape) != 2 or not out_shape[1]:
        raise ValueError(
            "the model must output one vector of class scores per image (None, classes). "
            f"Received: output_shape={out_shape} (modelPath={shown!r})"
        )
    return int(in_shape[1]), int(in_shape[2]), int(in_shape[3]), int(out_shape[1])


def _shape(shape: Any) -> tuple:
    if isinstance(shape, list):  # several inputs/outputs
        return tuple(shape) if len(shape) != 1 else tuple(shape[0])
    return tuple(shape)
