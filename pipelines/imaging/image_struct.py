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
#: OpenCV type codes of float32 images (sparkdl's model outputs), by channel count.
OCV_FLOAT_MODE_BY_CHANNELS = {1: 5, 3: 21, 4: 29}  # CV_32FC1, CV_32FC3, CV_32FC4
#: Every supported mode -> (channels, numpy dtype), as sparkdl's ``imageIO`` had them.
OCV_TYPES: dict[int, tuple[int, np.dtype]] = {
    **{mode: (c, np.dtype(np.uint8)) for c, mode in OCV_MODE_BY_CHANNELS.items()},
    **{mode: (c, np.dtype(np.float32)) for c, mode in OCV_FLOAT_MODE_BY_CHANNELS.items()},
}


def is_image_struct(data_type: Any) -> bool:
    """Whether a Spark data type is (compatible with) the image struct."""
    if not isinstance(data_type, StructType):
        return False
    names = {f.name: f.dataType for f in data_type.fields}
    return all(names.get(f.name) == f.dataType for f in IMAGE_STRUCT.fields)


def struct_to_array(image: Mapping[str, Any] | Any) -> np.ndarray:
    """Image struct (Row or dict) -> array of shape (height, width, nChannels).

    ``uint8`` for 8-bit modes, ``float32`` for the ``CV_32FC*`` modes (as sparkdl's
    ``imageStructToArray``). The channel order is the stored one (BGR for colour images).

    Raises:
        ValueError: the mode is not supported or the byte count does not match the dimensions.
    """
    get = image.__getitem__
    data = get("data")
    try:
        height, width = int(get("height")), int(get("width"))
        channels, mode = int(get("nChannels")), int(get("mode"))
    except (TypeError, ValueError):  # null fields (pandas turns them into NaN)
        raise ValueError(f"image struct has null fields (origin={get('origin')!r})") from None
    if OCV_TYPES.get(mode, (None,))[0] != channels:
        raise ValueError(
            "only 8-bit or float32 images with 1, 3 or 4 channels are supported. "
            f"Received: mode={mode}, nChannels={channels} (origin={get('origin')!r})"
        )
    dtype = OCV_TYPES[mode][1]
    expected = height * width * channels * dtype.itemsize
    if data is None or len(data) != expected:
        size = None if data is None else len(data)
        raise ValueError(
            f"image data has {size} bytes, expected height*width*nChannels*{dtype.itemsize}="
            f"{expected}. Received: height={height}, width={width}, nChannels={channels} "
            f"(origin={get('origin')!r})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(height, width, channels)


def array_to_struct(array: np.ndarray, origin: str = "") -> dict[str, Any]:
    """``uint8`` or ``float32`` array (H, W) or (H, W, C) in stored channel order -> image struct
    as a dict (mode ``CV_8UC*`` or ``CV_32FC*``)."""
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.float32):
        raise ValueError(f"image arrays must be uint8 or float32. Received: dtype={array.dtype}")
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
        "mode": (OCV_MODE_BY_CHANNELS if array.dtype == np.uint8
                 else OCV_FLOAT_MODE_BY_CHANNELS)[channels],
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
    array = _decode_plain_png(data)
    if array is None:
        array = np.asarray(_decode_with_pil(data, origin), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_pil(data: bytes, origin: str = ""):
    """Encoded image bytes -> a loaded PIL image in mode L, RGB or RGBA.

    Raises:
        ValueError: the bytes are empty or not a decodable image.
    """
    from PIL import Image

    array = _decode_plain_png(data)
    return _decode_with_pil(data, origin) if array is None else Image.fromarray(array)


def _decode_with_pil(data: bytes, origin: str):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError(f"image bytes are empty (origin={origin!r})")
    try:
        img = Image.open(io.BytesIO(data))  # the first frame of a GIF or TIFF
        img.load()
        return _to_8bit(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image (origin={origin!r}): {exc}") from None


def _to_8bit(img):
    """A PIL image of any mode -> mode L, RGB or RGBA, 8 bits per channel."""
    from PIL import Image

    if img.mode in ("L", "RGB", "RGBA"):
        return img
    if img.mode.startswith("I"):
        # 16-bit gray (I;16*, or I from a 16-bit PNG): keep the high byte. PIL's convert("L")
        # clips at 255 instead, turning most of a 16-bit image white.
        wide = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("1", "F"):
        return img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGBA" if "A" in img.getbands() else "RGB")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> channels, for the 8-bit types that decode to L, RGB or RGBA as they are.
_PLAIN_PNG_CHANNELS = {0: 1, 2: 3, 6: 4}


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """8-bit grey, RGB or RGBA PNG -> array (H, W[, C]) through libpng (``imagecodecs``), faster
    than Pillow for small images (less per-call overhead); None for anything else (Pillow
    decodes, converts and reports it: palettes, 16-bit, grey+alpha, transparency chunks, corrupt
    data)."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24] != 8:
        return None
    channels = _PLAIN_PNG_CHANNELS.get(data[25])
    if channels is None:
        return None
    import imagecodecs

    try:
        array = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError, RuntimeError):
        return None
    if array.dtype != np.uint8 or (array.shape[2] if array.ndim == 3 else 1) != channels:
        return None
    return array


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """``uint8`` array (H, W[, C]) in RGB(A) order -> PNG bytes (lossless; gray stays 1 channel).

    Encoded by libpng through ``imagecodecs``: faster than Pillow's ``save`` for small images,
    whose per-call overhead is larger than the encoding of a 28x28 image.
    """
    import imagecodecs

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
        array.ndim == 3 and array.shape[2] not in (3, 4)
    ):
        raise ValueError(
            "PNG export takes uint8 arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). "
            f"Received: dtype={array.dtype}, shape={array.shape}"
        )
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(array), level=compress_level))
