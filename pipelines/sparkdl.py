"""sparkdl 1.6's public names on this library: change one import line to move a sparkdl program.

    # from sparkdl import DeepImageFeaturizer, DeepImagePredictor, KerasImageFileTransformer
    from pipelines.sparkdl import DeepImageFeaturizer, DeepImagePredictor, KerasImageFileTransformer
    # from sparkdl.image import imageIO
    from pipelines.sparkdl import imageIO

Every stage here is this library's own (see :mod:`pipelines.ml`) and keeps sparkdl's Params,
defaults and output schemas; where it deliberately differs, ``docs/migrating-from-sparkdl.md``
says so and why. sparkdl's TensorFlow 1 graph API (``TFImageTransformer``, ``TFTransformer``,
``TFInputGraph``, ``imageInputPlaceholder``) and ``HorovodRunner`` have no equivalent: importing
them raises an ``ImportError`` naming what replaces them.

The image helpers below are sparkdl's ``sparkdl.image.imageIO`` functions, with the same
arguments and results (colour arrays in the struct's stored BGR order, ``uint8`` or ``float32``
pixels); ``imageIO`` is this module, so ``imageIO.imageArrayToStruct(...)`` works as before.
"""

from __future__ import annotations

import io
import sys
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from pipelines.imaging.image_struct import (
    IMAGE_STRUCT,
    OCV_TYPES,
    array_to_struct,
    struct_to_array,
)
from pipelines.ml.classifier import KerasImageClassifier
from pipelines.ml.featurizer import DeepImageFeaturizer
from pipelines.ml.keras_image_file import KerasImageFileTransformer
from pipelines.ml.keras_transformer import KerasTransformer
from pipelines.ml.predictor import DeepImagePredictor, registerKerasImageUDF

__all__ = [
    "DeepImageFeaturizer",
    "DeepImagePredictor",
    "KerasImageClassifier",
    "KerasImageFileTransformer",
    "KerasTransformer",
    "PIL_decode",
    "PIL_decode_and_resize",
    "PIL_to_imageStruct",
    "createResizeImageUDF",
    "filesToDF",
    "imageArrayToStruct",
    "imageIO",
    "imageStructToArray",
    "imageStructToPIL",
    "imageTypeByName",
    "imageTypeByOrdinal",
    "readImagesWithCustomFn",
    "registerKerasImageUDF",
]

#: ``from sparkdl.image import imageIO`` -> ``from pipelines.sparkdl import imageIO``.
imageIO = sys.modules[__name__]

#: sparkdl names with no equivalent, and what to use instead.
_NOT_PORTED = {
    "TFImageTransformer": "TensorFlow 1 graphs do not exist in TensorFlow 2: save the graph's "
                          "work as a Keras model and use KerasImageClassifier or "
                          "KerasImageFileTransformer",
    "TFTransformer": "TensorFlow 1 graphs do not exist in TensorFlow 2: save a Keras model and "
                     "use KerasTransformer",
    "TFInputGraph": "TensorFlow 1 graphs do not exist in TensorFlow 2: save a Keras model "
                    "(.keras) and give its path to KerasTransformer or KerasImageClassifier",
    "imageInputPlaceholder": "TensorFlow 1 placeholders do not exist in TensorFlow 2: a Keras "
                             "model's keras.Input takes its place",
    "HorovodRunner": "train Keras models across executors with "
                     "pipelines.ml.KerasImageEstimator(numWorkers=N) (TensorFlow's "
                     "MultiWorkerMirroredStrategy in a Spark barrier stage); for PyTorch, use "
                     "pyspark's TorchDistributor",
    "KerasImageFileEstimator": "use pipelines.ml.KerasImageEstimator: it trains on an image "
                               "struct column (read the files with spark.read.format('image') "
                               "or jobs/ingest_mnist.py with conf/folder.yaml) instead of a "
                               "URI column and an imageLoader, and fits a KerasImageClassifier",
}


def __getattr__(name: str) -> Any:
    if name in _NOT_PORTED:
        raise ImportError(
            f"sparkdl's {name} has no equivalent in pipelines.sparkdl: {_NOT_PORTED[name]}. "
            "See docs/migrating-from-sparkdl.md."
        )
    raise AttributeError(f"module 'pipelines.sparkdl' has no attribute {name!r}")


# --- sparkdl.image.imageIO --------------------------------------------------------------------

OcvType = namedtuple("OcvType", ["name", "ord", "nChannels", "dtype"])
_OCV_TYPES = tuple(
    OcvType(f"CV_{'8U' if dtype == np.uint8 else '32F'}C{channels}", mode, channels, dtype.name)
    for mode, (channels, dtype) in sorted(OCV_TYPES.items())
)


