"""CNN architectures as data: the spec, the built-in specs and lookup by name (no Keras here).

An architecture is an :class:`ArchitectureSpec`: Keras layer configs in order,
the loss, the optimizer and its learning-rate schedule, the batch size and the epochs. Layers are
built with Keras' own deserializer (``keras.layers.deserialize``), so any built-in Keras layer and
any of its arguments can be used from YAML and nothing executes code from the config. Built-in
specs live in ``pipelines/resources/architectures.yaml``; ``cnn.architectures`` adds more.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TOP1 = "top1"


@functools.cache
def _builtin_docs() -> dict[str, dict[str, Any]]:
    text = resources.files("pipelines").joinpath("resources/architectures.yaml").read_text()
    return yaml.safe_load(text)


def builtin_names() -> list[str]:
    """Names of the architectures shipped with the package."""
    return sorted(_builtin_docs())


def resolve_architecture(
    name: str, extra: Mapping[str, ArchitectureSpec] | None = None
) -> ArchitectureSpec:
    """The spec called ``name``: one of ``extra`` (which win) or a built-in one."""
    extra = extra or {}
    if name in extra:
        return extra[name]
    docs = _builtin_docs()
    if name not in docs:
        raise ValueError(
            f"unknown architecture; expected one of {sorted({*docs, *extra})}. "
            f"Received: architecture={name!r}"
        )
    return ArchitectureSpec.model_validate(docs[name])


class ElasticDistortion(BaseModel):
    """Elastic distortion as Simard, Steinkraus and Platt (ICDAR 2003) describe it.

    Each pixel's displacement is uniform noise in [-1, 1] per axis, smoothed by a Gaussian of
    ``sigma`` pixels and scaled by ``alpha``; the image is resampled bilinearly (zero outside).
    Their MNIST figures, ``alpha: 34, sigma: 4``, move a pixel by about 1.4 px (one standard
    deviation) and bend strokes without breaking them. ``probability`` is the share of images
    warped in each batch (drawn afresh every epoch); the others pass unchanged, so a member sees
    both the clean and the distorted distribution, as with a distorted copy of the data beside
    the originals, without doubling the epoch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(gt=0)
    sigma: float = Field(gt=0)
    probability: float = Field(default=1.0, gt=0, le=1)


class ArchitectureSpec(BaseModel):
    """A Keras model and how it is trained, as data.

    Built by :func:`pipelines.ml.models.build_architecture`.

    ``layers`` are Keras layer configs in order, each either ``{ClassName: {arg: value}}`` or
    Keras' own serialized form ``{class_name: ..., config: {...}}``; the model is
    ``Sequential([Input(input_shape), *layers])``. Random* preprocessing layers in the list give
    on-the-fly augmentation (active in training only, saved with the model).

    ``base: <built-in name>`` starts from that built-in spec: the keys given replace its keys
    whole (a ``layers`` list replaces the built-in's list), the rest are the built-in's. The
    spec that results holds every key, so a saved spec does not depend on the built-ins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    input_shape: tuple[int, int, int] = (28, 28, 1)
    layers: list[dict[str, Any]] = Field(min_length=1)
    #: A Keras loss name or serialized loss (``{class_name: ..., config: {...}}``).
    loss: str | dict[str, Any] = "categorical_crossentropy"
    #: A Keras optimizer name or serialized optimizer.
    optimizer: str | dict[str, Any] = "adam"
    #: Peak learning rate; ``null`` keeps the optimizer's own.
    learning_rate: float | None = Field(default=None, gt=0)
    #: ``constant``, or ``cosine`` decay to ``learning_rate * min_lr_ratio`` after a linear
    #: warm-up of ``warmup_epochs``.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    #: Keras metric names compiled into the model; ``top1`` (true top-1 accuracy) is always added.
    metrics: list[str] = Field(default_factory=lambda: ["accuracy"])
    #: Training-only augmentation: each training image moved by a random whole number of pixels,
    #: up to this many, along each axis (zero fill), done on uint8 batches in the input pipeline.
    #: On a CPU it costs next to nothing, where a ``RandomTranslation`` layer (an interpolating
    #: projective transform) costs more than the convolutions of a small CNN. 0 = off.
    shift_pixels: int = Field(default=0, ge=0)
    #: Training-only augmentation: each training image warped by its own smooth random
    #: displacement field, fresh each epoch, in the input pipeline (after the shift). None = off.
    elastic_distortion: ElasticDistortion | None = None
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _start_from_base(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "base" not in data:
            return data
        changes = {k: v for k, v in data.items() if k != "base"}
        docs = _builtin_docs()
        if data["base"] not in docs:
            raise ValueError(
                f"base must name a built-in architecture, one of {sorted(docs)}. "
                f"Received: base={data['base']!r}"
            )
        description = f"the built-in {data['base']!r}"
        if changes:
            description += f", {', '.join(sorted(changes))} changed"
        return {**docs[data["base"]], "description": description, **changes}

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, layer in enumerate(layers):
            if "class_name" in layer:
                if not isinstance(layer.get("config", {}), dict):
                    raise ValueError(f"layers[{i}].config must be a mapping. Received: {layer!r}")
            elif len(layer) != 1 or not isinstance(next(iter(layer.values())) or {}, dict):
                raise ValueError(
                    f"layers[{i}] must be {{ClassName: {{arg: value}}}} or "
                    f"{{class_name: ..., config: {{...}}}}. Received: {layer!r}"
                )
        return layers
