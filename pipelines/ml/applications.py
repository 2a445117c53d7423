"""The Keras application models the featurizer and predictor can run, and how to build them.

The registry (:data:`MODELS`) is plain data, safe to import on the driver: model name -> the
``keras.applications`` module and constructor, native and minimum input size, and the length of
the pooled feature vector. Building the models (:mod:`pipelines.ml.models`) imports Keras.

Weights (``weights`` argument):

* ``"imagenet"``: Keras' own ImageNet weights, read from the Keras cache (``~/.keras/models`` or
  ``$KERAS_HOME/models``) or downloaded into it on first use.
* ``"none"``: Keras' random initialisation, seeded with :data:`RANDOM_INIT_SEED` so every worker
  and every reload builds the same network (useful for tests and benchmarks only; features of a
  random network are not a transfer-learning result).
* a path to a local weights file (``.weights.h5``, or a legacy ``.h5`` as Keras publishes them).
  Cluster paths and URLs are made local by the caller first (see
  :mod:`pipelines.ml.shipping`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One Keras application model."""

    name: str
    #: Module under ``keras.applications`` that holds the constructor and ``preprocess_input``.
    module: str
    #: Native input size (height = width) of the ImageNet-trained model.
    native_size: int
    #: Smallest input size Keras accepts with ``include_top=False``.
    min_size: int
    #: Length of the globally average-pooled feature vector.
    feature_dim: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("InceptionV3", "inception_v3", 299, 75, 2048),
        ModelSpec("Xception", "xception", 299, 71, 2048),
        ModelSpec("ResNet50", "resnet50", 224, 32, 2048),
        ModelSpec("VGG16", "vgg16", 224, 32, 512),
        ModelSpec("VGG19", "vgg19", 224, 32, 512),
        ModelSpec("MobileNetV2", "mobilenet_v2", 224, 32, 1280),
        ModelSpec("EfficientNetB0", "efficientnet", 224, 32, 1280),
    )
}

#: Number of ImageNet classes of the models' classifier heads.
IMAGENET_CLASSES = 1000
#: Where Keras keeps downloaded files (weights, the ImageNet class index).
KERAS_CACHE = os.path.join(
    os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")), "models"
)
IMAGENET_CLASS_INDEX = os.path.join(KERAS_CACHE, "imagenet_class_index.json")
#: Seed of the random initialisation (``weights="none"``): the same network in every process.
RANDOM_INIT_SEED = 0


def get_spec(name: str) -> ModelSpec:
    """The registry entry of a model name.

    Raises:
        ValueError: unknown name; lists the known ones.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"modelName must be one of {sorted(MODELS)}. Received: modelName={name!r}"
        ) from None


def resolve_size(spec: ModelSpec, input_size: int, include_top: bool = False) -> int:
    """The input size to use: ``input_size``, or the native size when it is 0.

    Raises:
        ValueError: the size is below the model's minimum.
    """
    size = input_size or spec.native_size
    if size < spec.min_size:
        raise ValueError(
            f"inputSize must be 0 (native {spec.native_size}) or >= {spec.min_size} for "
            f"{spec.name}. Received: inputSize={input_size}"
        )
    return size
