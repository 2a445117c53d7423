"""``DeepImageFeaturizer``: images -> pooled features of a Keras application model.

The successor of sparkdl's stage of the same name, on Spark 4 and Keras 3. An image column
(Spark's image struct of any 8-bit mode, or encoded image bytes) becomes a ``VectorUDT`` column of
the model's globally average-pooled last-block features (2048 values for InceptionV3), ready for
``LogisticRegression`` or any other Spark ML estimator::

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features",
                                     modelName="InceptionV3", weights="imagenet")
    model = Pipeline(stages=[featurizer, LogisticRegression(labelCol="label")]).fit(train)

How it runs: one ``pyspark.ml.functions.predict_batch_udf`` (built by
:func:`~pipelines.ml.inference.image_predict_udf`) gets the stored images (the struct's fields, or
the encoded bytes) and, per batch of ``batchSize``, decodes them to RGB at the model's input size
(gray is replicated to 3 channels, BGR structs are reordered), applies the model's own
``preprocess_input`` and runs the model. The model is built and its weights loaded once per Python
worker (TensorFlow is imported there only) and stays loaded for later ``transform`` calls of a
stage with the same model, whatever other Params changed (:mod:`pipelines.ml.model_cache`).

Invalid images (null, undecodable, unsupported mode) are rejected with an error naming the column
(``handleInvalid="error"``, the default) or dropped like the image source's ``dropInvalid``
(``handleInvalid="skip"``; executors log each one).

Spark's Arrow batches hold ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (10,000 by
default) of *stored* images; decoded float tensors exist only ``batchSize`` at a time. For large
images (a 12-megapixel JPEG decodes to 36 MB) set it to a few hundred (the transfer job does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasHandleInvalid, HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

from pipelines.imaging.resize import RESIZE_METHODS
from pipelines.ml.applications import MODELS, get_spec, resolve_size
from pipelines.ml.inference import (
    VALID,
    BatchPredict,
    image_inputs,
    image_predict_udf,
    input_kind,
)
from pipelines.ml.model_cache import get_or_build, model_key

logger = logging.getLogger(__name__)

HANDLE_INVALID = ("skip", "error")


class DeepImageParams(HasInputCol, HasOutputCol, HasHandleInvalid):
    """Params shared by :class:`DeepImageFeaturizer` and ``DeepImagePredictor``."""

    modelName = Param(
        Params._dummy(), "modelName", f"Keras application model, one of {sorted(MODELS)}",
        typeConverter=TypeConverters.toString,
    )
    scaleHint = Param(
        Params._dummy(), "scaleHint", f"resize method, one of {RESIZE_METHODS}",
        typeConverter=TypeConverters.toString,
    )
    inputSize = Param(
        Params._dummy(), "inputSize",
        "model input height = width in pixels; 0 = the model's native size (299 for InceptionV3)",
        typeConverter=TypeConverters.toInt,
    )
    weights = Param(
        Params._dummy(), "weights",
        "'imagenet' (Keras cache), 'none' (random init), or a weights file path or URL",
        typeConverter=TypeConverters.toString,
    )
    batchSize = Param(
        Params._dummy(), "batchSize", "images per model call (> 0)",
        typeConverter=TypeConverters.toInt,
    )
    threads = Param(
        Params._dummy(), "threads",
        "TensorFlow intra-op threads per Python worker; 0 = TensorFlow's default (all cores)",
        typeConverter=TypeConverters.toInt,
    )

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def getScaleHint(self) -> str:
        return self.getOrDefault(self.scaleHint)

    def getInputSize(self) -> int:
        return self.getOrDefault(self.inputSize)

    def getWeights(self) -> str:
        return self.getOrDefault(self.weights)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getThreads(self) -> int:
        return self.getOrDefault(self.threads)

    def setInputCol(self, value: str):
        return self._set(inputCol=value)

    def setOutputCol(self, value: str):
        return self._set(outputCol=value)

    def setModelName(self, value: str):
        return self._set(modelName=value)

    def setScaleHint(self, value: str):
        return self._set(scaleHint=value)

    def setInputSize(self, value: int):
        return self._set(inputSize=value)

    def setWeights(self, value: str):
        return self._set(weights=value)

    def setBatchSize(self, value: int):
        return self._set(batchSize=value)

    def setThreads(self, value: int):
        return self._set(threads=value)

    def setHandleInvalid(self, value: str):
        return self._set(handleInvalid=value)


@dataclass(frozen=True)
class ModelRun:
    """Every Param resolved and checked on the driver: plain values for executor closures."""

    model_name: str
    size: int
    #: ``"imagenet"``, ``"none"``, a local path, or a file name shipped with ``addFile``.
    weights: str
    weights_shipped: bool
    batch_size: int
    threads: int
    method: str
    handle_invalid: str


def describe_weights(weights: str) -> str:
    """A plain statement of which weights a model runs with, for logs and metrics files."""
    if weights == "imagenet":
        return "imagenet (Keras ImageNet weights)"
    if weights == "none":
        return "none (random initialisation: features are NOT ImageNet features)"
    return f"file {weights}"


def resolve_run(
    stage: DeepImageParams, spark: SparkSession, include_top: bool = False
) -> ModelRun:
    """Check every Param of ``stage`` and ship a weights file to the executors if needed.

    Raises:
        ValueError: a Param is out of range or the weights file is missing; names the value.
    """
    spec = get_spec(stage.getModelName())
    size = resolve_size(spec, stage.getInputSize())
    if include_top and stage.getWeights() == "imagenet" and size != spec.native_size:
        raise ValueError(
            f"the ImageNet classifier of {spec.name} needs its native input size "
            f"{spec.native_size}. Received: inputSize={stage.getInputSize()}"
        )
    method = stage.getScaleHint()
    if method not in RESIZE_METHODS:
        raise ValueError(f"scaleHint must be one of {RESIZE_METHODS}. Received: {method!r}")
    batch_size, threads = stage.getBatchSize(), stage.getThreads()
    if batch_size <= 0:
        raise ValueError(f"batchSize must be > 0. Received: batchSize={batch_size}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default). Received: threads={threads}")
    handle_invalid = stage.getOrDefault(stage.handleInvalid)
    if handle_invalid not in HANDLE_INVALID:
        raise ValueError(
            f"handleInvalid must be one of {HANDLE_INVALID}. Received: {handle_invalid!r}"
        )
    weights, shipped = ship_weights(spark, stage.getWeights(), spec.name)
    return ModelRun(spec.name, size, weights, shipped, batch_size, threads, method, handle_invalid)


def ship_weights(
    spark: SparkSession, weights: str, owner: str, param: str = "weights"
) -> tuple[str, bool]:
    """Make a weights (or model) file reachable from every Python worker.

    ``imagenet``/``none`` pass through. A local file under a ``local[*]`` master is used in
    place. Anything else (``hdfs://``, ``s3a://``, ``http(s)://``, a driver-local file on a
    cluster) goes through ``SparkContext.addFile``: Spark copies it once to every executor, and
    workers open it with ``SparkFiles.get(name)``.

    Returns:
        (what executors open, whether it is a ``SparkFiles`` name).

    Raises:
        ValueError: the file does not exist, or another file of the same name was shipped.
    """
    if weights in ("imagenet", "none"):
        return weights, False
    if not weights:
        raise ValueError(
            f"{param} for {owner} must be 'imagenet', 'none' or a path/URL. Received: {param}=''"
        )
    scheme = urlparse(weights).scheme
    local = scheme in ("", "file")
    if local:
        path = weights[len("file://"):] if weights.startswith("file://") else weights
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise ValueError(
                f"{param} file for {owner} not found on the driver. "
                f"Received: {param}={weights!r}"
            )
        if spark.sparkContext.master.startswith("local"):
            return path, False
        weights = path
    elif scheme not in ("http", "https", "ftp"):
        from pipelines.io.storage import Storage

        if not Storage(spark).exists(weights):
            raise ValueError(
                f"{param} file for {owner} not found. Received: {param}={weights!r}"
            )
    name = os.path.basename(urlparse(weights).path.rstrip("/"))
    sc = spark.sparkContext
    for added in sc.listFiles:
        if os.path.basename(urlparse(added).path) == name and not _same_file(added, weights):
            raise ValueError(
                f"another file named {name!r} was already shipped to the executors ({added}); "
                f"give the {param} file for {owner} a distinct name. "
                f"Received: {param}={weights!r}"
            )
    sc.addFile(weights)
    logger.info("shipping %s to the executors for %s", weights, owner)
    return name, True


def _same_file(added: str, weights: str) -> bool:
    return urlparse(added).path == urlparse(weights).path or added == weights


def local_path(source: str, shipped: bool) -> str:
    """Executor side: the local path (or keyword) of what :func:`ship_weights` returned."""
    if not shipped:
        return source
    from pyspark import SparkFiles

    return SparkFiles.get(source)


def application_key(run: ModelRun, include_top: bool) -> tuple:
    """What defines the network of ``run`` (see :mod:`pipelines.ml.model_cache`): not the batch
    size, threads, resize method or invalid-row handling, which change no weight."""
    return model_key(
        "application", name=run.model_name, size=run.size, weights=run.weights,
        weights_file=_file_stamp(run), include_top=include_top,
    )


def make_predict_fn(
    run: ModelRun, include_top: bool, top_k: int = 0
) -> Callable[[], BatchPredict]:
    """``make_predict`` for :func:`pipelines.ml.inference.image_predict_udf`; captures only ``run``.

    The predict function takes uint8 RGB batches and returns ``{"values": model output}``
    (features or class probabilities), or with ``include_top`` and ``top_k > 0`` the top-K class
    ``{"indices": ..., "probabilities": ...}`` per image. The model comes from the worker's
    cache (:func:`~pipelines.ml.model_cache.get_or_build`), keyed by :func:`application_key`.
    """
    key = application_key(run, include_top)

    def make() -> BatchPredict:
        from pipelines.ml.models import build_application, limit_threads, preprocess_fn

        def build():
            limit_threads(run.threads)
            weights = local_path(run.weights, run.weights_shipped)
            return build_application(run.model_name, run.size, weights, include_top)

        model = get_or_build(key, build)
        preprocess = preprocess_fn(run.model_name)

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            out = np.asarray(model.predict_on_batch(preprocess(images)), dtype=np.float32)
            if not top_k:
                return {"values": out}
            order = np.argsort(-out, axis=1, kind="stable")[:, :top_k]
            return {
                "indices": order.astype(np.int32),
                "probabilities": np.take_along_axis(out, order, axis=1),
            }

        return predict

    return make


#: The outputs of :func:`make_predict_fn`: model output vectors, or top-K classes.
VALUES = StructType([StructField("values", ArrayType(FloatType()))])
TOP_K = StructType([
    StructField("indices", ArrayType(IntegerType())),
    StructField("probabilities", ArrayType(FloatType())),
])


def predict_images(
    dataset: DataFrame, input_col: str, run: ModelRun, tmp_col: str, include_top: bool = False,
    top_k: int = 0,
) -> DataFrame:
    """``dataset`` plus ``tmp_col``: a struct of the model outputs (:data:`VALUES` or
    :data:`TOP_K` fields) of each valid image. Rows with a null or undecodable image are dropped
    (``skip``) or fail the query with a message naming the column (``error``).

    One ``predict_batch_udf`` decodes and resizes the images and runs the model (see
    :mod:`pipelines.ml.inference`): only the stored image bytes go to the Python workers.
    """
    kind = input_kind(dataset.schema[input_col].dataType, input_col)
    predict = image_predict_udf(
        make_predict_fn(run, include_top, top_k), kind, (run.size, run.size, 3), run.method,
        TOP_K if top_k else VALUES, run.batch_size,
    )
    df = dataset.withColumn(tmp_col, predict(*image_inputs(input_col, kind)))
    invalid = F.col(tmp_col)[VALID] == 0
    if run.handle_invalid == "skip":
        logger.info(
            "rows of column %r with null or undecodable images are dropped (handleInvalid='skip')",
            input_col,
        )
        return df.filter(~invalid)
    where: Column = F.lit("")
    if kind == "struct":
        where = F.concat(F.lit(" origin="), F.coalesce(F.col(input_col).origin, F.lit("null")))
    message = F.concat(
        F.lit(
            f"invalid image in column {input_col!r}: null, undecodable or not an 8-bit 1/3/4 "
            f"channel image (handleInvalid='error'; use 'skip' to drop such rows). Received:"
        ),
        where,
    )
    return df.withColumn(
        tmp_col, F.when(invalid, F.raise_error(message)).otherwise(F.col(tmp_col))
    )


def _file_stamp(run: ModelRun) -> tuple[int, int] | None:
    """(mtime, size) of a local weights file: a file replaced in place gets a new model."""
    if run.weights_shipped or run.weights in ("imagenet", "none"):
        return None
    stat = os.stat(run.weights)
    return stat.st_mtime_ns, stat.st_size


class DeepImageFeaturizer(
    Transformer, DeepImageParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Images in ``inputCol`` -> pooled Keras features (``VectorUDT``) in ``outputCol``.

    Args:
        inputCol: image struct or encoded image bytes column.
        outputCol: output vector column.
        modelName: one of :data:`pipelines.ml.applications.MODELS`.
        scaleHint: resize method, one of :data:`pipelines.ml.inference.RESIZE_METHODS`.
        inputSize: input height = width; 0 = the model's native size. At least the model's
            Keras minimum (75 for InceptionV3, 71 for Xception, 32 for the others).
        weights: ``"imagenet"`` (Keras cache), ``"none"`` (random initialisation), or a Keras
            weights file (``.weights.h5`` / ``.h5``): local path, cluster URI or URL.
        batchSize: images per model call.
        threads: TensorFlow intra-op threads per Python worker (0 = TensorFlow's default).
        handleInvalid: ``"error"`` (fail naming the column) or ``"skip"`` (drop invalid rows).
    """

    @keyword_only
    def __init__(
        self, *, inputCol: str = "image", outputCol: str = "features",
        modelName: str = "InceptionV3", scaleHint: str = "bilinear", inputSize: int = 0,
        weights: str = "imagenet", batchSize: int = 64, threads: int = 0,
        handleInvalid: str = "error",
    ):
        super().__init__()
        self._setDefault(
            inputCol="image", outputCol="features", modelName="InceptionV3",
            scaleHint="bilinear", inputSize=0, weights="imagenet", batchSize=64, threads=0,
            handleInvalid="error",
        )
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self, *, inputCol: str = "image", outputCol: str = "features",
        modelName: str = "InceptionV3", scaleHint: str = "bilinear", inputSize: int = 0,
        weights: str = "imagenet", batchSize: int = 64, threads: int = 0,
        handleInvalid: str = "error",
    ):
        return self._set(**self._input_kwargs)

    def featureDim(self) -> int:
        """Length of the output vectors."""
        return get_spec(self.getModelName()).feature_dim

    def _transform(self, dataset: DataFrame) -> DataFrame:
        input_col, output_col = self.getInputCol(), self.getOutputCol()
        if input_col not in dataset.columns:
            raise ValueError(
                f"inputCol {input_col!r} is not a column of the dataset {dataset.columns}. "
                f"Received: inputCol={input_col!r}"
            )
        run = resolve_run(self, dataset.sparkSession)
        logger.info(
            "featurizing %r with %s at %dx%d, weights: %s",
            input_col, run.model_name, run.size, run.size, describe_weights(self.getWeights()),
        )
        tmp = f"__features_{self.uid}"
        df = predict_images(dataset, input_col, run, tmp)
        return df.withColumn(output_col, array_to_vector(F.col(tmp)["values"])).drop(tmp)
