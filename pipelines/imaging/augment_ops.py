"""Augmentation operations: validated specs, and one adapter over Augmentor's operation classes.

Every operation is configured as a mapping with an ``op`` name, a ``probability`` and its own
parameters (see ``docs/augment.md``); :func:`parse_operations` validates a list of them with
pydantic, so an unknown operation or parameter, or a bad value, fails on config load.

:class:`Augmenter` applies an ordered list of operations to one PIL image. Randomness never comes
from module state: for operation ``i`` of output image ``sample`` of ``source_id``, a BLAKE2b hash
of ``(seed, source_id, sample, i)`` gives a uniform number (the operation fires when it is below
``probability``, exactly, not rounded to 0.1 as ``Augmentor.Pipeline`` does) and a 63-bit
operation seed, so an image is the same whatever the partitioning, the number of executors or the
order in which images are processed (and one hash per operation costs ~1 us, where a numpy
``Generator`` per image cost ~20 us). Augmentor's operation classes draw from the
``random`` and ``numpy.random`` modules; while one of them runs, the names ``random`` and ``np`` of
``Augmentor.Operations`` are pointed at generators seeded from that operation seed (and put back
afterwards), so Augmentor never touches, nor depends on, the process-wide generators.
``Augmentor.Pipeline`` is never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class OpSpec(BaseModel):
    """Base of every operation spec: frozen, unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Chance that the operation is applied to a sample, in [0, 1]; not rounded.
    probability: float = Field(default=1.0, ge=0.0, le=1.0)

    def params(self) -> dict[str, Any]:
        """The operation's own parameters (without ``op`` and ``probability``)."""
        return self.model_dump(exclude={"op", "probability"})


def _ordered(spec: OpSpec, low: str, high: str) -> OpSpec:
    lo, hi = getattr(spec, low), getattr(spec, high)
    if lo > hi:
        raise ValueError(f"{low} must be <= {high}. Received: {low}={lo}, {high}={hi}")
    return spec


class _MinMax(OpSpec):
    min_factor: float = Field(gt=0)
    max_factor: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self):
        return _ordered(self, "min_factor", "max_factor")


class Rotate(OpSpec):
    """Rotate by a whole number of degrees, crop the largest inner rectangle, resize back."""

    op: Literal["rotate"]
    max_left: int = Field(default=25, ge=0, le=25)
    max_right: int = Field(default=25, ge=0, le=25)


class RotateWithoutCrop(OpSpec):
    """Rotate; corners are filled with ``fill``. ``expand`` grows the canvas to fit."""

    op: Literal["rotate_without_crop"]
    max_left: int = Field(default=25, ge=0, le=180)
    max_right: int = Field(default=25, ge=0, le=180)
    expand: bool = False
    fill: int = Field(default=0, ge=0, le=255)


class Rotate90(OpSpec):
    op: Literal["rotate90", "rotate180", "rotate270", "rotate_random_90"]


class Zoom(_MinMax):
    """Zoom about the centre by a factor in [min_factor, max_factor]; same size out."""

    op: Literal["zoom"]


class ZoomRandom(OpSpec):
    """Crop ``percentage_area`` of each side at a random place and resize back."""

    op: Literal["zoom_random"]
    percentage_area: float = Field(gt=0.1, le=1.0)
    randomise: bool = False


class CropBySize(OpSpec):
    """Crop ``width`` x ``height`` pixels, centred or at a random place (smaller images kept)."""

    op: Literal["crop_by_size"]
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    centre: bool = True


class CropPercentage(OpSpec):
    """Crop a fraction of each side: ``crop_centre`` in the middle, ``crop_random`` anywhere."""

    op: Literal["crop_centre", "crop_random"]
    percentage_area: float = Field(gt=0.1, lt=1.0)
    randomise_percentage_area: bool = False


class Skew(OpSpec):
    """Perspective skew by up to ``magnitude`` (0-1) of the larger side."""

    op: Literal["skew", "skew_left_right", "skew_top_bottom", "skew_tilt", "skew_corner"]
    magnitude: float = Field(default=0.5, gt=0.0, le=1.0)


class Shear(OpSpec):
    op: Literal["shear"]
    max_shear_left: int = Field(default=10, ge=0, le=25)
    max_shear_right: int = Field(default=10, ge=0, le=25)


