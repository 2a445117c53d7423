"""Saved Keras model files: which format a file is, loading it safely, and what it takes.

Keras 3 loads a model from its file extension: ``.keras`` (a zip archive) or ``.h5`` (legacy
HDF5, what sparkdl users have). A file named otherwise (sparkdl's README saved to
``/tmp/simple-binary-classification``) is recognised by its first bytes and loaded through a
link with the right extension. Loading uses ``safe_mode=True``: no code stored in a file runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

#: First bytes of each format -> the extension Keras needs.
_MAGIC = {b"PK\x03\x04": ".keras", b"\x89HDF\r\n\x1a\n": ".h5"}
EXTENSIONS = (".keras", ".h5", ".hdf5")


def model_format(head: bytes) -> str | None:
    """``.keras``, ``.h5`` or None, from a file's first 8 bytes."""
    for magic, extension in _MAGIC.items():
        if head.startswith(magic):
            return extension
    return None


def load_model_file(path: str, shown: str | None = None, param: str = "modelFile") -> Any:
    """``keras.saving.load_model`` of a local ``.keras``/``.h5`` file (any name), uncompiled.

    Raises:
        ValueError: the file is missing, not a Keras model, or fails to load; names ``shown``.
    """
    import keras

    shown = shown or path
    if not os.path.isfile(path):
        raise ValueError(f"no Keras model file at {param}. Received: {param}={shown!r}")
    with open(path, "rb") as fh:
        extension = model_format(fh.read(8))
    if extension is None:
        raise ValueError(
            f"{param} must be a Keras model saved as .keras (zip) or .h5 (HDF5). "
            f"Received: {param}={shown!r}"
        )
    target = path
    if not path.endswith((extension, ".hdf5") if extension == ".h5" else extension):
        link_dir = os.path.join(tempfile.gettempdir(), "pipelines-keras-links")
        os.makedirs(link_dir, exist_ok=True)
        name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
        target = os.path.join(link_dir, f"{name}{extension}")
        try:
            os.symlink(os.path.abspath(path), target)
        except FileExistsError:  # made by this or another worker before
            pass
    try:
        return keras.saving.load_model(target, safe_mode=True, compile=False)
    except Exception as exc:  # zip, JSON, HDF5 or deserialization errors
        raise ValueError(
            f"cannot load a Keras model from {param}: {type(exc).__name__}: {exc}. "
            f"Received: {param}={shown!r}"
        ) from None


def shape_of(shape: Any) -> tuple:
    """A Keras ``input_shape``/``output_shape`` as a tuple (one input/output unwrapped)."""
    if isinstance(shape, list):
        return tuple(shape) if len(shape) != 1 else tuple(shape[0])
    return tuple(shape)


def image_input_shape(model: Any, shown: str, param: str = "modelFile") -> tuple[int, int, int]:
    """(height, width, channels) of a model taking (None, H, W, 1|3) images.

    Raises:
        ValueError: the input is not such an image batch; names the shape received.
    """
    shape = shape_of(model.input_shape)
    if (len(shape) != 4 or shape[3] not in (1, 3)
            or any(d is None or d <= 0 for d in shape[1:3])):
        raise ValueError(
            "the model's input must be images (None, height, width, 1 or 3 channels). "
            f"Received: input_shape={shape} ({param}={shown!r})"
        )
    return int(shape[1]), int(shape[2]), int(shape[3])
