"""The Params every image and tensor stage shares: typed, defaults set once, checked when set.

Like pyspark's own ``HasInputCol`` & co, each mixin declares its ``Param`` at class level, sets
its default once in ``__init__`` and has a getter and a setter. Type converters *validate*: a
bad value raises ``ValueError`` on the driver when it is set (in the constructor, a setter, or
when a saved stage is loaded), naming the Param and the value received::

    DeepImageFeaturizer(modelName="ResNet152")
    # ValueError: modelName must be one of [...]. Received: modelName='ResNet152'

One meaning of ``handleInvalid`` for every stage: ``error`` fails the query naming the column,
``skip`` drops the row, ``keep`` keeps it with null outputs. And like Spark ML's built-in
stages, a stage refuses to write an output column that already exists
(:func:`check_output_columns`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable
from typing import Any

from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param import shared as spark_shared
from pyspark.ml.util import DefaultParamsWritable, DefaultParamsWriter, MLWriter
from pyspark.sql import DataFrame

from pipelines.imaging.resize import RESIZE_METHODS
from pipelines.ml.applications import MODELS, get_spec

logger = logging.getLogger(__name__)

HANDLE_INVALID = ("error", "skip", "keep")
#: DeepImageFeaturizer's pooling of the last block: ``none`` is sparkdl's flattened block.
POOLING = ("avg", "max", "none")
#: sparkdl's ``scaleHint`` names (Java AWT ``Image.SCALE_*``) -> the resize method that does
#: what AWT did: ``SCALE_AREA_AVERAGING`` and ``SCALE_SMOOTH`` area-average, the others replicate
#: pixels (nearest neighbour).
SPARKDL_SCALE_HINTS = {
    "SCALE_AREA_AVERAGING": "area",
    "SCALE_SMOOTH": "area",
    "SCALE_DEFAULT": "nearest",
    "SCALE_FAST": "nearest",
    "SCALE_REPLICATE": "nearest",
}
SCALE_HINTS = (*RESIZE_METHODS, *SPARKDL_SCALE_HINTS)


# --- validating type converters ---------------------------------------------------------------

def one_of(name: str, choices: Iterable[str]) -> Callable[[Any], str]:
    """A converter accepting one of ``choices`` (strings), else a ``ValueError`` naming ``name``."""
    allowed = tuple(choices)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}. Received: {name}={value!r}")
        return value

    return convert


def int_at_least(name: str, low: int) -> Callable[[Any], int]:
    """A converter accepting integers >= ``low`` (bools refused)."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not TypeConverters._is_integer(value):
            raise ValueError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")
        value = int(value)
        if value < low:
            raise ValueError(f"{name} must be >= {low}. Received: {name}={value}")
        return value

    return convert


def non_empty_string(name: str, allowed_empty: bool = False) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or (not value and not allowed_empty):
            raise ValueError(f"{name} must be a non-empty string. Received: {name}={value!r}")
        return value

    return convert


def to_model_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"modelName must be one of {sorted(MODELS)}. Received: modelName={value!r}"
        )
    return get_spec(value).name


def to_weights(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            "weights must be 'imagenet', 'none' or a weights file path or URL. "
            f"Received: weights={value!r}"
        )
    return value


#: Key of a function Param's value as saved by :class:`FunctionParamsWritable`.
PICKLED = "cloudpickle"


def function_or_none(name: str, allow_string: bool = False) -> Callable[[Any], Any]:
    """A converter for a picklable function Param (``None`` = unset).

    Also accepts the saved form ``{"cloudpickle": <base64>}`` written by
    :class:`FunctionParamsWritable`, so a loaded stage gets its function back. With
    ``allow_string``, a model name of the registry stands for that model's ``preprocess_input``.
    """

    def convert(value: Any) -> Any:
        if value is None or callable(value):
            return value
        if allow_string and isinstance(value, str):
            return to_model_name(value) if value else None
        if isinstance(value, dict) and set(value) == {PICKLED}:
            from pyspark import cloudpickle

            return cloudpickle.loads(base64.b64decode(value[PICKLED]))
        expected = "a function, a model name or None" if allow_string else "a function or None"
        raise ValueError(f"{name} must be {expected}. Received: {name}={value!r}")

    return convert


# --- shared Params ----------------------------------------------------------------------------

class HasInputCol(spark_shared.HasInputCol):
    def setInputCol(self, value: str):
        return self._set(inputCol=value)


class HasOutputCol(spark_shared.HasOutputCol):
    def setOutputCol(self, value: str):
        return self._set(outputCol=value)


