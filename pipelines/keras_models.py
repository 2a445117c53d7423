"""The Keras application models the featurizer and predictor can run, and how to build them.

The registry (:data:`MODELS`) is plain data, safe to import on the driver: model name -> the
``keras.applications`` module and constructor, native and minimum input size, and the length of
the pooled feature vector. :func:`build_model` and :func:`preprocess_fn` import Keras (and so
TensorFlow) and are meant for executor code, called once per Python worker.

Weights (``weights`` argument):

* ``"imagenet"``: Keras' own ImageNet weights, read from the Keras cache (``~/.keras/models`` or
  ``$KERAS_HOME/models``) or downloaded into it on first use.
* ``"none"``: Keras' random initialisation, seeded with :data:`RANDOM_INIT_SEED` so every worker
  and every reload builds the same network (useful for tests and benchmarks only; features of a
  random network are not a transfer-learning result).
* a path to a local weights file (``.weights.h5``, or a legacy ``.h5`` as Keras publishes them).
  Cluster paths and URLs are made local by the caller first (see
  :func:`pipelines.featurizer.ship_weights`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


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


def build_model(
    name: str, input_size: int, weights: str, include_top: bool = False
) -> Any:
    """Build a Keras application model with its weights (executor side; imports Keras).

    Args:
        name: a key of :data:`MODELS`.
        input_size: height = width of the input, already resolved (see :func:`resolve_size`).
        weights: ``"imagenet"``, ``"none"`` or a local weights file.
        include_top: the full classifier (softmax over 1000 classes) instead of the
            average-pooled features of the last convolutional block.

    Raises:
        ValueError: the weights are missing or do not fit the model; the message names both.
    """
    import keras

    spec = get_spec(name)
    constructor = getattr(getattr(keras.applications, spec.module), spec.name)
    shape = (input_size, input_size, 3)
    kwargs: dict[str, Any] = {"include_top": include_top, "input_shape": shape}
    if not include_top:
        kwargs["pooling"] = "avg"
    if weights == "imagenet":
        try:
            return constructor(weights="imagenet", **kwargs)
        except Exception as exc:  # download failure, corrupt cache file, bad size for the top
            raise ValueError(
                f"cannot load the ImageNet weights of {name} (input {input_size}x{input_size}, "
                f"include_top={include_top}) from the Keras cache {KERAS_CACHE} or by "
                f"downloading them: {type(exc).__name__}: {exc}. Put the Keras weights file in "
                f"that cache on every worker, or pass its path or URL as weights. "
                f"Received: weights='imagenet'"
            ) from exc
    # Seeded, so every worker (and every reload of a saved pipeline) builds the same network:
    # with weights="none" the random init *is* the model.
    keras.utils.set_random_seed(RANDOM_INIT_SEED)
    model = constructor(weights=None, **kwargs)
    if weights == "none":
        return model
    if not os.path.isfile(weights):
        raise ValueError(
            f"weights file for {name} does not exist on this worker. Received: weights={weights!r}"
        )
    try:
        model.load_weights(weights)
    except Exception as exc:
        raise ValueError(
            f"weights file {weights!r} does not match model {name} "
            f"(input {input_size}x{input_size}, include_top={include_top}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return model


def preprocess_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The model's own ``preprocess_input`` on float32 RGB [0, 255] batches (copies the input)."""
    import keras

    preprocess = getattr(keras.applications, get_spec(name).module).preprocess_input

    def apply(batch: np.ndarray) -> np.ndarray:
        # Keras' numpy path scales float arrays in place; never touch the caller's batch.
        return np.asarray(preprocess(np.array(batch, dtype=np.float32, copy=True)))

    return apply


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's intra-op threads in this process (0 = TensorFlow's default).

    Must run before TensorFlow executes anything; later calls (a reused worker) are ignored.
    """
    if threads <= 0:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is already initialised in this worker: keep its setting
        logger.debug("TensorFlow threads already fixed in this worker; keeping them")
