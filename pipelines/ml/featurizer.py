"""``DeepImageFeaturizer``: images -> features of a Keras application model.

The successor of sparkdl's stage of the same name, on Spark 4 and Keras 3. An image column
(Spark's image struct of any 8-bit mode, or encoded image bytes) becomes a ``VectorUDT`` column of
the model's last-block features, ready for ``LogisticRegression`` or any Spark ML estimator::

    featurizer = DeepImageFeaturizer(inputCol="image", outputCol="features",
                                     modelName="InceptionV3", weights="imagenet")
    model = Pipeline(stages=[featurizer, LogisticRegression(labelCol="label")]).fit(train)

``pooling`` chooses the features: ``avg`` (the default: 2048 globally average-pooled values for
InceptionV3), ``max``, or ``none``, the last block flattened as sparkdl returned it
(8 x 8 x 2048 = 131,072 values for InceptionV3 at 299 x 299).

How it runs: one ``pyspark.ml.functions.predict_batch_udf`` (built by
:func:`~pipelines.ml.inference.image_predict_udf`) gets the stored images (the struct's fields, or
the encoded bytes) and, per batch of ``batchSize``, decodes them to RGB at the model's input size
(gray is replicated to 3 channels, BGR structs are reordered), applies the model's own
``preprocess_input`` and runs the model. The model is built once per Python worker (TensorFlow is
imported there only) and kept in the worker's cache (:mod:`pipelines.ml.model_cache`) by what
defines it, so later ``transform`` calls, with another ``batchSize`` or ``handleInvalid`` too,
reuse it.

Invalid images (null, undecodable, unsupported mode) fail the query naming the column
(``handleInvalid="error"``, the default), are dropped (``"skip"``; executors log each one) or
kept with a null feature vector (``"keep"``).

Spark's Arrow batches hold ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (10,000 by
default) of *stored* images; decoded float tensors exist only ``batchSize`` at a time. For large
images (a 12-megapixel JPEG decodes to 36 MB) set it to a few hundred (the transfer job does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StructField, StructType

from pipelines.ml.applications import MODELS, get_spec, resolve_size
from pipelines.ml.inference import (
    BatchPredict,
    apply_handle_invalid,
    image_inputs,
    image_predict_udf,
    input_kind,
)
from pipelines.ml.model_cache import get_or_build, model_key
from pipelines.ml.params import (
    POOLING,
    HasBatchSize,
    HasHandleInvalid,
    HasInputCol,
    HasOutputCol,
    HasScaleHint,
    HasThreads,
    check_input_column,
    check_output_columns,
    int_at_least,
    one_of,
    to_model_name,
    to_weights,
)
from pipelines.ml.precision import HasPrecision, log_precision, worker_precision
from pipelines.ml.shipping import ModelFile, ship_weights

logger = logging.getLogger(__name__)


class DeepImageParams(HasInputCol, HasOutputCol, HasHandleInvalid, HasBatchSize, HasScaleHint,
                      HasThreads, HasPrecision):
    """Params shared by :class:`DeepImageFeaturizer` and ``DeepImagePredictor``."""

    modelName: Param[str] = Param(
        Params._dummy(), "modelName", f"Keras application model, one of {sorted(MODELS)}",
        typeConverter=to_model_name,
    )
    inputSize: Param[int] = Param(
        Params._dummy(), "inputSize",
        "model input height = width in pixels; 0 = the model's native size (299 for InceptionV3)",
        typeConverter=int_at_least("inputSize", 0),
    )
    weights: Param[str] = Param(
        Params._dummy(), "weights",
        "'imagenet' (Keras cache), 'none' (random init), or a weights file path or URL",
        typeConverter=to_weights,
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(inputCol="image", modelName="InceptionV3", inputSize=0,
                         weights="imagenet")

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def getInputSize(self) -> int:
        return self.getOrDefault(self.inputSize)

    def getWeights(self) -> str:
        return self.getOrDefault(self.weights)

    def setModelName(self, value: str):
        return self._set(modelName=value)

    def setInputSize(self, value: int):
        return self._set(inputSize=value)

    def setWeights(self, value: str):
        return self._set(weights=value)


def set_given(stage: Params, kwargs: dict[str, Any]):
    """``_set`` the keyword arguments a caller gave (``None`` means "keep the default")."""
    return stage._set(**{name: value for name, value in kwargs.items() if value is not None})


@dataclass(frozen=True)
class ModelRun:
    """Every Param resolved and checked on the driver: plain values for executor closures."""

    model_name: str
    size: int
    #: ``"imagenet"``, ``"none"``, or the weights file as the user named it.
    weights: str
    #: The weights file as the workers get it (None for ``imagenet``/``none``).
    weights_file: ModelFile | None
    batch_size: int
    threads: int
    method: str
    handle_invalid: str
    #: ``avg``, ``max`` or ``none`` (ignored with the classifier head).
    pooling: str = "avg"
    #: As requested (``auto`` is decided on each worker, for its own CPU).
    precision: str = "float32"


def describe_weights(weights: str) -> str:
    """A plain statement of which weights a model runs with, for logs and metrics files."""
    if weights == "imagenet":
        return "imagenet (Keras ImageNet weights)"
    if weights == "none":
        return "none (random initialisation: features are NOT ImageNet features)"
    return f"file {weights}"


def resolve_run(
    stage: DeepImageParams, spark: SparkSession, include_top: bool = False, pooling: str = "avg"
) -> ModelRun:
    """Check the Params of ``stage`` that depend on each other, and decide how a weights file
    reaches the workers (:mod:`pipelines.ml.shipping`; each Param alone was checked when set).

    Raises:
        ValueError: the input size does not fit the model, or the weights file is missing;
            names the value.
    """
    spec = get_spec(stage.getModelName())
    size = resolve_size(spec, stage.getInputSize())
    if include_top and stage.getWeights() == "imagenet" and size != spec.native_size:
        raise ValueError(
            f"the ImageNet classifier of {spec.name} needs its native input size "
            f"{spec.native_size}. Received: inputSize={stage.getInputSize()}"
        )
    weights = stage.getWeights()
    weights_file = ship_weights(spark, weights, spec.name)
    return ModelRun(spec.name, size, weights, weights_file, stage.getBatchSize(),
                    stage.getThreads(), stage.getResizeMethod(), stage.getHandleInvalid(),
                    pooling, stage.getPrecision())


def application_key(run: ModelRun, include_top: bool) -> tuple:
    """What defines the network of ``run`` (see :mod:`pipelines.ml.model_cache`): not the batch
    size, threads, resize method or invalid-row handling, which change no weight."""
    return model_key(
        "application", name=run.model_name, size=run.size,
        weights=run.weights if run.weights_file is None else run.weights_file.digest,
        include_top=include_top, pooling=None if include_top else run.pooling,
        precision=run.precision,
    )


def make_predict_fn(
    run: ModelRun, include_top: bool, top_k: int = 0
) -> Callable[[], BatchPredict]:
    """``make_predict`` for :func:`pipelines.ml.inference.image_predict_udf`; captures only ``run``.

    The predict function takes uint8 RGB batches and returns ``{"values": model output}``
    (features, flattened, or class probabilities), or with ``include_top`` and ``top_k > 0``
    the top-K class ``{"indices": ..., "probabilities": ...}`` per image. The model and its
    forward pass, traced once (:func:`~pipelines.ml.models.predict_function`), come from the
    worker's cache (:func:`~pipelines.ml.model_cache.get_or_build`), keyed by
    :func:`application_key`.
    """
    key = application_key(run, include_top)

    def make() -> BatchPredict:
        from pipelines.ml.models import (
            build_application,
            limit_threads,
            predict_function,
            preprocess_fn,
        )

        def build():
            limit_threads(run.threads)
            precision = worker_precision(run.precision)
            weights = run.weights if run.weights_file is None else run.weights_file.local_path()
            return predict_function(build_application(
                run.model_name, run.size, weights, include_top, run.pooling, precision))

        forward = get_or_build(key, build)
        preprocess = preprocess_fn(run.model_name)

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            out = forward(preprocess(images))
            out = out.reshape(len(out), -1)  # pooling="none": the block, flattened (NHWC)
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
    :data:`TOP_K` fields) and ``valid`` of each image. Rows with a null or undecodable image are
    treated as ``run.handle_invalid`` says (:func:`~pipelines.ml.inference.apply_handle_invalid`).

    One ``predict_batch_udf`` decodes and resizes the images and runs the model (see
    :mod:`pipelines.ml.inference`): only the stored image bytes go to the Python workers.
    """
    kind = input_kind(dataset.schema[input_col].dataType, input_col)
    predict = image_predict_udf(
        make_predict_fn(run, include_top, top_k), kind, (run.size, run.size, 3), run.method,
        TOP_K if top_k else VALUES, run.batch_size,
    )
    df = dataset.withColumn(tmp_col, predict(*image_inputs(input_col, kind)))
    detail = None
    if kind == "struct":
        detail = F.concat(F.lit(" origin="), F.coalesce(F.col(input_col).origin, F.lit("null")))
    return apply_handle_invalid(df, tmp_col, input_col, run.handle_invalid, detail)