def imageTypeByOrdinal(ordinal: int) -> OcvType:  # noqa: N802 - sparkdl's names
    """The OpenCV type of an image struct's ``mode`` (``KeyError`` for unsupported ones)."""
    for ocv in _OCV_TYPES:
        if ocv.ord == ordinal:
            return ocv
    raise KeyError(f"unsupported image mode. Received: mode={ordinal!r} "
                   f"(supported: {[t.name for t in _OCV_TYPES]})")


def imageTypeByName(name: str) -> OcvType:  # noqa: N802
    """The OpenCV type named ``name`` (``CV_8UC3``, ``CV_32FC1``, ...)."""
    for ocv in _OCV_TYPES:
        if ocv.name == name:
            return ocv
    raise KeyError(f"unsupported image type. Received: name={name!r} "
                   f"(supported: {[t.name for t in _OCV_TYPES]})")


def imageArrayToStruct(imgArray: np.ndarray, origin: str = "") -> Row:  # noqa: N802, N803
    """A ``uint8`` or ``float32`` array (H, W, C), or (1, H, W, C), in stored (BGR) order -> an
    image struct ``Row``."""
    array = np.asarray(imgArray)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError("a 4-d image array must hold one image (1, H, W, C). "
                             f"Received: shape={array.shape}")
        array = array[0]
    return Row(**array_to_struct(array, origin))


def imageStructToArray(imageRow: Any) -> np.ndarray:  # noqa: N802, N803
    """An image struct -> its array (H, W, C) in stored order, ``uint8`` or ``float32``."""
    return struct_to_array(imageRow)


def imageStructToPIL(imageRow: Any):  # noqa: N802, N803
    """An 8-bit image struct -> a PIL image (L, RGB or RGBA; BGR is turned into RGB)."""
    from PIL import Image

    from pipelines.imaging.image_struct import to_rgb

    array = struct_to_array(imageRow)
    if array.dtype != np.uint8:
        raise ValueError(f"only 8-bit images convert to PIL. Received: dtype={array.dtype}")
    array = to_rgb(array)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def PIL_to_imageStruct(img: Any) -> np.ndarray:  # noqa: N802
    """A PIL image -> array in the struct's stored order (RGB(A) reversed to BGR(A))."""
    from pipelines.imaging.image_struct import from_rgb

    array = np.asarray(img)
    return from_rgb(array) if array.ndim == 3 else array[:, :, None]


def PIL_decode(raw_bytes: bytes) -> np.ndarray:  # noqa: N802
    """Encoded image bytes -> array in stored (BGR) order, decoded by PIL."""
    from PIL import Image

    return PIL_to_imageStruct(Image.open(io.BytesIO(raw_bytes)))


def PIL_decode_and_resize(size: tuple[int, int]) -> Callable[[bytes], np.ndarray]:  # noqa: N802
    """A decoder (for :func:`readImagesWithCustomFn`) that also resizes to ``size`` (w, h)."""

    def decode(raw_bytes: bytes) -> np.ndarray:
        from PIL import Image

        return PIL_to_imageStruct(Image.open(io.BytesIO(raw_bytes)).resize(size))

    return decode


def filesToDF(sc: Any, path: str, numPartitions: int | None = None) -> DataFrame:  # noqa: N802, N803
    """Files under ``path`` -> ``(filePath string, fileData binary)`` rows, as in sparkdl (``sc``
    is accepted for its signature; the active session reads the files)."""
    files = SparkSession.active().read.format("binaryFile").load(path)
    if numPartitions:
        files = files.repartition(numPartitions)
    return files.select(F.col("path").alias("filePath"), F.col("content").alias("fileData"))


def readImagesWithCustomFn(  # noqa: N802
    path: str, decode_f: Callable[[bytes], np.ndarray], numPartition: int | None = None,  # noqa: N803
) -> DataFrame:
    """Images under ``path`` -> a DataFrame with one ``image`` struct column, decoded on the
    executors by ``decode_f`` (raw bytes -> array in stored order). A file ``decode_f`` fails
    on gets a null image, as in sparkdl."""
    spark = SparkSession.active()
    files = spark.read.format("binaryFile").load(path)
    if numPartition:
        files = files.repartition(numPartition)

    def decode(origin: str, content: bytes) -> dict | None:
        try:
            return array_to_struct(np.asarray(decode_f(bytes(content))), origin)
        except Exception:  # sparkdl's contract: an undecodable file is a null image
            return None

    return files.select(F.udf(decode, IMAGE_STRUCT)("path", "content").alias("image"))


def createResizeImageUDF(size: tuple[int, int]):  # noqa: N802
    """A UDF resizing an 8-bit image struct column to ``size`` (height, width) with PIL."""
    if len(size) != 2:
        raise ValueError(f"size must be (height, width). Received: size={size!r}")
    height, width = int(size[0]), int(size[1])

    def resize(image: Any) -> dict | None:
        if image is None:
            return None
        from pipelines.imaging.resize import resize as resize_array

        array = struct_to_array(image)
        return array_to_struct(resize_array(array, height, width), image["origin"])

    return F.udf(resize, IMAGE_STRUCT)
