"""Experiment tracking in MLflow: one parent run per pipeline run, one nested run per stage.

The runner starts the parent run (:meth:`Tracking.start`), wraps every stage that runs in
:meth:`Tracking.stage` and ends the parent with the run's status (:meth:`Tracking.finish`).

* Parent run ``pipeline <run id>``: the whole configuration as params (and ``config.json``),
  what each stage did (tags ``stage.<name>``: ran, skipped, failed), seconds per stage and in
  all as metrics, ``run.json`` and, when the report stage ran, the HTML report as artifacts.
* Nested run per stage that ran (skipped stages have none: their outputs come from an earlier
  run): the config sections the stage reads as params (``cnn.epochs``...), every number of the
  summary it returned as a metric (``test.top1``, ``timings_s.fit``...), ``summary.json``, the
  files the summary lists under ``artifacts`` (plots, confusion matrices, metrics files), and
  what the stage itself logs through its ``tracker`` argument
  (:class:`pipelines.stages.tracker.Tracker`): per-epoch metrics, and the fitted model with its
  signature, so ``mlflow.spark.load_model`` / ``mlflow.pyfunc.load_model`` give it back.

The store is ``tracking.uri``: by default an SQLite file under the output root, artifacts in
``mlartifacts/`` beside it, so no server is needed (``mlflow ui --backend-store-uri
sqlite:///out/mlflow.db``). With ``tracking.enabled: false`` MLflow is not imported at all (its
import alone takes seconds).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipelines.config import Config, TrackingConfig
from pipelines.io.storage import Storage
from pipelines.stages.tracker import NO_TRACKER, NoTracker

logger = logging.getLogger(__name__)

#: MLflow refuses longer param values.
MAX_PARAM_CHARS = 6000
#: Installed versions of these are pinned in a logged model's requirements (an explicit list:
#: MLflow would otherwise load the model in a subprocess, and start Spark there, to guess it).
_KERAS_REQUIREMENTS = ("mlflow", "keras", "tensorflow-cpu", "numpy")
_SPARK_REQUIREMENTS = ("mlflow", "pyspark", "keras", "tensorflow-cpu", "numpy", "pandas",
                       "pyarrow", "Pillow", "spark-image-pipelines")


def store_uri(config: Config) -> str:
    """The tracking store: ``tracking.uri``, else an SQLite file (absolute; folder created)."""
    cfg = config.tracking
    if cfg.uri and not cfg.uri.startswith("sqlite:///"):
        return cfg.uri
    if cfg.uri:
        path = Path(cfg.uri.removeprefix("sqlite:///").removeprefix("file://"))
    elif (root := _local_path(config.output_root)) is not None:
        path = root / "mlflow.db"
    else:
        digest = hashlib.sha256(config.output_root.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / "spark-image-pipelines" / f"mlflow-{digest}.db"
        logger.warning("MLflow: the output root %s is not local, so runs are tracked in %s on "
                       "this machine only; set tracking.uri to a tracking server",
                       config.output_root, path)
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: the config's, or ``mlartifacts`` beside SQLite."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_of(data: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config values as MLflow params (JSON for lists, truncated when too long)."""
    params = {}
    for key, value in flatten(data).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        params[key] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"
    return params