class HasHandleInvalid(Params):
    handleInvalid: Param[str] = Param(
        Params._dummy(), "handleInvalid",
        "rows with a null or unreadable input: 'error' fails naming the column, 'skip' drops "
        "them, 'keep' keeps them with null outputs",
        typeConverter=one_of("handleInvalid", HANDLE_INVALID),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(handleInvalid="error")

    def getHandleInvalid(self) -> str:
        return self.getOrDefault(self.handleInvalid)

    def setHandleInvalid(self, value: str):
        return self._set(handleInvalid=value)


class HasBatchSize(Params):
    batchSize: Param[int] = Param(
        Params._dummy(), "batchSize", "rows per model call (>= 1)",
        typeConverter=int_at_least("batchSize", 1),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(batchSize=64)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setBatchSize(self, value: int):
        return self._set(batchSize=value)


class HasScaleHint(Params):
    scaleHint: Param[str] = Param(
        Params._dummy(), "scaleHint",
        f"resize method, one of {list(RESIZE_METHODS)}, or sparkdl's "
        f"{list(SPARKDL_SCALE_HINTS)}",
        typeConverter=one_of("scaleHint", SCALE_HINTS),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(scaleHint="bilinear")

    def getScaleHint(self) -> str:
        return self.getOrDefault(self.scaleHint)

    def setScaleHint(self, value: str):
        return self._set(scaleHint=value)

    def getResizeMethod(self) -> str:
        """The resize method ``scaleHint`` stands for (a sparkdl name mapped to its method)."""
        hint = self.getScaleHint()
        return SPARKDL_SCALE_HINTS.get(hint, hint)


class HasThreads(Params):
    threads: Param[int] = Param(
        Params._dummy(), "threads",
        "TensorFlow intra-op threads per Python worker; 0 = TensorFlow's default (all cores)",
        typeConverter=int_at_least("threads", 0),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(threads=0)

    def getThreads(self) -> int:
        return self.getOrDefault(self.threads)

    def setThreads(self, value: int):
        return self._set(threads=value)


class HasModelFile(Params):
    """sparkdl's ``modelFile``: a saved Keras model, ``.keras`` or legacy HDF5 ``.h5``."""

    modelFile: Param[str] = Param(
        Params._dummy(), "modelFile",
        "saved Keras model (.keras or HDF5 .h5): a local path or a URI Spark can read",
        typeConverter=non_empty_string("modelFile", allowed_empty=True),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(modelFile="")

    def getModelFile(self) -> str:
        return self.getOrDefault(self.modelFile)

    def setModelFile(self, value: str):
        return self._set(modelFile=value)


class HasOutputMode(Params):
    """sparkdl's ``outputMode``: a flat ``vector``, or an ``image`` struct (float32 pixels)."""

    outputMode: Param[str] = Param(
        Params._dummy(), "outputMode",
        "'vector' (Spark ML vector of the flattened output) or 'image' (image struct of the "
        "(H, W, C) output, float32 pixels)",
        typeConverter=one_of("outputMode", ("vector", "image")),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(outputMode="vector")

    def getOutputMode(self) -> str:
        return self.getOrDefault(self.outputMode)

    def setOutputMode(self, value: str):
        return self._set(outputMode=value)


# --- checks at transform time -----------------------------------------------------------------

def check_input_column(dataset: DataFrame, column: str, param: str = "inputCol") -> None:
    if column not in dataset.columns:
        raise ValueError(
            f"{param} {column!r} is not a column of the dataset {dataset.columns}. "
            f"Received: {param}={column!r}"
        )


def check_output_columns(dataset: DataFrame, **columns: str) -> None:
    """Refuse output columns that already exist (as Spark ML's built-in stages do).

    Raises:
        ValueError: names the Param and the column, e.g. ``Received: outputCol='label'``.
    """
    for param, column in columns.items():
        if column in dataset.columns:
            raise ValueError(
                f"output column {column!r} already exists; choose another {param} or drop the "
                f"column first. Received: {param}={column!r}"
            )
    names = list(columns.values())
    if len(set(names)) != len(names):
        raise ValueError(f"output columns must differ. Received: {columns}")


# --- persistence of function Params -----------------------------------------------------------

class FunctionParamsWriter(DefaultParamsWriter):
    """:class:`DefaultParamsWriter` that saves function Params with cloudpickle (base64)."""

    def saveImpl(self, path: str) -> None:
        params = {}
        for param, value in self.instance._paramMap.items():
            if callable(value):
                from pyspark import cloudpickle

                value = {PICKLED: base64.b64encode(cloudpickle.dumps(value)).decode("ascii")}
            params[param.name] = value
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession, paramMap=params)


class FunctionParamsWritable(DefaultParamsWritable):
    """Save/load for stages with a function Param (``imageLoader``, ``preprocessor``).

    The function is pickled by value with cloudpickle, like Spark's own Python UDFs; loading a
    saved stage unpickles it, so load only stages you trust (as with any pickle).
    """

    def write(self) -> MLWriter:
        return FunctionParamsWriter(self)
