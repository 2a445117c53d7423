"""``KerasImageFileTransformer``: a saved Keras model applied to images named by URI.

sparkdl's stage of the same name on Spark 4 and Keras 3. ``inputCol`` holds image URIs (paths
the workers can open); ``imageLoader``, a picklable function written as for Keras, loads and
preprocesses one image into the model's input array ((H, W, C) or (1, H, W, C), RGB); the
model (``modelFile``, ``.keras`` or ``.h5``) runs on batches of ``batchSize`` loaded images::

    def load_and_preprocess(uri):
        image = keras.utils.img_to_array(keras.utils.load_img(uri, target_size=(299, 299)))
        return keras.applications.inception_v3.preprocess_input(image[None])

    transformer = KerasImageFileTransformer(inputCol="uri", outputCol="predictions",
                                            modelFile="/models/inception.h5",
                                            imageLoader=load_and_preprocess, outputMode="vector")

``outputMode="vector"`` (default) gives the flattened output as a Spark ML vector;
``"image"`` gives an image struct of the (H, W, C) output with float32 pixels (OpenCV mode
``CV_32FC<C>``, channels stored BGR(A) like every colour struct; read it back with
:func:`pipelines.imaging.image_struct.struct_to_array`). A URI the loader fails on, or whose
array does not fit the model, is invalid: ``handleInvalid`` fails the query naming the URI
(``error``, the default), drops the row (``skip``) or keeps it with a null output (``keep``);
executors log the loader's error.

The model is shipped and cached like :class:`~pipelines.ml.classifier.KerasImageClassifier`'s.
The stage saves and loads like any Spark ML stage; ``imageLoader`` is saved pickled by value
with cloudpickle (:class:`~pipelines.ml.params.FunctionParamsWritable`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector, predict_batch_udf
from pyspark.ml.param import Param, Params
from pyspark.ml.util import DefaultParamsReadable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BinaryType,
    StringType,
)

from pipelines.imaging.image_struct import OCV_FLOAT_MODE_BY_CHANNELS
from pipelines.ml.classifier import file_model_loader, prepared_model
from pipelines.ml.inference import VALID, VALUES_OUTPUT, apply_handle_invalid, when_valid
from pipelines.ml.params import (
    FunctionParamsWritable,
    HasBatchSize,
    HasHandleInvalid,
    HasInputCol,
    HasModelFile,
    HasOutputCol,
    HasOutputMode,
    check_input_column,
    check_output_columns,
    function_or_none,
)
from pipelines.ml.shipping import ModelFile

logger = logging.getLogger(__name__)



class KerasImageFileTransformerParams(HasInputCol, HasOutputCol, HasModelFile, HasOutputMode,
                                      HasHandleInvalid, HasBatchSize):
    imageLoader: Param[Any] = Param(
        Params._dummy(), "imageLoader",
        "picklable function: image URI -> the model's input array (H, W, C) or (1, H, W, C), RGB",
        typeConverter=function_or_none("imageLoader"),
    )

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(inputCol="uri", outputCol="predictions", imageLoader=None)

    def getImageLoader(self) -> Any:
        return self.getOrDefault(self.imageLoader)

    def setImageLoader(self, value: Any):
        return self._set(imageLoader=value)


class KerasImageFileTransformer(Transformer, KerasImageFileTransformerParams,
                                DefaultParamsReadable, FunctionParamsWritable):
    """Image URIs in ``inputCol`` -> the Keras model's output on the loaded images.

    Args (every one has a default, set in :class:`KerasImageFileTransformerParams`):
        inputCol: string column of image URIs (``"uri"``).
        outputCol: output column (``"predictions"``); must not exist yet.
        modelFile: a ``.keras`` or ``.h5`` model taking (None, H, W, C); local path or URI.
        imageLoader: picklable function URI -> model input array (required).
        outputMode: ``"vector"`` (default) or ``"image"``.
        batchSize: images per model call (64).
        handleInvalid: ``"error"`` (default), ``"skip"`` or ``"keep"`` (null output).
    """

    @keyword_only
    def __init__(self, *, inputCol: str | None = None, outputCol: str | None = None,
                 modelFile: str | None = None, imageLoader: Any = None,
                 outputMode: str | None = None, batchSize: int | None = None,
                 handleInvalid: str | None = None):
        super().__init__()
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    @keyword_only
    def setParams(self, *, inputCol: str | None = None, outputCol: str | None = None,
                  modelFile: str | None = None, imageLoader: Any = None,
                  outputMode: str | None = None, batchSize: int | None = None,
                  handleInvalid: str | None = None):
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def _transform(self, dataset: DataFrame) -> DataFrame:
        column, output_col = self.getInputCol(), self.getOutputCol()
        check_input_column(dataset, column)
        check_output_columns(dataset, outputCol=output_col)
        data_type = dataset.schema[column].dataType
        if not isinstance(data_type, StringType):
            raise TypeError(f"column {column!r} must hold image URIs (string). "
                            f"Received: {data_type.simpleString()}")
        loader = self.getImageLoader()
        if loader is None:
            raise ValueError("imageLoader is not set: give a function from an image URI to the "
                             "model's input array. Received: imageLoader=None")
        path, mode = self.getModelFile(), self.getOutputMode()
        prepared = prepared_model(dataset.sparkSession, path, "modelFile")
        in_dims, out_dims = prepared.input_shape[1:], prepared.output_shape[1:]
        if len(in_dims) != 3 or any(d is None for d in in_dims):
            raise ValueError(
                "the model's input must be images of fixed size (None, height, width, channels). "
                f"Received: input_shape={prepared.input_shape} (modelFile={path!r})"
            )
        if mode == "image" and (len(out_dims) != 3 or None in out_dims
                                or out_dims[2] not in OCV_FLOAT_MODE_BY_CHANNELS):
            raise ValueError(
                "outputMode='image' needs a model output (None, height, width, 1|3|4). "
                f"Received: output_shape={prepared.output_shape} (modelFile={path!r})"
            )
        udf = _predict_udf(prepared.model_file, loader, tuple(int(d) for d in in_dims),
                           mode == "image", self.getBatchSize())
        tmp = f"__keras_image_file_{self.uid}"
        df = dataset.withColumn(tmp, udf(F.col(column)))
        detail = F.concat(F.lit(" uri="), F.coalesce(F.col(column), F.lit("null")))
        df = apply_handle_invalid(df, tmp, column, self.getHandleInvalid(), detail, what="image")
        logger.info("applying %s to the images of %r (output %s)", path, column, mode)
        if mode == "vector":
            output = array_to_vector(F.col(tmp)["values"])
        else:
            height, width, channels = (int(d) for d in out_dims)
            output = F.struct(
                F.col(column).alias("origin"), F.lit(height).alias("height"),
                F.lit(width).alias("width"), F.lit(channels).alias("nChannels"),
                F.lit(OCV_FLOAT_MODE_BY_CHANNELS[channels]).alias("mode"),
                _float32_bytes()(F.col(tmp)["values"]).alias("data"),
            )
        return df.withColumn(output_col, when_valid(tmp, output)).drop(tmp)


def _load(loader: Any, uri: str | None, dims: tuple[int, ...]) -> np.ndarray | None:
    """``loader(uri)`` as a float32 (H, W, C) array; None (logged) when it fails or misfits."""
    if uri is None:
        return None
    try:
        array = np.asarray(loader(uri), dtype=np.float32)
        if array.ndim == len(dims) + 1 and array.shape[0] == 1:
            array = array[0]
        if array.shape != dims:
            raise ValueError(f"imageLoader returned shape {array.shape}; the model takes {dims}")
        return array
    except Exception as exc:  # the user's loader: any failure makes the row invalid
        logger.warning("cannot load image %r: %s: %s", uri, type(exc).__name__, exc)
        return None


def _predict_udf(model_file: ModelFile, loader: Any, dims: tuple[int, ...], as_image: bool,
                 batch_size: int):
    """``predict_batch_udf`` from URIs to (flattened output, valid)."""
    load_model = file_model_loader(model_file)

    def make():
        model = load_model()

        def predict(uris: np.ndarray) -> dict[str, np.ndarray]:
            arrays = [_load(loader, uri, dims) for uri in uris]
            valid = np.array([a is not None for a in arrays], dtype=bool)
            batch = np.stack([a for a in arrays if a is not None] or [np.zeros(dims, np.float32)])
            out = np.asarray(model.predict_on_batch(batch), dtype=np.float32)
            if as_image and out.shape[-1] in (3, 4):  # stored order is BGR(A)
                out = out[..., [2, 1, 0, 3][: out.shape[-1]]]
            out = out.reshape(len(out), -1)
            full = np.zeros((len(uris), out.shape[1]), np.float32)
            full[valid] = out[: int(valid.sum())]
            return {"values": full, VALID: valid.astype(np.int32)}

        return predict

    udf = predict_batch_udf(make, return_type=VALUES_OUTPUT, batch_size=batch_size)
    return udf.asNondeterministic()


def _float32_bytes():
    """A pandas UDF: float array -> its float32 bytes (an image struct's ``data``)."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(BinaryType())
    def pack(values):
        return values.map(lambda v: None if v is None else np.asarray(v, np.float32).tobytes())

    return pack
