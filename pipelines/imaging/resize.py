"""Fitting uint8 image arrays to a model's input: channel count and size (numpy and Pillow).

One channel rule for the whole project: arrays here are RGB(A) or gray (``(H, W, C)``, or a
batch ``(..., C)``); stored BGR(A) structs are turned to RGB first
(:func:`pipelines.imaging.image_struct.to_rgb`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Resize methods, by the name users give them (Pillow's resampling filters).
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos", "area")


def fit_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Convert an RGB(A)/gray uint8 array (..., C) to ``channels`` (1 or 3) channels."""
    have = array.shape[-1]
    if have == channels:
        return array
    if have == 4:
        array, have = array[..., :3], 3
        if channels == 3:
            return array
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=-1)
    if have == 3 and channels == 1:
        weights = np.array([299, 587, 114], dtype=np.uint32)
        luma = (array.astype(np.uint32) @ weights + 500) // 1000
        return luma.astype(np.uint8)[..., None]
    raise ValueError(
        f"cannot feed {have}-channel images to a model with {channels} input channels. "
        f"Received: nChannels={have}"
    )


def resize(array: np.ndarray, height: int, width: int, method: str = "bilinear") -> np.ndarray:
    """Resize a uint8 array (H, W, C) with PIL; a no-op when the size already fits."""
    if array.shape[0] == height and array.shape[1] == width:
        return array
    from PIL import Image

    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}. Received: {method!r}")
    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "area": Image.Resampling.BOX,
    }[method]
    squeeze = array.shape[2] == 1
    img = Image.fromarray(array[:, :, 0] if squeeze else array)
    out = np.asarray(img.resize((width, height), resample=resample))
    return out[:, :, None] if squeeze else out


def fit_images(
    arrays: Sequence[np.ndarray | None], height: int, width: int, channels: int,
    method: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Images (None = invalid) -> (uint8 batch (n_valid, H, W, C), boolean validity mask).

    Gray images are resized before they are replicated to 3 channels (a third of the work, the
    same pixels); colour images meant for a gray model are converted first.
    """
    valid = np.array([a is not None for a in arrays], dtype=bool)
    batch = np.empty((int(valid.sum()), height, width, channels), dtype=np.uint8)
    i = 0
    for array in arrays:
        if array is None:
            continue
        if array.shape[-1] > channels:
            batch[i] = resize(fit_channels(array, channels), height, width, method)
        else:  # 1 -> 3 channels broadcasts on assignment
            batch[i] = resize(array, height, width, method)
        i += 1
    return batch, valid
