"""Raw image inputs -> model-ready numpy batches, decoded inside one ``predict_batch_udf``.

The featurizer, the predictor and the Keras scorer run a model on an image column of either kind
this project accepts:

* Spark's image struct (any 8-bit mode; BGR(A) as Spark stores it is turned into RGB), or
* raw encoded image bytes (PNG, JPEG, ... as ``spark.read.format("binaryFile")`` gives).

:func:`image_predict_udf` builds one ``pyspark.ml.functions.predict_batch_udf`` that receives the
raw inputs (the struct's fields, or the bytes) and decodes, converts and resizes each batch of
``batch_size`` images inside the predict function, right before the model runs. Only the stored
uint8 pixels (or encoded bytes) cross from the JVM to Python, once; no float tensor column is
ever materialised, and each Spark task needs one Python worker (one model), not two.

Images are converted to the wanted channel count (gray -> RGB replicates, RGB -> gray uses the
ITU-R 601 luma like PIL) and resized when their size differs. A null or undecodable image is not
fed to the model: its row gets ``valid = 0`` (and zeros in the outputs), so callers can drop,
null or reject such rows the way Spark's ``dropInvalid`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    DataType,
    FloatType,
    IntegerType,
    StructField,
    StructType,
)

from pipelines.imaging.image_struct import (
    IMAGE_STRUCT,
    decode_image,
    is_image_struct,
    struct_to_array,
    to_rgb,
)
from pipelines.imaging.resize import RESIZE_METHODS, fit_images

logger = logging.getLogger(__name__)

#: scaleHint / resize method names -> PIL resampling filters.
InputKind = Literal["struct", "binary"]
#: The struct fields sent to Python, in the order the predict function takes them.
STRUCT_FIELDS = tuple(IMAGE_STRUCT.fieldNames())
#: Field of every :func:`image_predict_udf` result: 1 for a valid image, 0 for null/undecodable.
VALID = "valid"
#: The UDF output of a stage whose model returns one flat vector per row: the values, and
#: whether the row's input was valid.
VALUES_OUTPUT = StructType([StructField("values", ArrayType(FloatType())),
                            StructField(VALID, IntegerType())])

#: The model side of :func:`image_predict_udf`: uint8 (N, H, W, C) RGB -> output name -> array.
BatchPredict = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def input_kind(data_type: DataType, column: str) -> InputKind:
    """Which image input a column holds.

    Raises:
        TypeError: the column is neither an image struct nor binary; names the column and type.
    """
    if is_image_struct(data_type):
        return "struct"
    if isinstance(data_type, BinaryType):
        return "binary"
    raise TypeError(
        f"column {column!r} must hold Spark's image struct or encoded image bytes (binary). "
        f"Received: {data_type.simpleString()}"
    )


def image_array(value: Any, kind: InputKind) -> np.ndarray | None:
    """One image (struct as dict/Row, or bytes) -> uint8 (H, W, C) RGB(A); None when invalid."""
    if value is None:
        return None
    try:
        if kind == "struct":
            array = struct_to_array(value)
            if array.dtype != np.uint8:
                raise ValueError(f"models take 8-bit images. Received: dtype={array.dtype}")
            return to_rgb(array)
        return decode_image(bytes(value))
    except ValueError as exc:
        logger.warning("skipping an invalid image: %s", exc)
        return None


def to_batch(
    values: Iterable[Any], kind: InputKind, height: int, width: int, channels: int,
    method: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Many images -> (float32 batch (N, H, W, C) of the valid ones, boolean validity mask)."""
    batch, valid = fit_images([image_array(v, kind) for v in values], height, width, channels,
                              method)
    return batch.astype(np.float32), valid


def image_inputs(column: str, kind: InputKind) -> list[Column]:
    """The columns :func:`image_predict_udf` takes: the struct's fields, or the bytes column."""
    if kind == "struct":
        return [F.col(column)[field] for field in STRUCT_FIELDS]
    return [F.col(column)]


