"""Keras callbacks of the training loop.

:class:`EpochProgress` logs training progress for a person reading the log: one line at the end
of every epoch (metrics, images/s, ETA of the run) and, at most every ``every_seconds``, a line
inside an epoch (batches done/total, images/s, ETA of the epoch). Lines go through
:mod:`logging`, never straight to a terminal, so a log that is not a terminal gets no carriage
returns or escapes (Keras' own progress bar writes both whenever it guesses a terminal).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import keras

from pipelines.ml.progress import duration

logger = logging.getLogger(__name__)


class EpochProgress(keras.callbacks.Callback):
    """Log lines of a Keras ``fit``: every epoch's end, and inside epochs at most every N s.

    Args:
        name: the line's prefix (``cnn``).
        epochs: the run's epochs (``fit(epochs=...)``).
        rows: training rows per epoch.
        batch_size: rows per batch.
        every_seconds: the least time between two lines inside an epoch.
        within_epoch: log inside epochs (off when Keras' own progress bar is shown).
    """

    def __init__(self, name: str, epochs: int, rows: int, batch_size: int,
                 every_seconds: float = 15.0, within_epoch: bool = True):
        super().__init__()
        if epochs < 1 or rows < 1 or batch_size < 1 or every_seconds <= 0:
            raise ValueError(
                "epochs, rows and batch_size must be >= 1 and every_seconds > 0. Received: "
                f"{epochs=}, {rows=}, {batch_size=}, {every_seconds=}"
            )
        self.name, self.epochs, self.rows, self.batch_size = name, epochs, rows, batch_size
        self.every_seconds, self.within_epoch = every_seconds, within_epoch
        self.steps = math.ceil(rows / batch_size)
        self._epoch_seconds: list[float] = []
        self._epoch = 0
        self._epoch_started = self._last_line = self._first_batch_done = 0.0

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch  # Keras does not pass the epoch to the batch hooks
        self._epoch_started = self._last_line = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        now = time.monotonic()
        if batch == 0:
            # The first batch carries the start-up (graph tracing, a pause between epochs): rates
            # count from its end, so one slow batch does not make an ETA of hours.
            self._first_batch_done = self._last_line = now
            return
        if not self.within_epoch or now - self._last_line < self.every_seconds:
            return
        self._last_line = now
        rate = batch / max(now - self._first_batch_done, 1e-9)  # batches per second
        loss = (logs or {}).get("loss")
        logger.info("%s epoch %d/%d: %d/%d batches (%.0f %%), %s images/s, ETA %s%s", self.name,
                    self._epoch + 1, self.epochs, batch + 1, self.steps,
                    100 * (batch + 1) / self.steps, f"{rate * self.batch_size:,.0f}",
                    duration((self.steps - batch - 1) / rate),
                    "" if loss is None else f", loss={float(loss):.4f}")

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        seconds = time.monotonic() - self._epoch_started
        self._epoch_seconds.append(seconds)
        left = self.epochs - (epoch + 1)
        eta = left * sum(self._epoch_seconds) / len(self._epoch_seconds)
        shown = ", ".join(f"{k}={float(v):.4f}" for k, v in sorted((logs or {}).items()))
        logger.info("%s epoch %d/%d done in %s (%s images/s), ETA %s: %s", self.name,
                    epoch + 1, self.epochs, duration(seconds), f"{self.rows / seconds:,.0f}",
                    duration(eta), shown)