class RandomDistortion(OpSpec):
    """Elastic distortion: a ``grid_width`` x ``grid_height`` mesh moved by up to ``magnitude``."""

    op: Literal["random_distortion"]
    grid_width: int = Field(default=4, ge=2, le=64)
    grid_height: int = Field(default=4, ge=2, le=64)
    magnitude: int = Field(default=2, ge=1)


class GaussianDistortion(OpSpec):
    """Elastic distortion whose strength follows a normal surface (Augmentor's parameters)."""

    op: Literal["gaussian_distortion"]
    grid_width: int = Field(default=4, ge=2, le=64)
    grid_height: int = Field(default=4, ge=2, le=64)
    magnitude: int = Field(default=2, ge=1)
    corner: Literal["bell", "ul", "ur", "dl", "dr"] = "bell"
    method: Literal["in", "out"] = "in"
    mex: float = 0.5
    mey: float = 0.5
    sdx: float = Field(default=0.05, gt=0)
    sdy: float = Field(default=0.05, gt=0)


class Flip(OpSpec):
    op: Literal["flip_left_right", "flip_top_bottom", "flip_random"]


class Enhance(_MinMax):
    """Brightness, contrast or colour saturation times a factor in [min_factor, max_factor]."""

    op: Literal["random_brightness", "random_contrast", "random_color"]


class NoParams(OpSpec):
    """Greyscale keeps the image's channel count (RGB stays 3 equal channels)."""

    op: Literal["histogram_equalisation", "invert", "greyscale"]


class BlackAndWhite(OpSpec):
    op: Literal["black_and_white"]
    threshold: int = Field(default=128, ge=0, le=255)


class RandomErasing(OpSpec):
    """Replace a random rectangle of up to ``rectangle_area`` of each side with noise."""

    op: Literal["random_erasing"]
    rectangle_area: float = Field(default=0.5, ge=0.1, le=1.0)


class Resize(OpSpec):
    op: Literal["resize"]
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)
    resample_filter: Literal["NEAREST", "BILINEAR", "BICUBIC", "LANCZOS"] = "BICUBIC"


class Scale(OpSpec):
    """Scale both sides by ``scale_factor`` (the image grows or shrinks)."""

    op: Literal["scale"]
    scale_factor: float = Field(gt=0.0, le=16.0)


class Shift(OpSpec):
    """Translate by up to ``max_x``/``max_y`` of the width/height (whole pixels), fill ``fill``."""

    op: Literal["shift"]
    max_x: float = Field(default=0.1, ge=0.0, le=1.0)
    max_y: float = Field(default=0.1, ge=0.0, le=1.0)
    fill: int = Field(default=0, ge=0, le=255)


class GaussianNoise(OpSpec):
    """Add normal noise of a standard deviation in [min_sigma, max_sigma] (pixel units)."""

    op: Literal["gaussian_noise"]
    min_sigma: float = Field(default=5.0, ge=0.0)
    max_sigma: float = Field(default=20.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self):
        return _ordered(self, "min_sigma", "max_sigma")


class GaussianBlur(OpSpec):
    """Gaussian blur with a radius in [min_radius, max_radius] pixels."""

    op: Literal["gaussian_blur"]
    min_radius: float = Field(default=0.5, ge=0.0)
    max_radius: float = Field(default=1.5, ge=0.0)

    @model_validator(mode="after")
    def _check(self):
        return _ordered(self, "min_radius", "max_radius")


OPERATION_MODELS: tuple[type[OpSpec], ...] = (
    Rotate, RotateWithoutCrop, Rotate90, Zoom, ZoomRandom, CropBySize, CropPercentage, Skew,
    Shear, RandomDistortion, GaussianDistortion, Flip, Enhance, NoParams, BlackAndWhite,
    RandomErasing, Resize, Scale, Shift, GaussianNoise, GaussianBlur,
)

#: Every operation name, in documentation order.
OPERATION_NAMES: tuple[str, ...] = tuple(
    name for model in OPERATION_MODELS
    for name in model.model_fields["op"].annotation.__args__  # type: ignore[union-attr]
)

Operation = Annotated[
    Rotate | RotateWithoutCrop | Rotate90 | Zoom | ZoomRandom | CropBySize | CropPercentage
    | Skew | Shear | RandomDistortion | GaussianDistortion | Flip | Enhance | NoParams
    | BlackAndWhite | RandomErasing | Resize | Scale | Shift | GaussianNoise | GaussianBlur,
    Field(discriminator="op"),
]

_OPERATIONS = TypeAdapter(list[Operation])

