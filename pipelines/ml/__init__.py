"""The Spark ML library: sparkdl's stages on Spark 4, Keras 3 and ``predict_batch_udf``.

    from pipelines.ml import DeepImageFeaturizer, DeepImagePredictor, KerasImageClassifier
    from pipelines.ml import KerasImageEstimator

sparkdl programs can import the same stages under sparkdl's names from :mod:`pipelines.sparkdl`.

The names below are loaded on first use, so that the light modules of this package (the
application registry, architecture specs) can be imported without Spark or TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipelines.ml.tf_logging import quiet_tensorflow_import

if TYPE_CHECKING:
    from pipelines.ml.classifier import KerasImageClassifier
    from pipelines.ml.estimator import KerasImageEstimator
    from pipelines.ml.featurizer import DeepImageFeaturizer
    from pipelines.ml.keras_image_file import KerasImageFileTransformer
    from pipelines.ml.keras_transformer import KerasTransformer
    from pipelines.ml.predictor import (
        DeepImagePredictor,
        register_keras_image_udf,
        registerKerasImageUDF,
    )

#: Public name -> the module that defines it.
_EXPORTS = {
    "DeepImageFeaturizer": "pipelines.ml.featurizer",
    "DeepImagePredictor": "pipelines.ml.predictor",
    "KerasImageClassifier": "pipelines.ml.classifier",
    "KerasImageEstimator": "pipelines.ml.estimator",
    "KerasImageFileTransformer": "pipelines.ml.keras_image_file",
    "KerasTransformer": "pipelines.ml.keras_transformer",
    "register_keras_image_udf": "pipelines.ml.predictor",
    "registerKerasImageUDF": "pipelines.ml.predictor",
}

__all__ = [
    "DeepImageFeaturizer",
    "DeepImagePredictor",
    "KerasImageClassifier",
    "KerasImageEstimator",
    "KerasImageFileTransformer",
    "KerasTransformer",
    "register_keras_image_udf",
    "registerKerasImageUDF",
]


# In a Python worker this package is imported (to unpickle a UDF) before TensorFlow: its
# import-time banner then obeys TF_CPP_MIN_LOG_LEVEL, as in the driver (see tf_logging).
quiet_tensorflow_import()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines.ml' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
