"""Progress lines for executor work, from Spark's status tracker.

``spark.ui.showConsoleProgress`` draws a bar with carriage returns (unreadable in a scheduler's
log) and is off here. Instead :class:`SparkProgress`, a daemon thread, polls
``SparkContext.statusTracker()`` for the active Spark stages and, at most every
``pipeline.progress_seconds``, logs one line per stage that is still running: tasks done/total,
tasks/s from when the stage was first seen to its last finished task, and the ETA at that rate
counted from that task (so it counts down while long tasks run). Short stages (finished between
two lines) log nothing. :func:`label` names the pipeline stage the lines belong to.

    with SparkProgress(spark, every_seconds=15):
        ...  # any Spark work
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyspark.sql import SparkSession

from pipelines.ml.progress import progress_text

logger = logging.getLogger(__name__)

_current_label: list[str] = []  # set by the runner's thread, read by the monitor thread


@contextmanager
def label(name: str) -> Iterator[None]:
    """Prefix the progress lines logged while the block runs with ``name``."""
    _current_label.append(name)
    try:
        yield
    finally:
        _current_label.pop()


class SparkProgress:
    """A daemon thread logging progress of active Spark stages (a context manager).

    Args:
        spark: a classic SparkSession (Spark Connect has no status tracker: then nothing is
            logged).
        every_seconds: the least time between two lines about one Spark stage.
        poll_seconds: how often the tracker is read (when stages start and end is known to
            this precision).
    """

    def __init__(self, spark: SparkSession, every_seconds: float = 15.0,
                 poll_seconds: float | None = None):
        if every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0. Received: {every_seconds=}")
        self.every_seconds = every_seconds
        self.poll_seconds = poll_seconds or min(1.0, every_seconds / 2)
        try:
            self._tracker = spark.sparkContext.statusTracker()
        except Exception:  # Spark Connect: no SparkContext on the client
            logger.info("no Spark status tracker on this session: no progress lines")
            self._tracker = None
        self._seen: dict[int, dict[str, float]] = {}  # stage id -> first seen, last line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SparkProgress:
        if self._tracker is not None:
            self._thread = threading.Thread(target=self._run, name="spark-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll(time.monotonic())
            except Exception as exc:  # the JVM going away at shutdown; never fail the job
                logger.debug("spark progress poll failed: %s", exc)

    def poll(self, now: float) -> list[str]:
        """Read the tracker once; log (and return) the lines that are due."""
        lines = []
        active = set()
        for stage_id in self._tracker.getActiveStageIds():
            info = self._tracker.getStageInfo(stage_id)
            if info is None:
                continue
            active.add(stage_id)
            seen = self._seen.setdefault(stage_id, {"first": now, "line": now, "done": 0,
                                                    "done_at": now})
            if info.numCompletedTasks != seen["done"]:
                seen["done"], seen["done_at"] = info.numCompletedTasks, now
            if now - seen["line"] < self.every_seconds:
                continue
            seen["line"] = now
            running = f", {info.numActiveTasks} running" if info.numActiveTasks else ""
            failed = f", {info.numFailedTasks} failed" if info.numFailedTasks else ""
            prefix = f"{_current_label[-1]}: " if _current_label else ""
            done = progress_text(info.numCompletedTasks, info.numTasks,
                                 seen["done_at"] - seen["first"], "tasks",
                                 since_done=now - seen["done_at"])
            # info.name is the call site ("parquet at NativeMethodAccessorImpl.java:0"), which
            # says nothing to a reader of a PySpark job's log.
            lines.append(f"{prefix}Spark stage {stage_id}: {done}{running}{failed}")
        for stage_id in set(self._seen) - active:
            del self._seen[stage_id]
        for line in lines:
            logger.info("%s", line)
        return lines