#: The seed notebook's augmentation: rotate with probability 0.9 by up to 25 degrees either way.
SEED_OPERATIONS = ({"op": "rotate", "probability": 0.9, "max_left": 25, "max_right": 25},)


def parse_operations(items: Sequence[Mapping[str, Any]]) -> list[OpSpec]:
    """Validate an ordered list of operation mappings.

    Raises:
        ValueError: an item is not a mapping, names no or an unknown ``op``, has an unknown
            parameter or a bad value; the message names the item and the value received.
    """
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"operation #{index} must be a mapping. Received: {item!r}")
        name = item.get("op")
        if name not in OPERATION_NAMES:
            raise ValueError(
                f"operation #{index}: unknown op {name!r}; expected one of "
                f"{', '.join(OPERATION_NAMES)}. Received: {dict(item)!r}"
            )
    try:
        return _OPERATIONS.validate_python(list(items))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            where = f"operation #{loc[0]} ({items[int(loc[0])]['op']})" if loc else "operations"
            key = ".".join(loc[2:]) or "?"
            if err["type"] == "extra_forbidden":
                received = f"{key}={err['input']!r}"
                lines.append(f"{where}: unknown parameter {key!r}. Received: {received}")
            else:
                lines.append(f"{where}: {key}: {err['msg']}. Received: {key}={err['input']!r}")
        raise ValueError("; ".join(lines)) from None


# --- Running operations ---------------------------------------------------------------------


def op_draw(seed: int, source_id: str, sample: int, index: int) -> tuple[float, int]:
    """The draws of operation ``index`` for one output image: a uniform number in [0, 1)
    (53 bits) and a 63-bit operation seed, from a hash of the four values only."""
    digest = hashlib.blake2b(f"{seed}\x1f{source_id}\x1f{sample}\x1f{index}".encode(),
                             digest_size=16).digest()
    uniform = (int.from_bytes(digest[:8], "little") >> 11) * 2.0**-53
    return uniform, int.from_bytes(digest[8:], "little") >> 1


class _Recorder:
    """Stands in for a random module: forwards to ``generator``, records scalar draws."""

    def __init__(self, generator: Any, draws: list[Any]):
        self._generator = generator
        self._draws = draws

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._generator, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            value = method(*args, **kwargs)
            if isinstance(value, int | float | str):
                self._draws.append(value.item() if isinstance(value, np.generic) else value)
            return value

        return call


class _NumpyProxy:
    """``numpy`` as Augmentor sees it during one call: ``np.random`` is a seeded RandomState."""

    def __init__(self, seed: int, draws: list[Any]):
        self._seed = seed
        self._draws = draws
        self._random: _Recorder | None = None

    @property
    def random(self) -> _Recorder:
        if self._random is None:
            state = np.random.RandomState(np.random.MT19937(self._seed))
            self._random = _Recorder(state, self._draws)
        return self._random

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


_PATCH_LOCK = threading.RLock()


@contextmanager
def _augmentor_random(seed: int):
    """Point ``random`` and ``np.random`` of ``Augmentor.Operations`` at generators seeded by
    ``seed`` for the duration of the block; yields the list of scalar draws made."""
    import Augmentor.Operations as module

    draws: list[Any] = []
    with _PATCH_LOCK:
        saved = module.random, module.np
        module.random = _Recorder(random.Random(seed), draws)
        module.np = _NumpyProxy(seed, draws)
        try:
            yield draws
        finally:
            module.random, module.np = saved


def _angle(draws: list[Any]) -> dict[str, Any]:
    # RotateRange/RotateStandard draw left, right, then which of them to use.
    return {"angle": draws[0] if draws[2] == 0 else draws[1]}


