"""``DeepImagePredictor`` (ImageNet classifier on an image column) and SQL image UDFs.

The successors of sparkdl's ``DeepImagePredictor`` and ``registerKerasImageUDF``:

* :class:`DeepImagePredictor` runs a Keras application model *with* its classifier head and
  returns, per image, the top-K classes as ``array<struct<classIndex:int, label:string,
  probability:float>>`` (``decodePredictions=True``) or the full probability vector
  (``VectorUDT``). Labels come from the ImageNet class index JSON (Keras'
  ``imagenet_class_index.json``) when it is available locally, else they are the class indices.
* :func:`register_keras_image_udf` registers a SQL function ``name(image)`` that runs a Keras
  application model or a saved Keras model file on an image struct or encoded bytes column and
  returns the model output as ``array<float>`` (null for an invalid image).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType

from pipelines.imaging.resize import RESIZE_METHODS
from pipelines.ml.applications import IMAGENET_CLASS_INDEX, IMAGENET_CLASSES, MODELS, get_spec
from pipelines.ml.featurizer import (
    DeepImageParams,
    describe_weights,
    local_path,
    predict_images,
    resolve_run,
    ship_weights,
)
from pipelines.ml.inference import to_batch

logger = logging.getLogger(__name__)


def load_class_names(path: str, classes: int = IMAGENET_CLASSES) -> list[str] | None:
    """Class names from a Keras class index JSON (``{"0": ["n01440764", "tench"], ...}``).

    Returns:
        The names in index order, or None when ``path`` does not exist (indices are used then).

    Raises:
        ValueError: the file exists but is not a class index of ``classes`` entries.
    """
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        names = [str(index[str(i)][1]) for i in range(classes)]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(
            f"class index {path!r} must map '0'..'{classes - 1}' to [wnid, name]. "
            f"Received: {type(exc).__name__}: {exc}"
        ) from None
    return names


class DeepImagePredictor(
    Transformer, DeepImageParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Images in ``inputCol`` -> ImageNet predictions of a Keras application model.

    Args:
        inputCol, outputCol, modelName, scaleHint, inputSize, weights, batchSize, threads,
        handleInvalid: as for :class:`pipelines.ml.featurizer.DeepImageFeaturizer`. With
            ``weights="imagenet"`` the input size must be the model's native size.
        decodePredictions: top-K ``(classIndex, label, probability)`` structs instead of the full
            1000-class probability vector.
        topK: how many classes per image when decoding (1..1000).
        classIndexPath: a Keras ``imagenet_class_index.json`` on the driver; default the Keras
            cache copy. When missing, labels are the class indices as strings.
    """

    decodePredictions = Param(
        Params._dummy(), "decodePredictions",
        "top-K (classIndex, label, probability) structs instead of the probability vector",
        typeConverter=TypeConverters.toBoolean,
    )
    topK = Param(Params._dummy(), "topK", "classes per image when decoding (1..1000)",
                 typeConverter=TypeConverters.toInt)
    classIndexPath = Param(
        Params._dummy(), "classIndexPath",
        "ImageNet class index JSON on the driver; '' = the Keras cache copy",
        typeConverter=TypeConverters.toString,
    )

    @keyword_only
    def __init__(
        self, *, inputCol: str = "image", outputCol: str = "predictions",
        modelName: str = "InceptionV3", scaleHint: str = "bilinear", inputSize: int = 0,
        weights: str = "imagenet", batchSize: int = 64, threads: int = 0,
        handleInvalid: str = "error", decodePredictions: bool = True, topK: int = 5,
        classIndexPath: str = "",
    ):
        super().__init__()
        self._setDefault(
            inputCol="image", outputCol="predictions", modelName="InceptionV3",
            scaleHint="bilinear", inputSize=0, weights="imagenet", batchSize=64, threads=0,
            handleInvalid="error", decodePredictions=True, topK=5, classIndexPath="",
        )
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self, *, inputCol: str = "image", outputCol: str = "predictions",
        modelName: str = "InceptionV3", scaleHint: str = "bilinear", inputSize: int = 0,
        weights: str = "imagenet", batchSize: int = 64, threads: int = 0,
        handleInvalid: str = "error", decodePredictions: bool = True, topK: int = 5,
        classIndexPath: str = "",
    ):
        return self._set(**self._input_kwargs)

    def setTopK(self, value: int):
        return self._set(topK=value)

    def setDecodePredictions(self, value: bool):
        return self._set(decodePredictions=value)

    def setClassIndexPath(self, value: str):
        return self._set(classIndexPath=value)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        input_col, output_col = self.getInputCol(), self.getOutputCol()
        if input_col not in dataset.columns:
            raise ValueError(
                f"inputCol {input_col!r} is not a column of the dataset {dataset.columns}. "
                f"Received: inputCol={input_col!r}"
            )
        decode = self.getOrDefault(self.decodePredictions)
        top_k = self.getOrDefault(self.topK)
        if decode and not 1 <= top_k <= IMAGENET_CLASSES:
            raise ValueError(f"topK must be in 1..{IMAGENET_CLASSES}. Received: topK={top_k}")
        names = None
        if decode:
            names = load_class_names(self.getOrDefault(self.classIndexPath) or IMAGENET_CLASS_INDEX)
            if names is None:
                logger.info("no ImageNet class index found; labels are class indices")
        run = resolve_run(self, dataset.sparkSession, include_top=True)
        logger.info(
            "predicting %r with %s at %dx%d, weights: %s",
            input_col, run.model_name, run.size, run.size, describe_weights(self.getWeights()),
        )
        tmp = f"__predictions_{self.uid}"
        df = predict_images(dataset, input_col, run, tmp, include_top=True,
                            top_k=top_k if decode else 0)
        if not decode:
            return df.withColumn(output_col, array_to_vector(F.col(tmp)["values"])).drop(tmp)
        return df.withColumn(output_col, _decoded(F.col(tmp), names)).drop(tmp)


