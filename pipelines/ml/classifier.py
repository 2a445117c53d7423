"""KerasImageClassifier: a saved Keras classifier applied to an image column on the executors.

The ``.keras`` or ``.h5`` file named by ``modelPath`` (a local path, a URI fsspec reads such as
``hdfs://`` or ``s3a://``, or a URL) reaches the workers as :mod:`pipelines.ml.shipping` says
(inside the UDF up to 32 MiB, else read by the workers from where it is), on a classic or a
Spark Connect session alike. It is loaded once per Python worker with Keras ``safe_mode=True``
(no code in the file is ever run), in the ``precision`` asked for, and kept in the worker's
model cache by its content digest (:mod:`pipelines.ml.model_cache`). The driver reads and loads
it once per file version, to check it and read its input shape; later ``transform`` calls of
the same unchanged file reuse that.

Input: Spark's image struct or encoded image bytes (``binaryFile``'s ``content``). One
``predict_batch_udf`` (:func:`~pipelines.ml.inference.image_predict_udf`) gets the images and
converts each batch to the model's input height, width and channels right before ``predict``,
then preprocesses the float32 RGB [0, 255] batch: multiplied by ``scale`` (default 1/255), or
through ``preprocessor``: a model name's ``preprocess_input`` or a picklable function.
Output: ``probabilityCol`` (a Spark ML vector of the model's outputs) and ``predictionCol``
(the arg-max index as a double, as Spark ML classifiers give). Rows whose image is null or
cannot be decoded fail the query, are dropped, or get nulls in both (``handleInvalid`` =
``error``, ``skip``, ``keep``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasPredictionCol, HasProbabilityCol
from pyspark.ml.util import DefaultParamsReadable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

from pipelines.ml.inference import (
    InputKind,
    apply_handle_invalid,
    image_inputs,
    image_predict_udf,
    input_kind,
    when_valid,
)
from pipelines.ml.keras_files import image_input_shape, load_model_file, shape_of
from pipelines.ml.model_cache import get_or_build, model_key
from pipelines.ml.params import (
    FunctionParamsWritable,
    HasBatchSize,
    HasHandleInvalid,
    HasInputCol,
    HasScaleHint,
    check_input_column,
    check_output_columns,
    function_or_none,
    non_empty_string,
)
from pipelines.ml.precision import HasPrecision, log_precision, worker_precision
from pipelines.ml.shipping import ModelFile, ship_file

logger = logging.getLogger(__name__)

class KerasImageClassifierParams(HasInputCol, HasProbabilityCol, HasPredictionCol,
                                 HasHandleInvalid, HasBatchSize, HasScaleHint, HasPrecision):
    modelPath: Param[str] = Param(
        Params._dummy(), "modelPath", "the .keras or .h5 model file (path or URI)",
        typeConverter=non_empty_string("modelPath", allowed_empty=True),
    )
    scale: Param[float] = Param(
        Params._dummy(), "scale",
        "multiplier of [0, 255] pixel values (used when preprocessor is unset)",
        typeConverter=TypeConverters.toFloat,
    )
    preprocessor: Param[Any] = Param(
        Params._dummy(), "preprocessor",
        "a model name (its keras.applications preprocess_input) or a picklable function from a "
        "float32 RGB [0, 255] batch (N, H, W, C) to the model's input; None = multiply by scale",
        typeConverter=function_or_none("preprocessor", allow_string=True),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(modelPath="", inputCol="image", probabilityCol="probability",
                         predictionCol="prediction", batchSize=256, scale=1.0 / 255.0,
                         preprocessor=None)

    def getModelPath(self) -> str:
        return self.getOrDefault(self.modelPath)

    def getScale(self) -> float:
        return self.getOrDefault(self.scale)

    def getPreprocessor(self) -> Any:
        return self.getOrDefault(self.preprocessor)

    def setModelPath(self, value: str):
        return self._set(modelPath=value)

    def setScale(self, value: float):
        return self._set(scale=value)

    def setPreprocessor(self, value: Any):
        return self._set(preprocessor=value)

    def setProbabilityCol(self, value: str):
        return self._set(probabilityCol=value)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)


class KerasImageClassifier(Transformer, KerasImageClassifierParams, DefaultParamsReadable,
                           FunctionParamsWritable):
    """Score images with a saved Keras classifier (``.keras`` or ``.h5`` file).

    Args (every one has a default, set in :class:`KerasImageClassifierParams`):
        modelPath: the model file; a local path or a URI Spark can read.
        inputCol: image struct or encoded image bytes column (``"image"``).
        probabilityCol: output vector of the model's outputs (``"probability"``).
        predictionCol: output arg-max class index, a double (``"prediction"``).
        batchSize: images per ``predict`` call on a worker (256).
        scale: pixel values in [0, 255] are multiplied by this (1/255) when ``preprocessor``
            is None.
        preprocessor: a model name of :data:`pipelines.ml.applications.MODELS` (its
            ``preprocess_input``) or a picklable function on float32 RGB [0, 255] batches.
        scaleHint: resampling when the image size differs from the model input (``bilinear``;
            sparkdl's ``SCALE_*`` names too).
        handleInvalid: ``"error"`` (default), ``"skip"`` or ``"keep"`` (null outputs).
        precision: ``"float32"`` (default), ``"bfloat16"`` or ``"auto"`` (see
            :mod:`pipelines.ml.precision`); the output layer stays float32 and the outputs are
            float32 in every case.
    """

    @keyword_only
    def __init__(self, *, modelPath: str | None = None, inputCol: str | None = None,
                 probabilityCol: str | None = None, predictionCol: str | None = None,
                 batchSize: int | None = None, scale: float | None = None,
                 preprocessor: Any = None, scaleHint: str | None = None,
                 handleInvalid: str | None = None, precision: str | None = None):
        super().__init__()
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    @keyword_only
    def setParams(self, *, modelPath: str | None = None, inputCol: str | None = None,
                  probabilityCol: str | None = None, predictionCol: str | None = None,
                  batchSize: int | None = None, scale: float | None = None,
                  preprocessor: Any = None, scaleHint: str | None = None,
                  handleInvalid: str | None = None, precision: str | None = None):
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def _transform(self, dataset: DataFrame) -> DataFrame:
        path, column = self.getModelPath(), self.getInputCol()
        prob_col, pred_col = self.getProbabilityCol(), self.getPredictionCol()
        check_input_column(dataset, column)
        check_output_columns(dataset, probabilityCol=prob_col, predictionCol=pred_col)
        kind = input_kind(dataset.schema[column].dataType, column)
        prepared = prepared_model(dataset.sparkSession, path)
        height, width, channels = image_input_shape(prepared, path, "modelPath")
        out_shape = prepared.output_shape
        if len(out_shape) != 2 or not out_shape[1]:
            raise ValueError(
                "the model must output one vector of class scores per image (None, classes). "
                f"Received: output_shape={out_shape} (modelPath={path!r})"
            )
        logger.info("scoring %r with %s (input %sx%sx%s, %s outputs, batch %s)",
                    column, path, height, width, channels, out_shape[1], self.getBatchSize())
        log_precision(self.getPrecision(), "KerasImageClassifier")
        scored = _predict_udf(prepared.model_file, kind, (height, width, channels),
                              float(self.getScale()), self.getPreprocessor(),
                              self.getBatchSize(), self.getResizeMethod(), self.getPrecision())
        tmp = f"__keras_scorer_{self.uid}"
        out = dataset.withColumn(tmp, scored(*image_inputs(column, kind)))
        out = apply_handle_invalid(out, tmp, column, self.getHandleInvalid())
        return out.withColumn(
            prob_col, when_valid(tmp, array_to_vector(F.col(tmp)["probability"]))
        ).withColumn(
            pred_col, when_valid(tmp, F.col(tmp)["prediction"].cast("double"))
        ).drop(tmp)


#: What the model side of the UDF returns per image (see :func:`_predict_udf`).
OUTPUTS = StructType([
    StructField("probability", ArrayType(FloatType()), True),
    StructField("prediction", IntegerType(), True),
])


def file_model_loader(model_file: ModelFile):
    """Worker side: load the model file, once per worker (model cache), in float32."""

    def load():
        return load_model_file(model_file.local_path(), shown=model_file.name)

    return lambda: get_or_build(model_key("file", digest=model_file.digest), load)


def file_forward_loader(model_file: ModelFile, precision: str):
    """Worker side: the file's model in ``precision`` as a forward pass traced once
    (:func:`~pipelines.ml.models.predict_function`), once per worker (model cache)."""

    def load():
        from pipelines.ml.models import predict_function, with_precision

        model = load_model_file(model_file.local_path(), shown=model_file.name)
        return predict_function(with_precision(model, worker_precision(precision),
                                               model_file.name))

    key = model_key("file", digest=model_file.digest, precision=precision, traced=True)
    return lambda: get_or_build(key, load)


def batch_preprocessor(preprocessor: Any, scale: float):
    """Worker side: float32 RGB [0, 255] batch -> model input, per ``preprocessor``/``scale``."""
    if isinstance(preprocessor, str):
        from pipelines.ml.models import preprocess_fn

        return preprocess_fn(preprocessor)
    if preprocessor is not None:
        return lambda batch: np.asarray(preprocessor(np.asarray(batch, np.float32)))
    return lambda batch: np.multiply(batch, np.float32(scale), dtype=np.float32)


def _predict_udf(model_file: ModelFile, kind: InputKind, shape: tuple[int, int, int],
                 scale: float, preprocessor: Any, batch_size: int, method: str, precision: str):
    """The ``predict_batch_udf``; its closure holds plain values only (no ``self``)."""
    load = file_forward_loader(model_file, precision)

    def make_predict_fn():
        forward = load()
        preprocess = batch_preprocessor(preprocessor, scale)

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            outputs = forward(preprocess(images))
            return {"probability": outputs, "prediction": outputs.argmax(axis=1).astype(np.int32)}

        return predict

    return image_predict_udf(make_predict_fn, kind, shape, method, OUTPUTS, batch_size)


@dataclass(frozen=True)
class PreparedModel:
    """A model file as the workers get it, and its shapes as read on the driver."""

    model_file: ModelFile
    input_shape: tuple
    output_shape: tuple


#: Model file digest -> its shapes: each version is loaded on the driver once.
_SHAPES: dict[str, tuple[tuple, tuple]] = {}


def prepared_model(spark: SparkSession, path: str, param: str = "modelPath") -> PreparedModel:
    """The model file as the workers get it (:func:`~pipelines.ml.shipping.ship_file`: read and
    hashed once per file version) and its shapes (loaded on the driver once per content).

    Raises:
        ValueError: ``path`` is empty or missing, or not a loadable ``.keras``/``.h5`` model.
    """
    if not path:
        raise ValueError(f"{param} is not set. Received: {param}=''")
    model_file = ship_file(spark, path, param, "the model")
    if model_file.digest not in _SHAPES:
        model = load_model_file(model_file.local_path(), shown=path, param=param)
        _SHAPES[model_file.digest] = shape_of(model.input_shape), shape_of(model.output_shape)
    return PreparedModel(model_file, *_SHAPES[model_file.digest])