#: op name -> (Augmentor class name, constructor kwargs from the spec, names for the draws).
_AUGMENTOR: dict[str, tuple[str, Callable[[Any], dict[str, Any]], Callable | None]] = {
    "rotate": ("RotateRange", lambda s: dict(max_left_rotation=s.max_left,
                                             max_right_rotation=s.max_right), _angle),
    "rotate_without_crop": ("RotateStandard", lambda s: dict(
        max_left_rotation=s.max_left, max_right_rotation=s.max_right, expand=s.expand,
        fillcolor=s.fill), _angle),
    "rotate90": ("Rotate", lambda s: dict(rotation=90), None),
    "rotate180": ("Rotate", lambda s: dict(rotation=180), None),
    "rotate270": ("Rotate", lambda s: dict(rotation=270), None),
    "rotate_random_90": ("Rotate", lambda s: dict(rotation=-1),
                         lambda d: {"angle": 90 * d[0]}),
    "zoom": ("Zoom", lambda s: dict(min_factor=s.min_factor, max_factor=s.max_factor),
             lambda d: {"factor": round(d[0], 2)}),
    "zoom_random": ("ZoomRandom", lambda s: dict(percentage_area=s.percentage_area,
                                                 randomise=s.randomise), None),
    "crop_by_size": ("Crop", lambda s: dict(width=s.width, height=s.height, centre=s.centre),
                     None),
    "crop_centre": ("CropPercentage", lambda s: dict(
        percentage_area=s.percentage_area, centre=True,
        randomise_percentage_area=s.randomise_percentage_area), None),
    "crop_random": ("CropPercentage", lambda s: dict(
        percentage_area=s.percentage_area, centre=False,
        randomise_percentage_area=s.randomise_percentage_area), None),
    "skew": ("Skew", lambda s: dict(skew_type="RANDOM", magnitude=s.magnitude), None),
    "skew_left_right": ("Skew", lambda s: dict(skew_type="TILT_LEFT_RIGHT",
                                               magnitude=s.magnitude), None),
    "skew_top_bottom": ("Skew", lambda s: dict(skew_type="TILT_TOP_BOTTOM",
                                               magnitude=s.magnitude), None),
    "skew_tilt": ("Skew", lambda s: dict(skew_type="TILT", magnitude=s.magnitude), None),
    "skew_corner": ("Skew", lambda s: dict(skew_type="CORNER", magnitude=s.magnitude), None),
    "shear": ("Shear", lambda s: dict(max_shear_left=s.max_shear_left,
                                      max_shear_right=s.max_shear_right), None),
    "random_distortion": ("Distort", lambda s: dict(grid_width=s.grid_width,
                                                    grid_height=s.grid_height,
                                                    magnitude=s.magnitude), None),
    "gaussian_distortion": ("GaussianDistortion", lambda s: s.params(), None),
    "flip_left_right": ("Flip", lambda s: dict(top_bottom_left_right="LEFT_RIGHT"), None),
    "flip_top_bottom": ("Flip", lambda s: dict(top_bottom_left_right="TOP_BOTTOM"), None),
    "flip_random": ("Flip", lambda s: dict(top_bottom_left_right="RANDOM"),
                    lambda d: {"axis": ("left_right", "top_bottom")[d[0]]}),
    "random_brightness": ("RandomBrightness", lambda s: dict(min_factor=s.min_factor,
                                                             max_factor=s.max_factor),
                          lambda d: {"factor": d[0]}),
    "random_contrast": ("RandomContrast", lambda s: dict(min_factor=s.min_factor,
                                                         max_factor=s.max_factor),
                        lambda d: {"factor": d[0]}),
    "random_color": ("RandomColor", lambda s: dict(min_factor=s.min_factor,
                                                   max_factor=s.max_factor),
                     lambda d: {"factor": d[0]}),
    "histogram_equalisation": ("HistogramEqualisation", lambda s: {}, None),
    "invert": ("Invert", lambda s: {}, None),
    "greyscale": ("Greyscale", lambda s: {}, None),
    "black_and_white": ("BlackAndWhite", lambda s: dict(threshold=s.threshold), None),
    "random_erasing": ("RandomErasing", lambda s: dict(rectangle_area=s.rectangle_area), None),
    "resize": ("Resize", lambda s: dict(width=s.width, height=s.height,
                                        resample_filter=s.resample_filter), None),
    "scale": ("Scale", lambda s: dict(scale_factor=s.scale_factor), None),
}

#: Operations PIL cannot run on RGBA: applied to the colour bands, alpha kept.
_COLOUR_ONLY = {"histogram_equalisation", "invert", "greyscale", "black_and_white",
                "random_erasing"}


#: Augmentor operations that draw into the image they are given.
_IN_PLACE = {"random_erasing"}


def _shift(spec: Shift, image, rng: np.random.Generator):
    from PIL import Image

    w, h = image.size
    dx = int(rng.integers(-math.floor(spec.max_x * w), math.floor(spec.max_x * w) + 1))
    dy = int(rng.integers(-math.floor(spec.max_y * h), math.floor(spec.max_y * h) + 1))
    fill = spec.fill if len(image.getbands()) == 1 else (spec.fill,) * len(image.getbands())
    moved = image.transform(image.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy),
                            resample=Image.NEAREST, fillcolor=fill)
    return moved, {"dx": dx, "dy": dy}


