"""Spark's image struct, and conversions between it, numpy arrays and encoded image bytes.

The struct is the one ``spark.read.format("image")`` produces: ``origin`` (string), ``height``,
``width``, ``nChannels``, ``mode`` (OpenCV type code) and ``data`` (row-major bytes, channels
interleaved). Like Spark's image source, 3- and 4-channel data is stored in BGR(A) order;
1-channel data (MNIST) is plain grayscale.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

#: The element type of an image column, identical to ``ImageSchema.columnSchema``.
IMAGE_STRUCT = StructType(
    [
        StructField("origin", StringType(), True),
        StructField("height", IntegerType(), True),
        StructField("width", IntegerType(), True),
        StructField("nChannels", IntegerType(), True),
        StructField("mode", IntegerType(), True),
        StructField("data", BinaryType(), True),
    ]
)

#: OpenCV type codes Spark uses for 8-bit images, by channel count.
OCV_MODE_BY_CHANNELS = {1: 0, 3: 16, 4: 24}  # CV_8UC1, CV_8UC3, CV_8UC4
CHANNELS_BY_OCV_MODE = {mode: channels for channels, mode in OCV_MODE_BY_CHANNELS.items()}


def is_image_struct(data_type: Any) -> bool:
    """Whether a Spark data type is (compatible with) the image struct."""
    if not isinstance(data_type, StructType):
        return False
    names = {f.name: f.dataType for f in data_type.fields}
    return all(names.get(f.name) == f.dataType for f in IMAGE_STRUCT.fields)


def struct_to_array(image: Mapping[str, Any] | Any) -> np.ndarray:
    """Image struct (Row or dict) -> ``uint8`` array of shape (height, width, nChannels).

    The channel order is the stored one (BGR for colour images read by Spark).

    Raises:
        ValueError: the mode is not 8-bit or the byte count does not match the dimensions.
    """
    get = image.__getitem__
    data = get("data")
    try:
        height, width = int(get("height")), int(get("width"))
        channels, mode = int(get("nChannels")), int(get("mode"))
    except (TypeError, ValueError):  # null fields (pandas turns them into NaN)
        raise ValueError(f"image struct has null fields (origin={get('origin')!r})") from None
    if CHANNELS_BY_OCV_MODE.get(mode) != channels:
        raise ValueError(
            "only 8-bit images with 1, 3 or 4 channels are supported. "
            f"Received: mode={mode}, nChannels={channels} (origin={get('origin')!r})"
        )
    expected = height * width * channels
    if data is None or len(data) != expected:
        size = None if data is None else len(data)
        raise ValueError(
            f"image data has {size} bytes, expected height*width*nChannels={expected}. "
            f"Received: height={height}, width={width}, nChannels={channels} "
            f"(origin={get('origin')!r})"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)


def array_to_struct(array: np.ndarray, origin: str = "") -> dict[str, Any]:
    """``uint8`` array (H, W) or (H, W, C) in stored channel order -> image struct as a dict."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8. Received: dtype={array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in OCV_MODE_BY_CHANNELS:
        raise ValueError(
            f"image arrays must be (H, W) or (H, W, 1|3|4). Received: shape={array.shape}"
        )
    height, width, channels = array.shape
    return {
        "origin": origin,
        "height": int(height),
        "width": int(width),
        "nChannels": int(channels),
        "mode": OCV_MODE_BY_CHANNELS[channels],
        "data": np.ascontiguousarray(array).tobytes(),
    }


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Stored order -> RGB(A): BGR(A) is reversed, grayscale is kept as (H, W, 1)."""
    if array.shape[-1] == 3:
        return array[..., ::-1]
    if array.shape[-1] == 4:
        return array[..., [2, 1, 0, 3]]
    return array


def from_rgb(array: np.ndarray) -> np.ndarray:
    """RGB(A) -> stored order (BGR(A)); grayscale unchanged."""
    return to_rgb(array)  # the permutation is its own inverse


def decode_image(data: bytes, origin: str = "") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> ``uint8`` array (H, W, C) in RGB(A) order.

    Raises:
        ValueError: the bytes are empty or not a decodable image.
    """
    array = np.asarray(decode_pil(data, origin), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_pil(data: bytes, origin: str = ""):
    """Encoded image bytes -> a loaded PIL image in mode L, RGB or RGBA.

    Raises:
        ValueError: the bytes are empty or not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError(f"image bytes are empty (origin={origin!r})")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image (origin={origin!r}): {exc}") from None
    return img


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """``uint8`` array (H, W[, C]) in RGB(A) order -> PNG bytes (lossless; gray stays 1 channel)."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