def _decoded(top: Column, names: list[str] | None) -> Column:
    """(indices, probabilities) struct -> array of (index, label, probability) structs."""
    label_of: Callable[[Column], Column]
    if names is None:
        def label_of(index: Column) -> Column:
            return index.cast("string")
    else:
        table = F.array(*[F.lit(n) for n in names])

        def label_of(index: Column) -> Column:
            return F.element_at(table, index + 1)

    return F.transform(
        top["indices"],
        lambda index, i: F.struct(
            index.alias("classIndex"),
            label_of(index).alias("label"),
            top["probabilities"][i].alias("probability"),
        ),
    )


def register_keras_image_udf(
    spark: SparkSession, name: str, model: str, *, weights: str = "imagenet",
    input_size: int = 0, scale_hint: str = "bilinear",
    preprocessor: str | Callable[[np.ndarray], np.ndarray] | None = None, batch_size: int = 64,
) -> Callable[..., Column]:
    """Register ``name(image)`` as a SQL function running a Keras model on an image column.

    Args:
        spark: the session to register in.
        name: the SQL function name.
        model: a model name of :data:`pipelines.ml.applications.MODELS` (the full classifier, with
            ``weights``), or a saved Keras model file (``.keras``/``.h5``: local path, cluster URI
            or URL) whose input is (H, W, 1 or 3).
        weights: for a model name: ``imagenet``, ``none`` or a weights file.
        input_size: for a model name: input height = width (0 = native).
        scale_hint: resize method, one of :data:`pipelines.ml.inference.RESIZE_METHODS`.
        preprocessor: for a model file: a model name whose ``preprocess_input`` to apply, a
            picklable function on float32 [0, 255] batches, or None (feed [0, 255] as is).
        batch_size: images per model call.

    Returns:
        The registered UDF (also usable from the DataFrame API). The function takes an image
        struct or encoded image bytes and returns the model output as ``array<float>``; null when
        the image is null or undecodable.
    """
    if scale_hint not in RESIZE_METHODS:
        raise ValueError(f"scale_hint must be one of {RESIZE_METHODS}. Received: {scale_hint!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0. Received: batch_size={batch_size}")
    if model in MODELS:
        from pipelines.ml.applications import resolve_size

        size = resolve_size(get_spec(model), input_size)
        source, shipped = ship_weights(spark, weights, model)
        builder = _application_builder(model, size, source, shipped)
        logger.info("registering %s: %s, weights: %s", name, model, describe_weights(weights))
    else:
        if isinstance(preprocessor, str):
            get_spec(preprocessor)
        source, shipped = ship_weights(spark, model, f"SQL function {name!r}", param="model")
        builder = _file_builder(source, shipped, preprocessor)
        logger.info("registering %s: Keras model file %s", name, model)
    key = uuid.uuid4()

    @pandas_udf(ArrayType(FloatType()))
    def run_model(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        from pyspark.ml.model_cache import ModelCache

        loaded = ModelCache.get(key)
        if loaded is None:
            loaded = builder()
            ModelCache.add(key, loaded)
        predict, (height, width, channels) = loaded
        for batch in batches:
            kind = "struct" if isinstance(batch, pd.DataFrame) else "binary"
            values = batch.to_dict("records") if kind == "struct" else batch
            images, valid = to_batch(values, kind, height, width, channels, scale_hint)
            outputs = [
                predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
            ]
            flat = iter(np.concatenate(outputs).reshape(len(images), -1) if outputs else [])
            yield pd.Series([next(flat) if ok else None for ok in valid], dtype=object)

    return spark.udf.register(name, run_model)


def _application_builder(model: str, size: int, source: str, shipped: bool) -> Callable[[], Any]:
    def build() -> Any:
        from pipelines.ml.models import build_application, preprocess_fn

        keras_model = build_application(model, size, local_path(source, shipped), include_top=True)
        preprocess = preprocess_fn(model)

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(keras_model.predict_on_batch(preprocess(x)), dtype=np.float32)

        return predict, (size, size, 3)

    return build


def _file_builder(
    source: str, shipped: bool, preprocessor: str | Callable[[np.ndarray], np.ndarray] | None
) -> Callable[[], Any]:
    def build() -> Any:
        import keras

        path = local_path(source, shipped)
        try:
            keras_model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise ValueError(
                f"cannot load the Keras model file {path!r}: {type(exc).__name__}: {exc}"
            ) from exc
        shape = tuple(keras_model.input_shape[1:])
        if len(shape) != 3 or shape[2] not in (1, 3) or None in shape:
            raise ValueError(
                f"Keras model {path!r} must take (H, W, 1|3) images. Received: input_shape={shape}"
            )
        if isinstance(preprocessor, str):
            from pipelines.ml.models import preprocess_fn

            preprocess = preprocess_fn(preprocessor)
        else:
            preprocess = preprocessor

        def predict(x: np.ndarray) -> np.ndarray:
            x = preprocess(x) if preprocess is not None else x
            return np.asarray(keras_model.predict_on_batch(x), dtype=np.float32)

        return predict, shape

    return build
