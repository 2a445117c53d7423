"""Building Keras models (imports Keras, and so TensorFlow, when called): application backbones
from the registry (:mod:`pipelines.ml.applications`) and CNNs from architecture specs
(:mod:`pipelines.ml.architectures`), with the helpers their callers share.

Executor code calls these once per Python worker; the driver calls them to train.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.ml.applications import KERAS_CACHE, RANDOM_INIT_SEED, get_spec
from pipelines.ml.architectures import TOP1, ArchitectureSpec

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)


#: Keras dtype policy of each resolved precision (see :mod:`pipelines.ml.precision`).
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


@contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Keras' global dtype policy set for ``precision`` while models are built, then restored.

    Keras applications take no ``dtype`` argument: their layers pick the global policy up
    when they are created. Weights stay float32 under ``mixed_bfloat16`` (same initialisation,
    same weights files); only the computation is bfloat16.
    """
    import keras

    if precision not in DTYPE_POLICIES:
        raise ValueError(
            f"precision must be one of {tuple(DTYPE_POLICIES)} once resolved. "
            f"Received: precision={precision!r}"
        )
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(DTYPE_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(saved)


def build_application(
    name: str, input_size: int, weights: str, include_top: bool = False, pooling: str = "avg",
    precision: str = "float32",
) -> Any:
    """Build a Keras application model with its weights (executor side; imports Keras).

    Args:
        name: a key of :data:`MODELS`.
        input_size: height = width of the input, already resolved (see :func:`resolve_size`).
        weights: ``"imagenet"``, ``"none"`` or a local weights file.
        include_top: the full classifier (softmax over 1000 classes) instead of the
            features of the last convolutional block.
        pooling: without the top, ``"avg"`` or ``"max"`` global pooling of the last block, or
            ``"none"``: the block itself (batch, h, w, channels), as sparkdl returned it
            (flattened by the caller).
        precision: ``float32`` or ``bfloat16`` (resolved; see :mod:`pipelines.ml.precision`).

    Raises:
        ValueError: the weights are missing or do not fit the model; the message names both.
    """
    with dtype_policy(precision):
        return _build_application(name, input_size, weights, include_top, pooling)


def _build_application(
    name: str, input_size: int, weights: str, include_top: bool, pooling: str
) -> Any:
    import keras

    spec = get_spec(name)
    constructor = getattr(getattr(keras.applications, spec.module), spec.name)
    shape = (input_size, input_size, 3)
    kwargs: dict[str, Any] = {"include_top": include_top, "input_shape": shape}
    if not include_top:
        if pooling not in ("avg", "max", "none"):
            raise ValueError(f"pooling must be 'avg', 'max' or 'none'. Received: {pooling!r}")
        kwargs["pooling"] = None if pooling == "none" else pooling
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


def with_precision(model: Any, precision: str, shown: str = "") -> Any:
    """A loaded Keras model for inference in ``precision`` (``float32``: ``model`` itself).

    For ``bfloat16`` every layer but the input and output layers is rebuilt under
    ``mixed_bfloat16`` with the same weights; the output layers stay float32 so probabilities
    keep float32 precision. A model Keras cannot clone (a subclassed model) runs in float32,
    and the log says so.
    """
    import keras

    if precision not in DTYPE_POLICIES:
        raise ValueError(
            f"precision must be one of {tuple(DTYPE_POLICIES)} once resolved. "
            f"Received: precision={precision!r}"
        )
    if precision == "float32":
        return model
    outputs = {tensor._keras_history.operation.name for tensor in model.outputs}

    def rebuild(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer) and layer.name not in outputs:
            config["dtype"] = DTYPE_POLICIES[precision]
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=rebuild)
        clone.set_weights(model.get_weights())
    except Exception as exc:  # subclassed models cannot be cloned
        logger.warning("cannot run model %s in %s (%s: %s); running it in float32",
                       shown or model.name, precision, type(exc).__name__, exc)
        return model
    return clone


