"""``DeepImagePredictor`` (ImageNet classifier on an image column) and SQL image UDFs.

The successors of sparkdl's ``DeepImagePredictor`` and ``registerKerasImageUDF``, with their
contracts:

* :class:`DeepImagePredictor` runs a Keras application model *with* its classifier head. By
  default (``decodePredictions=False``) it returns the 1000 class probabilities as a
  ``VectorUDT``; with ``decodePredictions=True`` the ``topK`` classes as
  ``array<struct<class: string, description: string, probability: float>>``, where ``class``
  is the WordNet id and ``description`` the class name from Keras'
  ``imagenet_class_index.json`` (what ``keras.applications.imagenet_utils.decode_predictions``
  gives).
* :func:`register_keras_image_udf` registers a SQL function ``name(image)`` that runs a Keras
  application model, a saved Keras model file or an in-memory Keras model on an image struct or
  encoded bytes column and returns the model output as ``array<float>`` (null for an invalid
  image). :func:`registerKerasImageUDF` is sparkdl's signature for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
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
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from pipelines.ml.applications import IMAGENET_CLASS_INDEX, IMAGENET_CLASSES, MODELS, get_spec
from pipelines.ml.featurizer import (
    DeepImageParams,
    describe_weights,
    predict_images,
    resolve_run,
    set_given,
)
from pipelines.ml.inference import to_batch, when_valid
from pipelines.ml.model_cache import get_or_build, model_key
from pipelines.ml.params import (
    SCALE_HINTS,
    SPARKDL_SCALE_HINTS,
    check_input_column,
    check_output_columns,
    int_at_least,
)
from pipelines.ml.precision import log_precision, to_precision, worker_precision
from pipelines.ml.shipping import ModelFile, ship_file, ship_weights

logger = logging.getLogger(__name__)

#: sparkdl's decoded prediction: WordNet id, class name, probability.
DECODED = ArrayType(StructType([
    StructField("class", StringType()),
    StructField("description", StringType()),
    StructField("probability", FloatType()),
]))


def load_class_index(path: str, classes: int = IMAGENET_CLASSES) -> list[tuple[str, str]]:
    """(WordNet id, class name) per class from a Keras class index JSON
    (``{"0": ["n01440764", "tench"], ...}``).

    Raises:
        ValueError: the file is missing (says where to get it) or is not a class index of
            ``classes`` entries.
    """
    if not path or not os.path.isfile(path):
        raise ValueError(
            "decodePredictions needs Keras' ImageNet class index (imagenet_class_index.json), "
            f"not found on the driver. Put it at {IMAGENET_CLASS_INDEX} (Keras downloads it "
            "there on the first keras.applications.imagenet_utils.decode_predictions call "
            "where the internet is reachable) or set classIndexPath. "
            f"Received: classIndexPath={path!r}"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        entries = [(str(index[str(i)][0]), str(index[str(i)][1])) for i in range(classes)]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(
            f"class index {path!r} must map '0'..'{classes - 1}' to [wnid, name]. "
            f"Received: {type(exc).__name__}: {exc}"
        ) from None
    return entries


class DeepImagePredictorParams(DeepImageParams):
    decodePredictions: Param[bool] = Param(
        Params._dummy(), "decodePredictions",
        "output the topK (class, description, probability) structs instead of the probability "
        "vector",
        typeConverter=TypeConverters.toBoolean,
    )
    topK: Param[int] = Param(
        Params._dummy(), "topK", f"classes per image when decoding (1..{IMAGENET_CLASSES})",
        typeConverter=int_at_least("topK", 1),
    )
    classIndexPath: Param[str] = Param(
        Params._dummy(), "classIndexPath",
        "ImageNet class index JSON on the driver; '' = the Keras cache copy",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(outputCol="predictions", decodePredictions=False, topK=5,
                         classIndexPath="")

    def getDecodePredictions(self) -> bool:
        return self.getOrDefault(self.decodePredictions)

    def getTopK(self) -> int:
        return self.getOrDefault(self.topK)

    def getClassIndexPath(self) -> str:
        return self.getOrDefault(self.classIndexPath)

    def setDecodePredictions(self, value: bool):
        return self._set(decodePredictions=value)

    def setTopK(self, value: int):
        return self._set(topK=value)

    def setClassIndexPath(self, value: str):
        return self._set(classIndexPath=value)


class DeepImagePredictor(
    Transformer, DeepImagePredictorParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Images in ``inputCol`` -> ImageNet predictions of a Keras application model.

    Args (every one has a default, set in the Params mixins; each is checked when set):
        inputCol, outputCol (``"predictions"``), modelName, scaleHint, inputSize, weights,
        batchSize, threads, handleInvalid, precision: as for
            :class:`pipelines.ml.featurizer.DeepImageFeaturizer`. With ``weights="imagenet"``
            the input size must be the model's native size.
        decodePredictions: ``False`` (default, as in sparkdl): the 1000 probabilities as a
            vector; ``True``: the ``topK`` ``(class, description, probability)`` structs.
        topK: how many classes per image when decoding (5).
        classIndexPath: a Keras ``imagenet_class_index.json`` on the driver; default the Keras
            cache copy. Decoding without it fails with a message saying where to put it.
    """

    @keyword_only
    def __init__(
        self, *, inputCol: str | None = None, outputCol: str | None = None,
        modelName: str | None = None, scaleHint: str | None = None,
        inputSize: int | None = None, weights: str | None = None,
        batchSize: int | None = None, threads: int | None = None,
        handleInvalid: str | None = None, decodePredictions: bool | None = None,
        topK: int | None = None, classIndexPath: str | None = None,
        precision: str | None = None,
    ):
        super().__init__()
        set_given(self, self._input_kwargs)

    @keyword_only
    def setParams(
        self, *, inputCol: str | None = None, outputCol: str | None = None,
        modelName: str | None = None, scaleHint: str | None = None,
        inputSize: int | None = None, weights: str | None = None,
        batchSize: int | None = None, threads: int | None = None,
        handleInvalid: str | None = None, decodePredictions: bool | None = None,
        topK: int | None = None, classIndexPath: str | None = None,
        precision: str | None = None,
    ):
        return set_given(self, self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        input_col, output_col = self.getInputCol(), self.getOutputCol()
        check_input_column(dataset, input_col)
        check_output_columns(dataset, outputCol=output_col)
        decode, top_k = self.getDecodePredictions(), self.getTopK()
        if decode and top_k > IMAGENET_CLASSES:
            raise ValueError(f"topK must be in 1..{IMAGENET_CLASSES}. Received: topK={top_k}")
        index = None
        if decode:
            index = load_class_index(self.getClassIndexPath() or IMAGENET_CLASS_INDEX)
        run = resolve_run(self, dataset.sparkSession, include_top=True)
        logger.info(
            "predicting %r with %s at %dx%d, weights: %s",
            input_col, run.model_name, run.size, run.size, describe_weights(self.getWeights()),
        )
        log_precision(run.precision, f"{run.model_name} predictions")
        tmp = f"__predictions_{self.uid}"
        df = predict_images(dataset, input_col, run, tmp, include_top=True,
                            top_k=top_k if decode else 0)
        if index is None:
            output = array_to_vector(F.col(tmp)["values"])
        else:
            output = _decoded(F.col(tmp), index)
        return df.withColumn(output_col, when_valid(tmp, output)).drop(tmp)


def _decoded(top: Column, index: list[tuple[str, str]]) -> Column:
    """(indices, probabilities) struct -> array of (class, description, probability) structs."""
    wnids = F.array(*[F.lit(wnid) for wnid, _ in index])
    names = F.array(*[F.lit(name) for _, name in index])
    return F.transform(
        top["indices"],
        lambda i, k: F.struct(
            F.element_at(wnids, i + 1).alias("class"),
            F.element_at(names, i + 1).alias("description"),
            top["probabilities"][k].alias("probability"),
        ),
    )


#: A batch preprocessor: float32 RGB [0, 255] batch (N, H, W, C) -> model input batch.
Preprocessor = Callable[[np.ndarray], np.ndarray]


def register_keras_image_udf(
    spark: SparkSession, name: str, model: Any, *, weights: str = "imagenet",
    input_size: int = 0, scale_hint: str = "bilinear",
    preprocessor: str | Preprocessor | None = None, batch_size: int = 64,
    file_preprocessor: Callable[[str], np.ndarray] | None = None, precision: str = "float32",
) -> Callable[..., Column]:
    """Register ``name(image)`` as a SQL function running a Keras model on an image column.

    Works the same on a classic and a Spark Connect session: a model or weights file reaches the
    workers as :mod:`pipelines.ml.shipping` says (with the function up to 32 MiB, else read by
    the workers from its path or URI); an in-memory model travels as ``.keras`` bytes.

    Args:
        spark: the session to register in.
        name: the SQL function name.
        model: a model name of :data:`pipelines.ml.applications.MODELS` (the full classifier,
            with ``weights``), a saved Keras model file (``.keras``/``.h5``: local path, cluster
            URI or URL), or an in-memory ``keras.Model``; its input must be (H, W, 1 or 3).
        weights: for a model name: ``imagenet``, ``none`` or a weights file.
        input_size: for a model name: input height = width (0 = native).
        scale_hint: resize method, one of :data:`pipelines.imaging.resize.RESIZE_METHODS` or
            sparkdl's ``SCALE_*`` names.
        preprocessor: for a model file or object: a model name whose ``preprocess_input`` to
            apply, a picklable function on float32 RGB [0, 255] batches, or None (feed [0, 255]
            as is). A model name's own ``preprocess_input`` is always applied.
        batch_size: images per model call.
        file_preprocessor: sparkdl's preprocessor instead: a picklable function from an image
            file path to the model's input array ((H, W, C) or (1, H, W, C)); each image is
            written to a temporary PNG for it (slow; see :func:`registerKerasImageUDF`).
        precision: ``float32``, ``bfloat16`` or ``auto`` (see :mod:`pipelines.ml.precision`);
            the output is float32 in every case.

    Returns:
        The registered UDF (also usable from the DataFrame API). The function takes an image
        struct or encoded image bytes and returns the model output as ``array<float>``; null when
        the image is null or undecodable.

    Raises:
        ValueError: a bad argument, an unknown model name, a missing file; names the value.
    """
    if scale_hint not in SCALE_HINTS:
        raise ValueError(
            f"scale_hint must be one of {list(SCALE_HINTS)}. Received: scale_hint={scale_hint!r}"
        )
    method = SPARKDL_SCALE_HINTS.get(scale_hint, scale_hint)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be an integer > 0. Received: batch_size={batch_size!r}")
    if isinstance(preprocessor, str):
        get_spec(preprocessor)
    elif preprocessor is not None and not callable(preprocessor):
        raise ValueError(
            f"preprocessor must be a model name, a function or None. "
            f"Received: preprocessor={preprocessor!r}"
        )
    to_precision(precision)
    if isinstance(model, str) and model in MODELS:
        from pipelines.ml.applications import resolve_size

        size = resolve_size(get_spec(model), input_size)
        weights_file = ship_weights(spark, weights, model)
        key = model_key("application", name=model, size=size, include_top=True, pooling=None,
                        weights=weights if weights_file is None else weights_file.digest,
                        precision=precision, traced=True)
        builder = _application_builder(key, model, size, weights, weights_file, precision)
        logger.info("registering %s: %s, weights: %s", name, model, describe_weights(weights))
    elif isinstance(model, str):
        _check_model_path(model)
        model_file = ship_file(spark, model, "model", f"SQL function {name!r}")
        builder = _file_builder(model_file, preprocessor, precision)
        logger.info("registering %s: Keras model file %s", name, model)
    elif hasattr(model, "predict_on_batch") and hasattr(model, "input_shape"):
        data = _model_bytes(model)
        model_file = ModelFile(f"{model.name}.keras", hashlib.sha256(data).hexdigest(),
                               data=data)
        builder = _file_builder(model_file, preprocessor, precision)
        logger.info("registering %s: in-memory Keras model %s (%s)", name, model.name,
                    model_file.digest[:16])
    else:
        raise ValueError(
            f"model must be a model name of {sorted(MODELS)}, a .keras/.h5 file path or a "
            f"keras.Model. Received: model={model!r}"
        )
    log_precision(precision, f"SQL function {name}")

    @pandas_udf(ArrayType(FloatType()))
    def run_model(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        predict, (height, width, channels) = builder()
        for batch in batches:
            kind = "struct" if isinstance(batch, pd.DataFrame) else "binary"
            values = batch.to_dict("records") if kind == "struct" else batch
            if file_preprocessor is None:
                images, valid = to_batch(values, kind, height, width, channels, method)
            else:
                images, valid = _load_through_files(values, kind, file_preprocessor)
            outputs = [
                predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
            ]
            flat = iter(np.concatenate(outputs).reshape(len(images), -1) if outputs else [])
            yield pd.Series([next(flat) if ok else None for ok in valid], dtype=object)

    return spark.udf.register(name, run_model)


def registerKerasImageUDF(  # noqa: N802 - sparkdl's name
    udf_name: str, keras_model_or_file_path: Any,
    preprocessor: Callable[[str], np.ndarray] | None = None,
) -> Callable[..., Column]:
    """sparkdl's ``registerKerasImageUDF``: register ``udf_name(image)`` in the active session.

    ``keras_model_or_file_path`` is an in-memory Keras model or a saved model file (``.keras``,
    or ``.h5`` as sparkdl saved them). ``preprocessor``, as in sparkdl, maps an image *file path*
    to the model's input array: each image is written to a temporary PNG and read back by it,
    which costs a file per image (sparkdl warned about this too); without it, images are resized
    to the model's input and fed as float32 [0, 255] RGB. Returns the registered UDF (sparkdl
    returned a TensorFlow graph function, which has no equivalent here).
    """
    spark = SparkSession.active()
    return register_keras_image_udf(spark, udf_name, keras_model_or_file_path,
                                    file_preprocessor=preprocessor)


def _check_model_path(model: str) -> None:
    """Tell a misspelled model name from a missing file: a name has no folder or extension."""
    if "/" in model or os.sep in model or "://" in model or os.path.splitext(model)[1]:
        return
    if not os.path.exists(model):
        raise ValueError(
            f"model must be a model name of {sorted(MODELS)} or a Keras model file "
            f"(.keras/.h5 path or URI). Received: model={model!r}"
        )


def _model_bytes(model: Any) -> bytes:
    """An in-memory Keras model as ``.keras`` bytes (what workers load; no file to ship)."""
    with tempfile.TemporaryDirectory(prefix="pipelines-udf-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as fh:
            return fh.read()


def _load_through_files(
    values: Any, kind: str, file_preprocessor: Callable[[str], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """sparkdl's path: each image -> temporary lossless PNG -> ``file_preprocessor(path)``."""
    from pipelines.imaging.image_struct import encode_png
    from pipelines.ml.inference import image_array

    arrays, valid = [], []
    with tempfile.TemporaryDirectory(prefix="pipelines-udf-img-") as tmp:
        for i, value in enumerate(values):
            image = image_array(value, kind)
            if image is None:
                valid.append(False)
                continue
            path = os.path.join(tmp, f"{i}.png")
            with open(path, "wb") as fh:
                fh.write(encode_png(image))
            array = np.asarray(file_preprocessor(path), dtype=np.float32)
            arrays.append(array[0] if array.ndim == 4 else array)
            valid.append(True)
    batch = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 1), np.float32)
    return batch, np.array(valid, dtype=bool)


def _application_builder(
    key: tuple, model: str, size: int, weights: str, weights_file: ModelFile | None,
    precision: str,
) -> Callable[[], Any]:
    """Worker side: (predict function, input shape); the traced model from the worker's cache."""

    def build() -> Any:
        from pipelines.ml.models import build_application, predict_function, preprocess_fn

        def load() -> Any:
            source = weights if weights_file is None else weights_file.local_path()
            return predict_function(build_application(
                model, size, source, include_top=True, precision=worker_precision(precision)))

        forward = get_or_build(key, load)
        preprocess = preprocess_fn(model)

        def predict(x: np.ndarray) -> np.ndarray:
            return forward(preprocess(x))

        return predict, (size, size, 3)

    return build


def _file_builder(
    model_file: ModelFile, preprocessor: str | Preprocessor | None, precision: str
) -> Callable[[], Any]:
    """Worker side: (predict function, input shape); the model (only: the preprocessor is not
    part of its key) from the worker's cache, as a forward pass traced once."""
    from pipelines.ml.classifier import file_forward_loader

    load = file_forward_loader(model_file, precision)

    def build() -> Any:
        forward = load()
        shape = tuple(int(d) for d in forward.input_shape)
        if len(shape) != 3 or shape[2] not in (1, 3):
            raise ValueError(
                "the model's input must be images (None, height, width, 1 or 3 channels). "
                f"Received: input_shape={(None, *shape)} (model={model_file.name!r})"
            )
        if isinstance(preprocessor, str):
            from pipelines.ml.models import preprocess_fn

            preprocess = preprocess_fn(preprocessor)
        else:
            preprocess = preprocessor

        def predict(x: np.ndarray) -> np.ndarray:
            x = preprocess(x) if preprocess is not None else x
            return np.asarray(forward(x), dtype=np.float32)

        return predict, shape

    return build
