"""CNN architectures as data: built-in specs, lookup by name, and Keras models built from them.

An architecture is an :class:`pipelines.config.ArchitectureSpec`: Keras layer configs in order,
the loss, the optimizer and its learning-rate schedule, the batch size and the epochs. Layers are
built with Keras' own deserializer (``keras.layers.deserialize``), so any built-in Keras layer and
any of its arguments can be used from YAML and nothing executes code from the config. Built-in
specs live in ``pipelines/resources/architectures.yaml``; ``cnn.architectures`` adds more.
"""

from __future__ import annotations

import functools
import logging
import math
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # keras is imported only where a model is built
    import keras

    from pipelines.config import ArchitectureSpec, CnnConfig

logger = logging.getLogger(__name__)

TOP1 = "top1"


@functools.cache
def _builtin_docs() -> dict[str, dict[str, Any]]:
    text = resources.files("pipelines").joinpath("resources/architectures.yaml").read_text()
    return yaml.safe_load(text)


def builtin_names() -> list[str]:
    """Names of the architectures shipped with the package."""
    return sorted(_builtin_docs())


def resolve_architecture(cfg: CnnConfig) -> ArchitectureSpec:
    """The spec named by ``cfg.architecture`` (configured ones win over built-in ones)."""
    from pipelines.config import ArchitectureSpec

    if cfg.architecture in cfg.architectures:
        return cfg.architectures[cfg.architecture]
    docs = _builtin_docs()
    if cfg.architecture not in docs:
        raise ValueError(
            f"unknown architecture; expected one of {sorted({*docs, *cfg.architectures})}. "
            f"Received: architecture={cfg.architecture!r}"
        )
    return ArchitectureSpec.model_validate(docs[cfg.architecture])


def layer_config(layer: dict[str, Any]) -> dict[str, Any]:
    """``{ClassName: {...}}`` or ``{class_name: ..., config: {...}}`` -> Keras' serialized form."""
    if "class_name" in layer:
        return {"module": "keras.layers", **layer, "config": dict(layer.get("config") or {})}
    (name, args), = layer.items()
    return {"module": "keras.layers", "class_name": name, "config": dict(args or {})}


def build_model(spec: ArchitectureSpec, num_classes: int, name: str = "cnn") -> keras.Model:
    """An uncompiled ``keras.Sequential`` for ``spec``; checks it outputs ``num_classes`` values.

    Raises:
        ValueError: a layer is unknown to Keras or has bad arguments, or the output shape is
            not ``(None, num_classes)``; the message names the layer and what was received.
    """
    import keras

    layers = [keras.Input(shape=tuple(spec.input_shape), name="image")]
    for i, raw in enumerate(spec.layers):
        config = layer_config(raw)
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
    import os

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