def decode_inputs(
    inputs: Sequence[np.ndarray], kind: InputKind, height: int, width: int, channels: int,
    method: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of raw inputs (columns as numpy) -> :func:`fit_images` of the decoded images."""
    if kind == "struct":  # a null int field arrives as NaN; struct_to_array rejects it
        values: Iterable[Any] = (dict(zip(STRUCT_FIELDS, row, strict=True))
                                 for row in zip(*inputs, strict=True))
    else:
        values = inputs[0]
    return fit_images([image_array(v, kind) for v in values], height, width, channels, method)


def image_predict_udf(
    make_predict: Callable[[], BatchPredict], kind: InputKind, shape: tuple[int, int, int],
    method: str, outputs: StructType, batch_size: int,
) -> Callable[..., Column]:
    """A ``predict_batch_udf`` from raw image inputs to ``outputs`` plus an int ``valid`` field.

    Call the result on :func:`image_inputs`. ``make_predict`` runs once per Python worker and
    UDF (capture plain values only) and returns a function from a uint8 RGB batch (N, H, W, C) to
    a dict with one array per field of ``outputs``; it gets its model from
    :func:`pipelines.ml.model_cache.get_or_build`, so a new UDF for the same model (another
    ``batchSize``, say) finds the model already built in the worker. Invalid rows are not
    predicted: they get ``valid = 0`` and zeros. The UDF is non-deterministic so that Spark never
    copies it into a filter on its result (which would run the model twice).

    Args:
        shape: the model's (height, width, channels), channels 1 or 3.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}. Received: {method!r}")
    if kind not in ("struct", "binary"):
        raise ValueError(f"kind must be 'struct' or 'binary'. Received: {kind!r}")
    height, width, channels = shape
    names = outputs.fieldNames()

    def make() -> Callable[..., dict[str, np.ndarray]]:
        predict = make_predict()

        def run(inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
            images, valid = decode_inputs(inputs, kind, height, width, channels, method)
            if len(images):
                result = predict(images)
            else:  # nothing valid: one blank image gives the output shapes
                blank = predict(np.zeros((1, height, width, channels), np.uint8))
                result = {name: np.asarray(blank[name])[:0] for name in names}
            out = {VALID: valid.astype(np.int32)}
            for name in names:
                values = np.asarray(result[name])
                if len(values) != len(valid):
                    full = np.zeros((len(valid), *values.shape[1:]), dtype=values.dtype)
                    full[valid] = values
                    values = full
                out[name] = values
            return out

        # predict_batch_udf passes one numpy array per input column, by the function's arity.
        if kind == "struct":
            def predict_structs(origin, height_, width_, n_channels, mode, data):
                return run((origin, height_, width_, n_channels, mode, data))

            return predict_structs

        def predict_bytes(data):
            return run((data,))

        return predict_bytes

    return_type = StructType([*outputs.fields, StructField(VALID, IntegerType())])
    udf = predict_batch_udf(make, return_type=return_type, batch_size=batch_size)
    return udf.asNondeterministic()


def apply_handle_invalid(
    df: DataFrame, tmp_col: str, input_col: str, mode: str, detail: Column | None = None,
    what: str = "image",
) -> DataFrame:
    """Treat the rows whose ``tmp_col`` struct has ``valid = 0`` the way ``handleInvalid`` says.

    ``skip`` drops them, ``error`` fails the query with a message naming ``input_col`` (and
    ``detail``, e.g. the image's origin), ``keep`` leaves them: callers null their outputs with
    :func:`when_valid`.
    """
    invalid = F.col(tmp_col)[VALID] == 0
    if mode == "skip":
        logger.info("rows of column %r with null or unreadable input are dropped "
                    "(handleInvalid='skip')", input_col)
        return df.filter(~invalid)
    if mode == "keep":
        return df
    if mode != "error":
        raise ValueError(
            f"handleInvalid must be 'error', 'skip' or 'keep'. Received: handleInvalid={mode!r}"
        )
    message = F.concat(
        F.lit(f"invalid {what} in column {input_col!r}: null, unreadable or of the wrong shape "
              f"(handleInvalid='error'; use 'skip' to drop such rows or 'keep' to get nulls). "
              f"Received:"),
        detail if detail is not None else F.lit(""),
    )
    return df.withColumn(
        tmp_col, F.when(invalid, F.raise_error(message)).otherwise(F.col(tmp_col))
    )


def when_valid(tmp_col: str, value: Column) -> Column:
    """``value`` for rows whose ``tmp_col`` struct is valid, null otherwise."""
    return F.when(F.col(tmp_col)[VALID] == 1, value)