def numbers_of(data: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of a summary (not booleans, not inside lists) as metrics."""
    return {key: float(value) for key, value in flatten(data).items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def requirements(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def call_stage(fn: Callable[..., Any], spark: SparkSession, config: Config,
               tracker: StageTracker | NoTracker) -> Any:
    """Run a stage function, handing it ``tracker`` when it takes one; log its summary."""
    if "tracker" in inspect.signature(fn).parameters:
        summary = fn(spark, config, tracker=tracker)
    else:
        summary = fn(spark, config)
    if isinstance(tracker, StageTracker) and isinstance(summary, Mapping):
        tracker.log_summary(summary)
    return summary


class StageTracker:
    """A stage's nested MLflow run (see :class:`pipelines.stages.tracker.Tracker`)."""

    enabled = True

    def __init__(self, spark: SparkSession, cfg: TrackingConfig, run_id: str):
        self.spark, self.cfg, self.run_id = spark, cfg, run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        values = numbers_of(metrics)
        if values:
            mlflow.log_metrics(values, step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Its numbers as metrics, itself as ``summary.json``, the files under ``artifacts``."""
        import mlflow

        self.log_metrics({k: v for k, v in summary.items() if k != "artifacts"})
        mlflow.log_dict(json.loads(json.dumps(summary, default=str)), "summary.json")
        for value in (summary.get("artifacts") or {}).values():
            for path in value if isinstance(value, list | tuple) else [value]:
                self.log_artifact(str(path))

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        import mlflow

        local = _local_path(path)
        if local is not None:
            if local.is_dir():
                mlflow.log_artifacts(str(local), folder)
            else:
                mlflow.log_artifact(str(local), folder)
            return
        with tempfile.TemporaryDirectory() as tmp:  # a URI: copy it to the driver first
            target = Path(tmp) / path.rstrip("/").rsplit("/", 1)[-1]
            target.write_bytes(Storage(self.spark).read_bytes(path))
            mlflow.log_artifact(str(target), folder)

    def log_spark_model(self, model: Any, example: Any) -> None:
        if not self.cfg.log_models:
            return
        import mlflow
        import mlflow.spark
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.types import ColSpec, Schema

        signature = ModelSignature(inputs=infer_signature(example).inputs,
                                   outputs=Schema([ColSpec("double", "prediction")]))
        info = mlflow.spark.log_model(model, "model", signature=signature,
                                      pip_requirements=requirements(_SPARK_REQUIREMENTS))
        mlflow.set_tag("model_uri", info.model_uri)
        logger.info("MLflow: Spark model logged as %s", info.model_uri)

    def log_keras_model(self, model: Any) -> None:
        if not self.cfg.log_models:
            return
        import mlflow
        import mlflow.keras
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        def spec(shape: Any) -> Schema:
            return Schema([TensorSpec(np.dtype(np.float32), (-1, *tuple(shape)[1:]))])

        signature = ModelSignature(inputs=spec(model.input_shape), outputs=spec(model.output_shape))
        info = mlflow.keras.log_model(model, name="model", signature=signature,
                                      pip_requirements=requirements(_KERAS_REQUIREMENTS))
        mlflow.set_tag("model_uri", info.model_uri)
        logger.info("MLflow: Keras model logged as %s", info.model_uri)


class Tracking:
    """MLflow for one pipeline run; every method does nothing when tracking is off."""

    def __init__(self, spark: SparkSession, config: Config):
        self.spark, self.cfg, self.config = spark, config.tracking, config
        self.enabled = config.tracking.enabled
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    @classmethod
    def start(cls, spark: SparkSession, config: Config, run: Mapping[str, Any]) -> Tracking:
        """Open the store (created when new) and start the parent run of pipeline ``run``."""
        tracking = cls(spark, config)
        if not tracking.enabled:
            return tracking
        import mlflow
        from mlflow.tracking import MlflowClient

        tracking.uri = uri = store_uri(config)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(tracking.cfg.experiment)
        tracking.experiment_id = (
            experiment.experiment_id if experiment is not None else client.create_experiment(
                tracking.cfg.experiment, artifact_location=artifact_location(tracking.cfg, uri))
        )
        data = config.model_dump(mode="json")
        parent = mlflow.start_run(
            experiment_id=tracking.experiment_id, run_name=f"pipeline {run['run_id']}",
            tags={"pipelines.run_id": run["run_id"], "pipelines.output_root": config.output_root,
                  "pipelines.selected": ",".join(run.get("selected", [])),
                  "pipelines.force": str(run.get("force", False))},
        )
        tracking.parent_id = parent.info.run_id
        mlflow.log_params(params_of(data))
        mlflow.log_dict(data, "config.json")
        logger.info("MLflow: run %s in experiment %r at %s", tracking.parent_id,
                    tracking.cfg.experiment, uri)
        return tracking

    @contextmanager
    def stage(self, name: str, sections: tuple[str, ...] | list[str]
              ) -> Iterator[StageTracker | NoTracker]:
        """A nested run for stage ``name`` (FAILED when the block raises)."""
        if not self.enabled:
            yield NO_TRACKER
            return
        import mlflow

        data = self.config.model_dump(mode="json")
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=name, nested=True,
                              tags={"pipelines.stage": name}) as child:
            mlflow.log_params(params_of({s: data[s] for s in sections if s in data}))
            yield StageTracker(self.spark, self.cfg, child.info.run_id)

    def finish(self, run: Mapping[str, Any]) -> None:
        """End the parent run with the pipeline's status; log the run summary and report."""
        if not self.enabled or self.parent_id is None:
            return
        import mlflow

        try:
            for record in run.get("stages", []):
                mlflow.set_tag(f"stage.{record['stage']}", record.get("action", "?"))
                if record.get("action") == "ran" and record.get("seconds") is not None:
                    mlflow.log_metric(f"seconds.{record['stage']}", record["seconds"])
            if run.get("seconds") is not None:
                mlflow.log_metric("seconds", run["seconds"])
            mlflow.log_dict(json.loads(json.dumps(run, default=str)), "run.json")
            report = self.config.report.output
            ran = {r["stage"] for r in run.get("stages", []) if r.get("action") == "ran"}
            local = _local_path(report)
            if "report" in ran and local is not None and local.is_dir():
                mlflow.log_artifacts(str(local), "report")
        finally:
            status = "FINISHED" if run.get("status") == "succeeded" else "FAILED"
            mlflow.end_run(status=status)
        self.parent_id, parent = None, self.parent_id
        logger.info(
            "MLflow: run %s (%s) in experiment %r at %s; to browse and compare runs: "
            "mlflow ui --backend-store-uri %s", parent, status.lower(), self.cfg.experiment,
            self.uri, self.uri,
        )


def _local_path(path: str) -> Path | None:
    """The local path of ``path`` (plain or ``file://``), or None for other schemes."""
    if path.startswith("file://"):
        return Path(path.removeprefix("file://"))
    if "://" in path:
        return None
    return Path(path)

