"""What a stage may report to experiment tracking, without knowing the tracking system.

A stage that takes a ``tracker`` argument gets one from the runner (MLflow's, see
:mod:`pipelines.run.tracking`) inside the stage's own tracked run; run on its own, or with
tracking off, it gets :data:`NO_TRACKER`, which does nothing. The stage's config section and
its returned summary are logged by the runner; a stage adds what only it holds: metrics as they
come (per epoch), the files it wrote, and its fitted model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Tracker(Protocol):
    """The calls a stage makes; every one is cheap when tracking is off."""

    #: False for :data:`NO_TRACKER`: a stage may skip work done only for tracking.
    enabled: bool

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric values by name (others are ignored); ``step``: the epoch, for curves."""

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        """A file the stage wrote (a local path or a URI Spark can read)."""

    def log_spark_model(self, model: Any, example: Any) -> None:
        """A fitted Spark ``PipelineModel``; ``example``: a DataFrame of its input columns
        (only its schema is read, for the signature)."""

    def log_keras_model(self, model: Any) -> None:
        """A trained Keras model (its signature from the model's input and output shapes)."""


class NoTracker:
    """The tracker of an untracked run: every call does nothing."""

    enabled = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        pass

    def log_spark_model(self, model: Any, example: Any) -> None:
        pass

    def log_keras_model(self, model: Any) -> None:
        pass


NO_TRACKER = NoTracker()
