"""Image column -> fixed-size numeric tensors, for model inference on executors.

Both the featurizer and the Keras scorer feed ``predict_batch_udf`` from a column of flattened
float32 tensors of one shape. This module makes that column from either kind of image input this
project accepts:

* Spark's image struct (any 8-bit mode; BGR(A) as Spark stores it is turned into RGB), or
* raw encoded image bytes (PNG, JPEG, ... as ``spark.read.format("binaryFile")`` gives).

Images are converted to the wanted channel count (gray -> RGB replicates, RGB -> gray uses the
ITU-R 601 luma like PIL), resized when their size differs, and returned as float32 pixel values in
[0, 255] (model-specific preprocessing is the caller's). A null or undecodable image gives a null
tensor, so callers can drop or reject such rows the way Spark's ``dropInvalid`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import pandas as pd
from pyspark.sql import Column
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, BinaryType, DataType, FloatType

from pipelines.images import decode_image, is_image_struct, struct_to_array, to_rgb

logger = logging.getLogger(__name__)

#: scaleHint / resize method names -> PIL resampling filters.
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos", "area")
InputKind = Literal["struct", "binary"]


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


def to_array(value: Any, kind: InputKind) -> np.ndarray:
    """One image (struct as dict/Row, or bytes) -> uint8 array (H, W, C) in RGB(A) order."""
    if kind == "struct":
        return to_rgb(struct_to_array(value))
    return decode_image(bytes(value))


def fit_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Convert an RGB(A)/gray uint8 array (H, W, C) to ``channels`` (1 or 3) channels."""
    have = array.shape[2]
    if have == channels:
        return array
    if have == 4:
        array, have = array[:, :, :3], 3
        if channels == 3:
            return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=2)
    if have == 3 and channels == 1:
        weights = np.array([299, 587, 114], dtype=np.uint32)
        luma = (array.astype(np.uint32) @ weights + 500) // 1000
        return luma.astype(np.uint8)[:, :, None]
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize(array: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize a uint8 array (H, W, C) with PIL; a no-op when the size already fits."""
    if array.shape[0] == height and array.shape[1] == width:
        return array
    from PIL import Image

    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}. Received: {method!r}")
    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "area": Image.Resampling.BOX,
    }[method]
    squeeze = array.shape[2] == 1
    img = Image.fromarray(array[:, :, 0] if squeeze else array)
    out = np.asarray(img.resize((width, height), resample=resample))
    return out[:, :, None] if squeeze else out


def to_tensor(
    value: Any, kind: InputKind, height: int, width: int, channels: int, method: str
) -> np.ndarray | None:
    """One image -> float32 (height, width, channels) in [0, 255]; None when null/undecodable."""
    if value is None:
        return None
    try:
        array = to_array(value, kind)
    except ValueError as exc:
        logger.warning("skipping an invalid image: %s", exc)
        return None
    array = resize(fit_channels(array, channels), height, width, method)
    return array.astype(np.float32)


def to_batch(
    values: Iterable[Any], kind: InputKind, height: int, width: int, channels: int,
    method: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Many images -> (float32 batch (N, H, W, C) of the valid ones, boolean validity mask)."""
    tensors = [to_tensor(v, kind, height, width, channels, method) for v in values]
    valid = np.array([t is not None for t in tensors], dtype=bool)
    good = [t for t in tensors if t is not None]
    batch = np.stack(good) if good else np.zeros((0, height, width, channels), np.float32)
    return batch, valid


def tensor_column(
    col: Column | str, kind: InputKind, height: int, width: int, channels: int,
    method: str = "bilinear", deterministic: bool = True,
) -> Column:
    """A column of flattened float32 tensors (length height*width*channels), null when invalid.

    Runs as an Arrow-batched pandas UDF; the closure captures plain values only. With
    ``deterministic=False`` the optimizer never copies the UDF into a filter or a later UDF
    (Spark would otherwise decode every image twice when the caller filters on the column).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}. Received: {method!r}")
    if kind not in ("struct", "binary"):
        raise ValueError(f"kind must be 'struct' or 'binary'. Received: {kind!r}")

    def convert(values: Iterable[Any]) -> pd.Series:
        out = []
        for value in values:
            tensor = to_tensor(value, kind, height, width, channels, method)
            out.append(None if tensor is None else tensor.reshape(-1))
        return pd.Series(out, dtype=object)

    if kind == "struct":
        # A struct column arrives as a DataFrame of its fields; a null struct as a row of nulls.
        @pandas_udf(ArrayType(FloatType()))
        def _from_structs(batches: Iterator[pd.DataFrame]) -> Iterator[pd.Series]:
            for batch in batches:
                yield convert(batch.to_dict("records"))

        udf = _from_structs
    else:

        @pandas_udf(ArrayType(FloatType()))
        def _from_bytes(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            for batch in batches:
                yield convert(batch)

        udf = _from_bytes
    return (udf if deterministic else udf.asNondeterministic())(col)
