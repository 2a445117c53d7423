"""Image Parquet -> ``tf.data`` for training on the driver, in memory or streamed through Arrow.

The driver reads the Parquet files itself with ``pyarrow.dataset`` (any filesystem pyarrow knows:
local, ``hdfs://``, ``s3://``, ``gs://``), one split at a time, in record batches of
``read_batch_rows`` rows. Each batch's pixel buffer is reinterpreted as a ``uint8`` array
(N, H, W, C) without a Python object per row; a batch holding images of another size than the
model input is fitted image by image (:func:`pipelines.imaging.resize.fit_images`). Two ways
to feed epochs:

* in memory (``in_memory=True``, chosen by the job when the splits fit ``cnn.in_memory_mb``):
  the split is read once into one ``uint8`` array, held as a tensor; every epoch is a seeded
  permutation of it, gathered, shifted and distorted by TensorFlow ops (:func:`memory_dataset`);
* streamed: every epoch re-reads the Parquet; :func:`model_batches` shuffles the rows in a numpy
  buffer of ``shuffle_buffer`` rows and cuts model batches, which cross into ``tf.data`` whole,
  optionally moved by :func:`random_shift` (and distorted by :func:`elastic_distort` in
  ``tf.data``). Memory is bounded by those settings, never by the size of the data set.

Either way batches are converted to float in ``tf.data`` and prefetched there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.imaging.image_struct import to_rgb
from pipelines.imaging.resize import RESIZE_METHODS, fit_channels, fit_images
from pipelines.ml.architectures import ElasticDistortion

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)

_COLUMNS = {
    "label": pc.field("label"),
    "data": pc.field("image", "data"),
    "height": pc.field("image", "height"),
    "width": pc.field("image", "width"),
    "channels": pc.field("image", "nChannels"),
}


def open_parquet(path: str) -> ds.Dataset:
    """A hive-partitioned Parquet dataset at a local path or URI; clear errors when it is not one.

    Raises:
        FileNotFoundError: nothing readable at ``path``.
        ValueError: a file under ``path`` is not Parquet, or the data has no ``split``,
            ``label`` or ``image`` field.
    """
    try:
        if "://" in path:
            fs, root = pafs.FileSystem.from_uri(path)
        else:
            fs, root = pafs.LocalFileSystem(), path
        dataset = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise FileNotFoundError(f"cannot read image Parquet at {path!r}: {exc}") from None
    _check_other_files(dataset, fs, root, path)
    names = dataset.schema.names
    missing = [n for n in ("split", "label", "image") if n not in names]
    if missing:
        raise ValueError(
            f"{path!r} is not image Parquet with a split: missing {missing}. "
            f"Received columns: {names}"
        )
    return dataset


def _check_other_files(dataset: ds.Dataset, fs: pafs.FileSystem, root: str, path: str) -> None:
    """Fail now, naming the file, when a file without the ``.parquet`` suffix is not Parquet:
    Arrow would only fail at the first read, with its own message. The usual cause is a job's
    output folder given for its Parquet (augment writes ``report.json`` and ``sheet.png``
    beside ``parquet/``)."""
    for file in (f for f in dataset.files if not f.endswith(".parquet")):
        try:
            with fs.open_input_file(file) as handle:
                pq.read_metadata(handle)
        except (OSError, pa.ArrowInvalid):
            hint = ""
            inner = f"{root.rstrip('/')}/parquet"
            if fs.get_file_info(inner).type == pafs.FileType.Directory:
                hint = f"; its image Parquet is in {path.rstrip('/') + '/parquet'!r}"
            raise ValueError(
                f"{path!r} is not a folder of image Parquet only: {file!r} is not a Parquet "
                f"file{hint}") from None


@dataclass(frozen=True)
class ImageSplit:
    """One split of one or more image Parquet inputs, with the image shape a model expects."""

    datasets: tuple[ds.Dataset, ...]
    split: str
    height: int
    width: int
    channels: int
    #: Resampling for images whose size differs from (height, width) (see :meth:`decode`).
    resize_method: str = "bilinear"

    @property
    def _filter(self) -> pc.Expression:
        return pc.field("split") == self.split

    def count(self) -> int:
        """Rows of this split in every input (from Parquet metadata, no data read)."""
        return self._rows

    @functools.cached_property
    def _rows(self) -> int:
        # Counted once: the job asks for it several times (counts, memory budget, dataset
        # cardinality, in-memory load), each a read of every file's footer (remote on a cluster).
        return sum(d.count_rows(filter=self._filter) for d in self.datasets)

    def label_counts(self) -> dict[int, int]:
        """Rows per label (reads the label column only)."""
        counts: dict[int, int] = {}
        for dataset in self.datasets:
            table = dataset.to_table(columns=["label"], filter=self._filter)
            for item in pc.value_counts(table.column("label")).to_pylist():
                if item["values"] is not None:
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        return dict(sorted(counts.items()))

    def check(self) -> None:
        """Decode a first small batch, so bad sizes or channels fail before training starts."""
        next(self.batches(16), None)

    def batches(
        self, rows: int, seed: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (uint8 images (n, H, W, C) in RGB/gray, int32 labels (n,)) per record batch.

        With ``seed`` the order of the files is shuffled (rows within a file keep their order;
        the caller's shuffle buffer mixes them).
        """
        fragments = [
            (d, f) for d in self.datasets for f in d.get_fragments(filter=self._filter)
        ]
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(fragments))
            fragments = [fragments[i] for i in order]
        for dataset, fragment in fragments:
            # One record batch read ahead, not Arrow's 16: reading is far faster than training
            # consumes rows, and each batch ahead holds ``rows`` images in memory.
            scanner = ds.Scanner.from_fragment(
                fragment, schema=dataset.schema, columns=_COLUMNS, filter=self._filter,
                batch_size=rows, batch_readahead=1, fragment_readahead=1,
            )
            for batch in scanner.to_batches():
                if batch.num_rows:
                    yield self.decode(batch, fragment.path)

    def load(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole split as (uint8 images (n, H, W, C), int32 labels (n,)), in stored order.

        Reads record batches of ``rows`` rows and copies each into one preallocated array: the
        memory is the split's pixels once, plus one record batch.
        """
        n = self.count()
        images = np.empty((n, self.height, self.width, self.channels), np.uint8)
        labels = np.empty(n, np.int32)
        end = 0
        for x, y in self.batches(rows):
            if end + len(x) > n:
                raise ValueError(f"split {self.split!r} grew while it was read. Received more "
                                 f"than the {n} rows counted")
            images[end:end + len(x)], labels[end:end + len(y)] = x, y
            end += len(x)
        return images[:end], labels[:end]

    def nbytes(self) -> int:
        """Bytes the split takes in memory as uint8 model input."""
        return self.count() * self.height * self.width * self.channels

    def decode(self, batch: pa.RecordBatch, where: str) -> tuple[np.ndarray, np.ndarray]:
        """A record batch of (label, data, height, width, channels) -> numpy arrays."""
        return decode_batch(batch, (self.height, self.width, self.channels),
                            f"{where!r} (split {self.split!r})", self.resize_method)


def decode_batch(
    batch: pa.RecordBatch, shape: tuple[int, int, int], where: str,
    resize_method: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray]:
    """Arrow columns ``label, data, height, width, channels`` -> (uint8 (n, H, W, C), int32 (n,)).

    A batch whose images all have ``shape``'s height and width is viewed in place (zero-copy,
    channels converted as a whole); any other batch is fitted image by image
    (:func:`~pipelines.imaging.resize.fit_images`: channels, then ``resize_method``). Images are
    turned into RGB / gray first. Shared by the driver's Parquet reader and the executor tasks
    that train on a DataFrame's partitions (:mod:`pipelines.ml.distributed`).

    Raises:
        ValueError: null images or labels, or pixel data that does not match the image sizes;
            the message names ``where``.
    """
    height, width, channels = shape
    n = batch.num_rows
    data = batch.column("data")
    labels = batch.column("label")
    if data.null_count or labels.null_count:
        raise ValueError(f"null images or labels in {where}")
    dims = [batch.column(k).to_numpy(zero_copy_only=False).astype(np.int64)
            for k in ("height", "width", "channels")]
    offset_type = np.int64 if pa.types.is_large_binary(data.type) else np.int32
    offsets = np.frombuffer(data.buffers()[1], offset_type)[data.offset:data.offset + n + 1]
    if not (np.diff(offsets) == dims[0] * dims[1] * dims[2]).all():
        raise ValueError(f"image data sizes do not match height*width*nChannels in {where}")
    pixels = np.frombuffer(data.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    uniform = all((d == d[0]).all() for d in dims)
    h, w, c = (int(d[0]) for d in dims)
    try:
        if uniform and (h, w) == (height, width):
            images = fit_channels(to_rgb(pixels.reshape(n, h, w, c)), channels)
        else:
            start = offsets[0]
            arrays = [to_rgb(pixels[a - start:b - start].reshape(int(y), int(x), int(k)))
                      for a, b, y, x, k in zip(offsets[:-1], offsets[1:], *dims, strict=True)]
            images, _ = fit_images(arrays, height, width, channels, resize_method)
    except ValueError as exc:
        raise ValueError(f"{exc} in {where}") from None
    return images, labels.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def open_split(paths: list[str], split: str, input_shape: tuple[int, int, int],
               resize_method: str = "bilinear") -> ImageSplit:
    """The ``split`` rows of every input in ``paths`` for a model of ``input_shape`` (H, W, C);
    images of another size are resized with ``resize_method``."""
    if resize_method not in RESIZE_METHODS:
        raise ValueError(
            f"resize method must be one of {RESIZE_METHODS}. Received: {resize_method!r}")
    height, width, channels = input_shape
    return ImageSplit(tuple(open_parquet(p) for p in paths), split, height, width, channels,
                      resize_method)


def class_names(paths: list[str]) -> dict[int, str]:
    """Label -> class name, from the ``label_name`` column of inputs that have one (folder
    ingest writes it); reads those two columns only. Empty when no input has names."""
    names: dict[int, str] = {}
    for path in paths:
        dataset = open_parquet(path)
        if "label_name" not in dataset.schema.names:
            continue
        table = dataset.to_table(columns=["label", "label_name"])
        pairs = table.group_by(["label", "label_name"]).aggregate([]).to_pylist()
        for pair in pairs:
            if pair["label"] is not None and pair["label_name"] is not None:
                names.setdefault(int(pair["label"]), pair["label_name"])
    return dict(sorted(names.items()))


def model_batches(
    record_batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
    shuffle_buffer: int | None = None, seed: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-cut record batches into model batches of ``batch_size`` (the last may be smaller).

    With ``shuffle_buffer``, rows are gathered until the buffer holds at least that many, then
    permuted with a generator seeded by ``seed`` and cut; the rows that do not fill a batch stay
    for the next round. Memory: the buffer plus one record batch.
    """
    rng = np.random.default_rng(seed) if shuffle_buffer is not None else None
    limit = max(shuffle_buffer or batch_size, batch_size)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0

    def cut(final: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal images, labels, held
        x, y = np.concatenate(images), np.concatenate(labels)
        if rng is not None:
            order = rng.permutation(len(x))
            x, y = x[order], y[order]
        end = len(x) if final else len(x) // batch_size * batch_size
        for start in range(0, end, batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        images, labels, held = [x[end:]], [y[end:]], len(x) - end

    for x, y in record_batches:
        images.append(x)
        labels.append(y)
        held += len(x)
        if held >= limit:
            yield from cut(final=False)
    if held:
        yield from cut(final=True)


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image of a (n, H, W, C) batch moved by up to ``max_shift`` whole pixels per axis.

    Offsets are drawn per image and axis from ``[-max_shift, max_shift]``; uncovered pixels are 0.
    One padded copy and one gather, vectorised over the batch: cheap next to training.
    """
    if max_shift <= 0:
        return images
    n, h, w, _ = images.shape
    k = max_shift
    padded = np.pad(images, ((0, 0), (k, k), (k, k), (0, 0)))
    dy = rng.integers(0, 2 * k + 1, n)
    dx = rng.integers(0, 2 * k + 1, n)
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]


def elastic_distort(batch: tf.Tensor, key: tf.Tensor, elastic: ElasticDistortion) -> tf.Tensor:
    """Each image of a uint8 (n, H, W, C) batch warped by its own smooth random field.

    The field is stateless random noise from ``key`` (a (2,) int64 seed), smoothed and scaled
    as :class:`~pipelines.ml.architectures.ElasticDistortion` describes; the resampling is
    bilinear with zeros outside the image, the result rounded back to uint8. With a
    ``probability`` under 1, each image is warped with that probability (from the same key) and
    otherwise returned as it is. TensorFlow ops only: ~13 ms for 128 MNIST images on one core,
    next to ~50 ms for the default CNN's step.
    """
    import tensorflow as tf

    shape = tf.shape(batch)
    n, h, w = shape[0], shape[1], shape[2]
    radius = max(1, int(np.ceil(3 * elastic.sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / elastic.sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    noise = tf.random.stateless_uniform(tf.stack([n, h, w, 2]), seed=key, minval=-1.0,
                                        maxval=1.0)
    along_h = tf.constant(np.tile(taps[:, None, None, None], (1, 1, 2, 1)))
    along_w = tf.constant(np.tile(taps[None, :, None, None], (1, 1, 2, 1)))
    field = tf.nn.depthwise_conv2d(noise, along_h, [1, 1, 1, 1], "SAME")
    field = tf.nn.depthwise_conv2d(field, along_w, [1, 1, 1, 1], "SAME") * elastic.alpha
    # Coordinates in a frame padded by one zero pixel; anything further out reads the padding.
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ys = tf.clip_by_value(tf.range(hf)[None, :, None] + 1.0 + field[..., 0], 0.0, hf + 1.0)
    xs = tf.clip_by_value(tf.range(wf)[None, None, :] + 1.0 + field[..., 1], 0.0, wf + 1.0)
    y0, x0 = tf.minimum(tf.floor(ys), hf), tf.minimum(tf.floor(xs), wf)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    padded = tf.pad(tf.cast(batch, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]])

    def at(y, x):
        return tf.gather_nd(padded, tf.stack([y, x], axis=-1), batch_dims=1)

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    warped = top * (1 - wy) + bottom * wy
    warped = tf.cast(tf.clip_by_value(tf.round(warped), 0.0, 255.0), tf.uint8)
    if elastic.probability >= 1:
        return warped
    chosen = tf.random.stateless_uniform([n], seed=key + 1) < elastic.probability
    return tf.where(chosen[:, None, None, None], warped, batch)


def _batch_keys(seed: int | None) -> tf.data.Dataset:
    """(2,) int64 stateless-random keys, one per batch, fresh each epoch, from ``seed``."""
    import tensorflow as tf

    return tf.data.Dataset.random(seed=0 if seed is None else seed,
                                  rerandomize_each_iteration=True).batch(2)


def make_dataset(
    source: ImageSplit, batch_size: int, num_classes: int, read_rows: int,
    shuffle_buffer: int | None = None, seed: int = 0, shift_pixels: int = 0,
    in_memory: bool = False, elastic: ElasticDistortion | None = None,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of (float32 images in [0, 1], one-hot float32 labels) batches.

    ``shuffle_buffer`` (training) shuffles the rows each epoch, reproducibly from ``seed``:
    streamed, file order and a buffer of that many rows; ``in_memory``, the whole split (read
    once, here). Without it the order is the stored one. ``shift_pixels`` moves every image by
    a random offset (see :func:`random_shift`), a fresh one each epoch; ``elastic`` then warps
    it (:func:`elastic_distort`), fresh each epoch too. The cardinality is set
    from the Parquet row count, so Keras shows progress and learning-rate schedules know the
    steps.
    """
    import tensorflow as tf

    rows = source.count()
    if rows == 0:
        raise ValueError(f"no rows in split {source.split!r} of the inputs")
    h, w, c = source.height, source.width, source.channels
    shuffle = shuffle_buffer is not None

    @tf.autograph.experimental.do_not_convert
    def to_model_input(images, labels):
        return tf.cast(images, tf.float32) / 255.0, tf.one_hot(labels, num_classes)

    if in_memory:
        images, labels = source.load(read_rows)
        return array_dataset(images, labels, batch_size, num_classes,
                             seed if shuffle else None, shift_pixels, elastic)

    epochs = iter(range(1 << 62))

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch = next(epochs)
        epoch_seed = seed * 1_000_003 + epoch if shuffle else None
        batches = model_batches(source.batches(read_rows, epoch_seed), batch_size,
                                shuffle_buffer, epoch_seed)
        rng = np.random.default_rng([seed, epoch, 1])
        for images, labels in batches:
            yield random_shift(images, shift_pixels, rng), labels

    # Whole batches cross into TensorFlow: no per-image tf.data ops (unbatch/shuffle/batch
    # per element cost more than the training step of a small CNN on 2 cores).
    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec((None, h, w, c), tf.uint8),
            tf.TensorSpec((None,), tf.int32),
        ),
    )

    if elastic is not None:
        dataset = tf.data.Dataset.zip(dataset, _batch_keys(seed)).map(
            lambda batch, key: (elastic_distort(batch[0], key, elastic), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
    n_batches = -(-rows // batch_size)
    return (
        dataset.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
        .apply(tf.data.experimental.assert_cardinality(n_batches))
        .prefetch(2)
    )


def array_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int, num_classes: int,
    seed: int | None = None, shift_pixels: int = 0, elastic: ElasticDistortion | None = None,
) -> tf.data.Dataset:
    """:func:`memory_dataset` batches as model input: float32 images in [0, 1], one-hot labels."""
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert
    def to_model_input(batch, batch_labels):
        return tf.cast(batch, tf.float32) / 255.0, tf.one_hot(batch_labels, num_classes)

    dataset = memory_dataset(images, labels, batch_size, seed, shift_pixels, elastic)
    return dataset.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def memory_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None,
    shift_pixels: int = 0, elastic: ElasticDistortion | None = None,
) -> tf.data.Dataset:
    """(uint8 images, int labels) batches of in-memory arrays, built from TensorFlow ops only.

    With ``seed``, every epoch (every new iterator) is a fresh permutation of all rows,
    reproducible from the seed; without it, the stored order. ``shift_pixels`` moves each image
    by whole pixels as :func:`random_shift` does, fresh offsets every epoch; ``elastic`` then
    warps it (:func:`elastic_distort`), a fresh field every epoch.

    No Python runs per batch (no ``Dataset.from_generator``): on the in-memory path, the one
    MNIST takes, the training step has the cores to itself. Epochs fed by the streamed
    generator were mostly the slower ones in benchmarks/cnn.py (docs/cnn.md).
    """
    import tensorflow as tf

    images_t = tf.constant(images)
    labels_t = tf.constant(np.asarray(labels, dtype=np.int32))
    index = tf.data.Dataset.range(len(images))
    if seed is not None:
        index = index.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    batches = index.batch(batch_size)
    if shift_pixels <= 0 and elastic is None:
        return batches.map(lambda idx: (tf.gather(images_t, idx), tf.gather(labels_t, idx)))
    k = int(shift_pixels)
    h, w = images.shape[1], images.shape[2]

    def augmented(idx, key):
        batch = tf.gather(images_t, idx)
        if k > 0:
            padded = tf.pad(batch, [[0, 0], [k, k], [k, k], [0, 0]])
            offsets = tf.random.stateless_uniform(
                [tf.shape(idx)[0], 2], seed=key, minval=0, maxval=2 * k + 1, dtype=tf.int32)
            rows = offsets[:, :1] + tf.range(h)[None, :]
            cols = offsets[:, 1:] + tf.range(w)[None, :]
            batch = tf.gather(padded, rows, axis=1, batch_dims=1)
            batch = tf.gather(batch, cols, axis=2, batch_dims=1)
        if elastic is not None:
            batch = elastic_distort(batch, key[::-1], elastic)  # not the shift's stream
        return batch, tf.gather(labels_t, idx)

    return tf.data.Dataset.zip(batches, _batch_keys(seed)).map(augmented)
