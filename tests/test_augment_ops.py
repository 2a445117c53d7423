"""The augmentation adapter: every operation, determinism, probabilities, provenance, config."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import TEST_CONF
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.imaging.augment_ops import OPERATION_NAMES, Augmenter, parse_operations

#: Parameters for operations that have required ones; the rest run with defaults.
PARAMS = {
    "zoom": {"min_factor": 1.1, "max_factor": 1.4},
    "zoom_random": {"percentage_area": 0.8},
    "crop_by_size": {"width": 20, "height": 16},
    "crop_centre": {"percentage_area": 0.5},
    "crop_random": {"percentage_area": 0.5},
    "random_brightness": {"min_factor": 0.5, "max_factor": 1.5},
    "random_contrast": {"min_factor": 0.5, "max_factor": 1.5},
    "random_color": {"min_factor": 0.5, "max_factor": 1.5},
    "resize": {"width": 40, "height": 24},
    "scale": {"scale_factor": 1.5},
    "shift": {"max_x": 0.3, "max_y": 0.3},
}
#: (width, height) of a 30x28 (w x h) input after each size-changing operation.
SIZES = {
    "rotate90": (28, 30), "rotate270": (28, 30), "crop_by_size": (20, 16),
    "crop_centre": (14, 14), "crop_random": (15, 14), "resize": (40, 24), "scale": (45, 42),
}


def image(mode: str, seed: int = 0, size=(30, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def op(name: str, probability: float = 1.0) -> dict:
    return {"op": name, "probability": probability, **PARAMS.get(name, {})}


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("name", OPERATION_NAMES)
def test_each_operation_keeps_mode_and_changes_shape_as_documented(name, mode):
    src = image(mode)
    augmenter = Augmenter([op(name)], seed=3)
    out, applied = augmenter.augment(src, "img-1", 0)
    again, _ = augmenter.augment(src, "img-1", 0)
    assert out.mode == mode
    expected = SIZES.get(name, (30, 28))
    if name == "rotate_random_90" and applied[0]["angle"] != 180:
        expected = (28, 30)
    assert out.size == expected
    assert [a["op"] for a in applied] == [name]
    assert out.tobytes() == again.tobytes()
    assert src.tobytes() == image(mode).tobytes(), "the input image was modified in place"
    no_op_on_grey = mode == "L" and name in ("random_color", "greyscale")
    if not no_op_on_grey and name != "black_and_white":
        assert out.size != src.size or out.tobytes() != src.tobytes(), f"{name} changed nothing"


def test_outputs_depend_on_seed_source_and_sample_only():
    src = image("L")
    a = Augmenter([op("rotate"), op("random_distortion"), op("gaussian_noise")], seed=7)
    random.seed(123)
    np.random.seed(123)
    first = a.augment(src, "x", 4)[0].tobytes()
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(999)  # the process-wide generators neither influence nor get touched
    np.random.seed(999)
    for _ in range(5):
        a.augment(src, "other", 1)
    assert a.augment(src, "x", 4)[0].tobytes() == first
    assert Augmenter(a.specs, seed=7).augment(src, "x", 4)[0].tobytes() == first
    assert Augmenter(a.specs, seed=8).augment(src, "x", 4)[0].tobytes() != first
    assert a.augment(src, "x", 5)[0].tobytes() != first
    assert a.augment(src, "y", 4)[0].tobytes() != first
    random.setstate(state)
    np.random.set_state(np_state)
    random.seed(5)
    expected = random.random()
    random.seed(5)
    a.augment(src, "x", 4)
    assert random.random() == expected


@pytest.mark.parametrize("probability", [0.5, 0.55, 0.05])
def test_probability_is_honoured_exactly_not_rounded(probability):
    n = 4000
    augmenter = Augmenter([op("invert", probability)], seed=1)
    src = image("L", size=(4, 4))
    fired = sum(bool(augmenter.augment(src, f"id-{i}", 0)[1]) for i in range(n))
    sd = (probability * (1 - probability) / n) ** 0.5
    assert abs(fired / n - probability) < 4 * sd, (fired, n)


def test_probability_zero_never_and_one_always():
    src = image("L", size=(4, 4))
    never = Augmenter([op("invert", 0.0)])
    always = Augmenter([op("invert", 1.0)])
    assert not any(never.augment(src, str(i), 0)[1] for i in range(200))
    assert all(always.augment(src, str(i), 0)[1] for i in range(200))


def test_provenance_names_parameters_seed_and_rotation_angle():
    augmenter = Augmenter([op("rotate"), {"op": "shift", "max_x": 0.1, "max_y": 0.1}], seed=0)
    angles = set()
    for i in range(300):
        _, applied = augmenter.augment(image("L", size=(8, 8)), str(i), 0)
        rotate, shift = applied
        assert rotate["params"] == {"max_left": 25, "max_right": 25}
        assert -25 <= rotate["angle"] <= 25
        assert isinstance(rotate["seed"], int)
        assert abs(shift["dx"]) <= 0 and abs(shift["dy"]) <= 0  # 10 % of 8 px rounds to 0
        angles.add(rotate["angle"])
    assert min(angles) < -15 and max(angles) > 15


def test_shift_moves_pixels_by_the_recorded_offset():
    pixels = np.zeros((40, 40), np.uint8)
    pixels[20, 20] = 255
    augmenter = Augmenter([{"op": "shift", "max_x": 0.25, "max_y": 0.25}], seed=2)
    moved = 0
    for i in range(20):
        out, (rec,) = augmenter.augment(Image.fromarray(pixels), str(i), 0)
        ys, xs = np.nonzero(np.asarray(out))
        assert (ys.tolist(), xs.tolist()) == ([20 + rec["dy"]], [20 + rec["dx"]])
        moved += (rec["dx"], rec["dy"]) != (0, 0)
    assert moved > 15


def test_gaussian_noise_has_the_recorded_sigma():
    src = Image.fromarray(np.full((200, 200), 128, np.uint8))
    out, (rec,) = Augmenter([{"op": "gaussian_noise", "min_sigma": 8, "max_sigma": 12}]).augment(
        src, "n", 0)
    diff = np.asarray(out, np.float64) - 128
    assert 8 <= rec["sigma"] <= 12
    assert abs(diff.std() - rec["sigma"]) < 0.5


def test_greyscale_keeps_rgb_as_three_equal_channels():
    out, _ = Augmenter([op("greyscale")]).augment(image("RGB"), "g", 0)
    arr = np.asarray(out)
    assert arr.shape == (28, 30, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_unsupported_image_mode_is_rejected_with_the_mode():
    with pytest.raises(ValueError, match=r"Received: mode='P'"):
        Augmenter([op("rotate")]).augment(image("L").convert("P"), "p", 0)


@pytest.mark.parametrize(
    "item, message",
    [
        ({"op": "rotat"}, r"unknown op 'rotat'.*Received"),
        ({"op": "rotate", "max_lft": 3}, r"rotate.*unknown parameter 'max_lft'.*Received"),
        ({"op": "rotate", "probability": 1.5}, r"probability.*Received: probability=1.5"),
        ({"op": "zoom", "min_factor": 2, "max_factor": 1}, r"min_factor must be <= max_factor"),
        ({"op": "resize", "width": 4, "height": 4, "resample_filter": "ANTIALIAS"},
         r"resample_filter.*Received"),
        ("rotate", r"must be a mapping. Received: 'rotate'"),
    ],
)
def test_bad_operation_is_a_clear_error(item, message):
    with pytest.raises(ValueError, match=message):
        parse_operations([item])


@pytest.mark.parametrize(
    "override, named",
    [
        ("augment.operations=[{op: rotat}]", "Input tag 'rotat'"),
        ("augment.operations=[{op: rotate, max_lft: 3}]", "operations.0.rotate.max_lft"),
        ("augment.operations=[{op: shift, probability: -0.1}]",
         "operations.0.shift.probability"),
        ("augment.max_bad_fraction=2", "augment.max_bad_fraction"),
    ],
)
def test_bad_augment_config_fails_on_load(override, named):
    with pytest.raises(ConfigError, match="Received") as info:
        load_config(TEST_CONF, [override])
    assert named in str(info.value)


def test_config_operations_round_trip_through_dump():
    config = load_config(TEST_CONF, ["augment.operations=[{op: shift, max_x: 0.2}, {op: invert}]"])
    dumped = [o.model_dump() for o in config.augment.operations]
    assert [o.model_dump() for o in parse_operations(dumped)] == dumped
    assert dumped[0] == {"op": "shift", "probability": 1.0, "max_x": 0.2, "max_y": 0.1, "fill": 0}