def _noise(spec: GaussianNoise, image, rng: np.random.Generator):
    from PIL import Image

    sigma = float(rng.uniform(spec.min_sigma, spec.max_sigma))
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    if image.mode == "RGBA":
        noisy[..., 3] = pixels[..., 3]
    out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode=image.mode), {"sigma": round(sigma, 4)}


def _blur(spec: GaussianBlur, image, rng: np.random.Generator):
    from PIL import ImageFilter

    radius = float(rng.uniform(spec.min_radius, spec.max_radius))
    return image.filter(ImageFilter.GaussianBlur(radius)), {"radius": round(radius, 4)}


_OWN: dict[str, Callable[[Any, Any, np.random.Generator], tuple[Any, dict[str, Any]]]] = {
    "shift": _shift,
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
}


class Augmenter:
    """Apply an ordered list of operations to images, deterministically per output.

    Args:
        operations: validated specs (see :func:`parse_operations`) or plain mappings.
        seed: the run's seed; with ``source_id`` and ``sample`` it fully decides each output.

    Build one per task or worker (it builds Augmentor's operation objects once) and call
    :meth:`augment` per output image.
    """

    def __init__(self, operations: Sequence[OpSpec | Mapping[str, Any]], seed: int = 0):
        specs = [op for op in operations if isinstance(op, OpSpec)]
        if len(specs) != len(operations):
            specs = parse_operations([
                op.model_dump() if isinstance(op, OpSpec) else op for op in operations
            ])
        self.specs = specs
        self.seed = int(seed)
        self._runners = [self._runner(spec) for spec in specs]
        self._params = [spec.params() for spec in specs]

    @staticmethod
    def _runner(spec: OpSpec):
        if spec.op in _OWN:
            own = _OWN[spec.op]
            return lambda image, op_seed: own(spec, image, np.random.Generator(
                np.random.PCG64(op_seed)))
        import Augmentor.Operations as module

        class_name, kwargs, describe = _AUGMENTOR[spec.op]
        operation = getattr(module, class_name)(probability=1.0, **kwargs(spec))

        copy = spec.op in _IN_PLACE

        def run(image, op_seed):
            with _augmentor_random(op_seed) as draws:
                out = operation.perform_operation([image.copy() if copy else image])[0]
            values: dict[str, Any] = {"draws": draws} if draws else {}
            if describe is not None and draws:
                values.update(describe(draws))
            return out, values

        if spec.op in _COLOUR_ONLY:
            return lambda image, op_seed: _keep_alpha(run, image, op_seed)
        return run

    def augment(self, image, source_id: str, sample: int) -> tuple[Any, list[dict[str, Any]]]:
        """Augment one PIL image (mode L, RGB or RGBA) as output ``sample`` of ``source_id``.

        Returns the new image (same mode as the input) and the list of the operations applied,
        each ``{"op", "params", "seed", ...drawn values}``.

        Raises:
            ValueError: the image mode is not L, RGB or RGBA.
        """
        mode = image.mode
        if mode not in ("L", "RGB", "RGBA"):
            raise ValueError(
                f"images must be in mode L, RGB or RGBA. Received: mode={mode!r} "
                f"(source_id={source_id!r})"
            )
        applied: list[dict[str, Any]] = []
        for index, (spec, params, run) in enumerate(
            zip(self.specs, self._params, self._runners, strict=True)
        ):
            uniform, op_seed = op_draw(self.seed, source_id, sample, index)
            if uniform >= spec.probability:
                continue
            image, values = run(image, op_seed)
            if image.mode != mode:  # greyscale / black_and_white: keep the channel count
                image = image.convert(mode)
            applied.append({"op": spec.op, "params": params, "seed": op_seed, **values})
        return image, applied


def _keep_alpha(run, image, op_seed):
    if image.mode != "RGBA":
        return run(image, op_seed)
    alpha = image.getchannel("A")
    out, values = run(image.convert("RGB"), op_seed)
    out = out.convert("RGB")
    out.putalpha(alpha if alpha.size == out.size else alpha.resize(out.size))
    return out, values


def operations_json(applied: list[dict[str, Any]]) -> str:
    """The provenance column: the applied operations as compact JSON."""
    return json.dumps(applied, separators=(",", ":"), sort_keys=True)