def predict_function(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``model``'s forward pass as one ``tf.function`` traced once, for any batch size.

    ``predict_on_batch`` traces again for each new batch size it meets (a worker's last,
    partial batch costs a second graph build); an input signature with a free batch
    dimension is traced on the first call only (``.traces()`` counts). Outputs are float32
    numpy arrays whatever the model's compute dtype; ``.input_shape`` is the model's input
    shape without the batch dimension.
    """
    import tensorflow as tf

    shape = tuple(model.inputs[0].shape)[1:]
    spec = tf.TensorSpec((None, *shape), tf.float32)

    @tf.function(input_signature=[spec], autograph=False)
    def forward(x):
        outputs = model(x, training=False)
        return tf.nest.map_structure(lambda y: tf.cast(y, tf.float32), outputs)

    def predict(batch: np.ndarray) -> np.ndarray:
        outputs = forward(np.asarray(batch, dtype=np.float32))
        return tf.nest.map_structure(lambda y: y.numpy(), outputs)

    predict.traces = forward.experimental_get_tracing_count  # type: ignore[attr-defined]
    predict.input_shape = shape  # type: ignore[attr-defined]
    return predict


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


def layer_config(layer: dict[str, Any]) -> dict[str, Any]:
    """``{ClassName: {...}}`` or ``{class_name: ..., config: {...}}`` -> Keras' serialized form."""
    if "class_name" in layer:
        return {"module": "keras.layers", **layer, "config": dict(layer.get("config") or {})}
    (name, args), = layer.items()
    return {"module": "keras.layers", "class_name": name, "config": dict(args or {})}


def build_architecture(spec: ArchitectureSpec, num_classes: int, name: str = "cnn") -> keras.Model:
    """An uncompiled ``keras.Sequential`` for ``spec``; checks it outputs ``num_classes`` values.

    The last ``Dense`` layer of the spec is the output layer: its ``units`` are set to
    ``num_classes``, so one architecture serves any number of classes.

    Raises:
        ValueError: a layer is unknown to Keras or has bad arguments, or the output shape is
            not ``(None, num_classes)``; the message names the layer and what was received.
    """
    import keras

    configs = [layer_config(raw) for raw in spec.layers]
    dense = [i for i, c in enumerate(configs) if c["class_name"] == "Dense"]
    if dense:
        configs[dense[-1]]["config"]["units"] = num_classes
    layers = [keras.Input(shape=tuple(spec.input_shape), name="image")]
    for i, (raw, config) in enumerate(zip(spec.layers, configs, strict=True)):
        try:
            layers.append(keras.layers.deserialize(config))
        except Exception as exc:  # unknown class, unknown or bad argument
            raise ValueError(f"cannot build layers[{i}]: {exc}. Received: {raw!r}") from None
    try:
        model = keras.Sequential(layers, name=name)
    except Exception as exc:  # shapes that do not chain
        raise ValueError(f"the layers do not fit together: {exc}") from None
    if tuple(model.output_shape) != (None, num_classes):
        raise ValueError(
            f"the model must output (None, num_classes={num_classes}). "
            f"Received: output_shape={model.output_shape}"
        )
    return model


def compile_model(model: keras.Model, spec: ArchitectureSpec, steps_per_epoch: int,
                  epochs: int) -> None:
    """Compile with the spec's loss, optimizer, learning-rate schedule and metrics (+ top-1)."""
    import keras

    optimizer = keras.optimizers.get(spec.optimizer)
    if spec.learning_rate is not None:
        rate: Any = spec.learning_rate
        if spec.lr_schedule == "cosine":
            total = max(1, steps_per_epoch * epochs)
            warmup = min(total - 1, int(round(spec.warmup_epochs * steps_per_epoch)))
            rate = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=spec.learning_rate * (0.1 if warmup else 1.0),
                decay_steps=max(1, total - warmup),
                alpha=spec.min_lr_ratio,
                warmup_target=spec.learning_rate if warmup else None,
                warmup_steps=warmup,
            )
        config = {**optimizer.get_config(), "learning_rate": rate}
        optimizer = optimizer.__class__.from_config(config)
    metrics = [m for m in spec.metrics if m != TOP1]
    metrics.append(keras.metrics.CategoricalAccuracy(name=TOP1))
    model.compile(optimizer=optimizer, loss=keras.losses.get(spec.loss), metrics=metrics)


def summary_text(model: keras.Model) -> str:
    """``model.summary()`` as plain text, all columns.

    Keras renders it with a rich console whose width comes from ``COLUMNS`` (80 when there is
    no terminal, which cuts the parameter column off); it is widened for the call.
    """
    lines: list[str] = []
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "120"
    try:
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=110)
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines).rstrip()


def steps(rows: int, batch_size: int) -> int:
    return max(1, math.ceil(rows / batch_size))