class DeepImageFeaturizerParams(DeepImageParams):
    pooling: Param[str] = Param(
        Params._dummy(), "pooling",
        "features of the last block: 'avg' or 'max' global pooling, or 'none' (the block "
        "flattened, as sparkdl gave it)",
        typeConverter=one_of("pooling", POOLING),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(outputCol="features", pooling="avg")

    def getPooling(self) -> str:
        return self.getOrDefault(self.pooling)

    def setPooling(self, value: str):
        return self._set(pooling=value)


class DeepImageFeaturizer(
    Transformer, DeepImageFeaturizerParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Images in ``inputCol`` -> Keras application features (``VectorUDT``) in ``outputCol``.

    Args (every one has a default, set in the Params mixins; each is checked when set):
        inputCol: image struct or encoded image bytes column (``"image"``).
        outputCol: output vector column (``"features"``); must not exist yet.
        modelName: one of :data:`pipelines.ml.applications.MODELS` (``"InceptionV3"``).
        scaleHint: resize method (``"bilinear"``), one of
            :data:`pipelines.imaging.resize.RESIZE_METHODS` or sparkdl's ``SCALE_*`` names.
        inputSize: input height = width; 0 (default) = the model's native size. At least the
            model's Keras minimum (75 for InceptionV3, 71 for Xception, 32 for the others).
        weights: ``"imagenet"`` (default; Keras cache), ``"none"`` (random initialisation), or a
            Keras weights file (``.weights.h5`` / ``.h5``): local path, cluster URI or URL.
        pooling: ``"avg"`` (default), ``"max"`` or ``"none"`` (the last block flattened).
        batchSize: images per model call (64).
        threads: TensorFlow intra-op threads per Python worker (0 = TensorFlow's default).
        handleInvalid: ``"error"`` (default), ``"skip"`` or ``"keep"`` (null features).
        precision: ``"float32"`` (default), ``"bfloat16"`` or ``"auto"`` (see
            :mod:`pipelines.ml.precision`); the features are float32 in every case.
    """

    @keyword_only
    def __init__(
        self, *, inputCol: str | None = None, outputCol: str | None = None,
        modelName: str | None = None, scaleHint: str | None = None,
        inputSize: int | None = None, weights: str | None = None, pooling: str | None = None,
        batchSize: int | None = None, threads: int | None = None,
        handleInvalid: str | None = None, precision: str | None = None,
    ):
        super().__init__()
        set_given(self, self._input_kwargs)

    @keyword_only
    def setParams(
        self, *, inputCol: str | None = None, outputCol: str | None = None,
        modelName: str | None = None, scaleHint: str | None = None,
        inputSize: int | None = None, weights: str | None = None, pooling: str | None = None,
        batchSize: int | None = None, threads: int | None = None,
        handleInvalid: str | None = None, precision: str | None = None,
    ):
        return set_given(self, self._input_kwargs)

    def featureDim(self) -> int:
        """Length of the output vectors (with ``pooling="none"``, builds the model to know)."""
        spec = get_spec(self.getModelName())
        if self.getPooling() != "none":
            return spec.feature_dim
        from pipelines.ml.models import build_application

        size = resolve_size(spec, self.getInputSize())
        shape = build_application(spec.name, size, "none", pooling="none").output_shape
        return int(np.prod(shape[1:]))

    def _transform(self, dataset: DataFrame) -> DataFrame:
        input_col, output_col = self.getInputCol(), self.getOutputCol()
        check_input_column(dataset, input_col)
        check_output_columns(dataset, outputCol=output_col)
        run = resolve_run(self, dataset.sparkSession, pooling=self.getPooling())
        logger.info(
            "featurizing %r with %s at %dx%d (pooling %s), weights: %s", input_col,
            run.model_name, run.size, run.size, run.pooling, describe_weights(self.getWeights()),
        )
        log_precision(run.precision, f"{run.model_name} features")
        tmp = f"__features_{self.uid}"
        df = predict_images(dataset, input_col, run, tmp)
        features = F.when(F.col(tmp)["valid"] == 1, array_to_vector(F.col(tmp)["values"]))
        return df.withColumn(output_col, features).drop(tmp)
