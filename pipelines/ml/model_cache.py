"""Keras models kept in a Python worker, by what defines them.

``predict_batch_udf`` caches a predict function per UDF object, so a new UDF (any Param changed,
even ``batchSize``) made every Python worker build its model again. Stages instead get their
model here with a :func:`model_key` naming only what defines the network: the application name
(or the model file's digest), input size, weights, head and pooling. The same key returns the
model already built in this worker, whatever else changed (``batchSize``, ``handleInvalid``,
output columns, ``topK``).

The cache lives in the worker process (Spark reuses Python workers, ``spark.python.worker.reuse``
is true by default) and keeps the :data:`CAPACITY` most recently used models; the least recently
used one is dropped beyond that, as pyspark's own ``ModelCache`` does.

Diagnostics: when the environment variable :data:`BUILD_LOG_ENV` names a file on the workers
(``spark.executorEnv.PIPELINES_MODEL_BUILD_LOG=/tmp/builds.jsonl``), each build appends one JSON
line ``{"key": ..., "pid": ..., "seconds": ...}`` to it: how many times workers really built a
model, which the logs of a cluster do not show.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

#: Models kept per Python worker (like ``pyspark.ml.model_cache.ModelCache``).
CAPACITY = 3
#: Environment variable naming a file that gets one JSON line per model build.
BUILD_LOG_ENV = "PIPELINES_MODEL_BUILD_LOG"

T = TypeVar("T")

_MODELS: OrderedDict[Hashable, Any] = OrderedDict()
_LOCK = threading.Lock()


def model_key(kind: str, **fields: Hashable) -> tuple:
    """A cache key: ``kind`` (``"application"``, ``"file"``, ...) and the defining fields.

    Fields are sorted by name, so callers can add one (``precision``) without breaking others.
    """
    return (kind, *sorted(fields.items()))


def get_or_build(key: Hashable, build: Callable[[], T]) -> T:
    """The object cached under ``key`` in this process, built by ``build()`` on first use.

    ``build`` runs under the cache's lock: two threads of one worker never build the same
    model twice at once (Spark runs one task per worker process, so there is no wait).
    """
    with _LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        start = time.perf_counter()
        value = build()
        seconds = time.perf_counter() - start
        _MODELS[key] = value
        while len(_MODELS) > CAPACITY:
            dropped, _ = _MODELS.popitem(last=False)
            logger.info("dropped model %s from this worker's cache", dropped)
    logger.info("built model %s in %.1f s in worker %d", key, seconds, os.getpid())
    _record_build(key, seconds)
    return value


def clear() -> None:
    """Forget every cached model of this process."""
    with _LOCK:
        _MODELS.clear()


def _record_build(key: Hashable, seconds: float) -> None:
    path = os.environ.get(BUILD_LOG_ENV)
    if not path:
        return
    line = json.dumps({"key": repr(key), "pid": os.getpid(), "seconds": round(seconds, 3)})
    # One short write in append mode: lines from concurrent workers do not interleave.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
