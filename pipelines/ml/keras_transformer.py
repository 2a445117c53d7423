"""``KerasTransformer``: a saved Keras model applied to a column of arrays or vectors.

sparkdl's stage of the same name on Spark 4 and Keras 3: ``modelFile`` (``.keras`` or ``.h5``)
is applied to ``inputCol`` and the model output, flattened, goes to ``outputCol`` as
``array<float>``::

    transformer = KerasTransformer(inputCol="features", outputCol="predictions",
                                   modelFile="/models/binary.h5")

The input column holds ``array<numeric>``, ``array<array<numeric>>`` (a 2-D tensor per row, as
sparkdl allowed) or Spark ML vectors; each row is reshaped to the model's input shape, whose
element count it must have. A row whose value is null, has null elements or has the wrong
number of elements is invalid: ``handleInvalid`` fails the query naming the column (``error``,
the default), drops it (``skip``) or keeps it with a null output (``keep``).

The model file is shipped and loaded like :class:`~pipelines.ml.classifier.KerasImageClassifier`'s
(once per worker, kept in the worker's model cache by the file's content digest); rows go to
``predict_batch_udf`` in batches of ``batchSize``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import predict_batch_udf, vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DataType,
    FloatType,
    NumericType,
)

from pipelines.ml.classifier import file_model_loader, prepared_model
from pipelines.ml.inference import VALID, VALUES_OUTPUT, apply_handle_invalid, when_valid
from pipelines.ml.params import (
    HasBatchSize,
    HasHandleInvalid,
    HasInputCol,
    HasModelFile,
    HasOutputCol,
    check_input_column,
    check_output_columns,
)
from pipelines.ml.shipping import ModelFile

logger = logging.getLogger(__name__)



class KerasTransformerParams(HasInputCol, HasOutputCol, HasModelFile, HasHandleInvalid,
                             HasBatchSize):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self._setDefault(inputCol="features", outputCol="predictions")


class KerasTransformer(Transformer, KerasTransformerParams, DefaultParamsReadable,
                       DefaultParamsWritable):
    """Arrays or vectors in ``inputCol`` -> the Keras model's output (``array<float>``).

    Args (every one has a default, set in :class:`KerasTransformerParams`):
        inputCol: ``array<numeric>``, ``array<array<numeric>>`` or vector column
            (``"features"``).
        outputCol: the flattened model output (``"predictions"``); must not exist yet.
        modelFile: a ``.keras`` or ``.h5`` model with one input of fixed shape; a local path or
            a URI Spark can read.
        batchSize: rows per model call (64).
        handleInvalid: ``"error"`` (default), ``"skip"`` or ``"keep"`` (null output).
    """

    @keyword_only
    def __init__(self, *, inputCol: str | None = None, outputCol: str | None = None,
                 modelFile: str | None = None, batchSize: int | None = None,
                 handleInvalid: str | None = None):
        super().__init__()
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    @keyword_only
    def setParams(self, *, inputCol: str | None = None, outputCol: str | None = None,
                  modelFile: str | None = None, batchSize: int | None = None,
                  handleInvalid: str | None = None):
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def _transform(self, dataset: DataFrame) -> DataFrame:
        column, output_col = self.getInputCol(), self.getOutputCol()
        check_input_column(dataset, column)
        check_output_columns(dataset, outputCol=output_col)
        path = self.getModelFile()
        prepared = prepared_model(dataset.sparkSession, path, "modelFile")
        dims = prepared.input_shape[1:]
        if not dims or any(d is None for d in dims):
            raise ValueError(
                "the model must take one input of fixed shape (None, d1, ...). "
                f"Received: input_shape={prepared.input_shape} (modelFile={path!r})"
            )
        size = math.prod(int(d) for d in dims)
        values = flat_floats(dataset.schema[column].dataType, F.col(column), column)
        valid = (values.isNotNull() & (F.size(values) == size)
                 & F.forall(values, lambda x: x.isNotNull()))
        zeros = F.array_repeat(F.lit(0.0).cast("float"), size)
        fed = F.when(valid, values).otherwise(zeros)

        udf = _predict_udf(prepared.model_file, tuple(int(d) for d in dims), self.getBatchSize())
        tmp = f"__keras_transformer_{self.uid}"
        df = dataset.withColumn(tmp, udf(fed, valid.cast("int")))
        df = apply_handle_invalid(df, tmp, column, self.getHandleInvalid(), what="row")
        logger.info("applying %s to %r (%d values per row)", path, column, size)
        return df.withColumn(output_col, when_valid(tmp, F.col(tmp)["values"])).drop(tmp)


def flat_floats(data_type: DataType, column: Column, name: str) -> Column:
    """A numeric array, nested array or vector column as ``array<float>``.

    Raises:
        TypeError: another type; names the column and its type.
    """
    if isinstance(data_type, VectorUDT):
        return vector_to_array(column, "float32")
    if isinstance(data_type, ArrayType):
        inner = data_type.elementType
        if isinstance(inner, ArrayType) and isinstance(inner.elementType, NumericType):
            return F.flatten(column).cast(ArrayType(FloatType()))
        if isinstance(inner, NumericType):
            return column.cast(ArrayType(FloatType()))
    raise TypeError(
        f"column {name!r} must hold numeric arrays (1-D or 2-D) or Spark ML vectors. "
        f"Received: {data_type.simpleString()}"
    )


def _predict_udf(model_file: ModelFile, dims: tuple[int, ...], batch_size: int):
    """``predict_batch_udf`` from (flat float array, valid) to (flat output, valid)."""
    load = file_model_loader(model_file)

    def make():
        model = load()

        def predict(values: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
            x = np.asarray(values, dtype=np.float32).reshape(-1, *dims)
            out = np.asarray(model.predict_on_batch(x), dtype=np.float32)
            return {"values": out.reshape(len(out), -1), VALID: valid.astype(np.int32)}

        return predict

    size = math.prod(dims)
    udf = predict_batch_udf(make, return_type=VALUES_OUTPUT, batch_size=batch_size,
                            input_tensor_shapes=[[size], None])
    return udf.asNondeterministic()
