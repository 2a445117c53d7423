"""Batch decoding of raw image inputs as ``predict_batch_udf`` hands them to the predict function.

The Spark paths (featurizer, predictor, scorer) are tested end to end in their own test files;
these tests pin the decoding rules on numpy columns shaped exactly as Spark passes them (a null
int field arrives as NaN in a float column, a null struct as a row of Nones).
"""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.sql.types import ArrayType, FloatType, StructField, StructType

from pipelines.imaging.image_struct import array_to_struct, encode_png, from_rgb
from pipelines.imaging.resize import resize
from pipelines.ml.inference import STRUCT_FIELDS, decode_inputs, image_predict_udf


def struct_columns(structs: list[dict | None]) -> list[np.ndarray]:
    """Image structs -> one numpy column per field, as ``predict_batch_udf`` passes them."""
    columns = []
    for field in STRUCT_FIELDS:
        values = [None if s is None else s[field] for s in structs]
        if field in ("origin", "data"):
            columns.append(np.array(values, dtype=object))
        else:  # Arrow -> pandas: ints with nulls become float64 with NaN
            columns.append(np.array([np.nan if v is None else v for v in values], np.float64))
    return columns


def test_struct_columns_decode_gray_and_bgr_and_flag_null_or_broken_rows():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    broken = {**array_to_struct(gray, "broken"), "data": b"short"}
    bad_mode = {**array_to_struct(gray, "mode"), "mode": 5}
    structs = [array_to_struct(gray, "g"), None, array_to_struct(from_rgb(rgb), "c"), broken,
               bad_mode]

    batch, valid = decode_inputs(struct_columns(structs), "struct", 32, 32, 3, "bilinear")

    assert valid.tolist() == [True, False, True, False, False]
    assert batch.dtype == np.uint8 and batch.shape == (2, 32, 32, 3)
    expected_gray = resize(np.repeat(gray[:, :, None], 3, axis=2), 32, 32, "bilinear")
    np.testing.assert_array_equal(batch[0], expected_gray)
    np.testing.assert_array_equal(batch[1], resize(rgb, 32, 32, "bilinear"))  # BGR -> RGB


def test_binary_column_decodes_png_and_flags_null_and_garbage():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    column = np.array([encode_png(rgb), None, b"not an image", b""], dtype=object)

    batch, valid = decode_inputs([column], "binary", 28, 28, 1, "nearest")

    assert valid.tolist() == [True, False, False, False]
    luma = (rgb.astype(np.uint32) @ np.array([299, 587, 114]) + 500) // 1000
    np.testing.assert_array_equal(batch[0, :, :, 0], luma.astype(np.uint8))


def test_image_predict_udf_rejects_bad_arguments():
    outputs = StructType([StructField("values", ArrayType(FloatType()))])
    with pytest.raises(ValueError, match="Received: 'cubic'"):
        image_predict_udf(lambda: None, "struct", (8, 8, 3), "cubic", outputs, 4)
    with pytest.raises(ValueError, match="Received: 'array'"):
        image_predict_udf(lambda: None, "array", (8, 8, 3), "nearest", outputs, 4)
