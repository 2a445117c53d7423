"""Epoch lines from training on the executors, logged by the driver while the tasks run.

A training task runs for minutes or hours, and Spark tells the driver nothing about it until it
ends (task metrics and accumulators arrive with the finished task), so a fit on the executors
showed only "0/6 tasks" for the length of a member's training. While the estimator's Spark job
runs, :class:`EpochReports` listens on a TCP port of the driver; each training process connects
to it at each epoch's end (:func:`send_epoch`) and sends one JSON line, which the driver logs::

    model 2 of 6: epoch 3/10 in 3 min 05 s: loss=0.0512 top1=0.9841 val_loss=0.0213
    val_top1=0.9940; fit: 14/60 epochs (23 %), 0.0078 epochs/s, ETA 1 h 38 min

The fit's rate is its epochs done over the time since it started, so it counts the tasks that
run at once; early stopping ends it sooner than the ETA says.

The port is bound where Spark binds the driver (``spark.driver.bindAddress``, else
``spark.driver.host``) and advertised as ``spark.driver.host``, the address executors already
reach. Best-effort both ways: a task that cannot connect (a firewall that lets only Spark's own
ports through) trains on and its lines stay in its own log; a line without the fit's random
token is dropped. A Spark Connect client is not an address executors reach: no listener there.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from typing import Any

from pipelines.ml.progress import duration, progress_text

logger = logging.getLogger(__name__)

_MAX_LINE = 64 * 1024


class EpochReports:
    """The driver's listener for one fit (a context manager).

    Args:
        spark: the session; a Spark Connect session gets no listener (``address`` is None).
        names: per model index, how its lines begin (``"model 2 of 6"``).
        epochs: per model index, the epochs it trains at most.
    """

    def __init__(self, spark: Any, names: Sequence[str], epochs: Sequence[int]):
        self.names, self.epochs = list(names), list(epochs)
        self.lines: list[str] = []  # what was logged, in order
        self._done: set[tuple[int, int]] = set()  # (model, epoch)
        self._lock = threading.Lock()
        self._token = secrets.token_hex(16)
        self._started = time.monotonic()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._host = None if _is_connect(spark) else spark.conf.get("spark.driver.host", None)
        master = spark.conf.get("spark.master", "") or ""
        # In local mode the tasks' stderr is the driver's console, where this logs each line.
        self._console = master == "local" or master.startswith("local[")
        if self._host:
            self._bind = spark.conf.get("spark.driver.bindAddress", None) or self._host

    @property
    def address(self) -> dict[str, Any] | None:
        """What a training process needs to send its lines (JSON-able), or None.

        ``console`` is True when the tasks write to the driver's console (local mode), where
        their own epoch lines would show each epoch twice.
        """
        if self._server is None:
            return None
        return {"host": self._host, "port": self._server.server_address[1],
                "token": self._token, "console": self._console}

    def __enter__(self) -> EpochReports:
        self._started = time.monotonic()
        if self._host is None:
            return self
        reports = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for raw in iter(lambda: self.rfile.readline(_MAX_LINE), b""):
                    reports.receive(raw)

        try:
            server = socketserver.ThreadingTCPServer((self._bind, 0), Handler)
        except OSError as exc:
            logger.info("no epoch lines from the executors: cannot listen on %s: %s",
                        self._bind, exc)
            return self
        server.daemon_threads = True  # a sender that hangs does not hold up the fit's end
        self._server = server
        threading.Thread(target=server.serve_forever, name="epoch-reports",
                         daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def receive(self, raw: bytes, now: float | None = None) -> str | None:
        """Log (and return) the line one training process sent; None for a line it drops.

        ``now``: ``time.monotonic()`` when it arrived (the default).
        """
        try:
            report = json.loads(raw)
            if not secrets.compare_digest(str(report.get("token")), self._token):
                return None
            model, epoch, seconds = int(report["model"]), int(report["epoch"]), \
                float(report["seconds"])
            if not 0 <= model < len(self.names):
                raise IndexError(model)
            name, epochs = self.names[model], self.epochs[model]
            metrics = {str(k): float(v) for k, v in report.get("metrics", {}).items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            logger.debug("epoch reports: dropped a malformed line %r", raw[:200])
            return None
        elapsed = (time.monotonic() if now is None else now) - self._started
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        with self._lock:
            self._done.add((model, epoch))  # a retried task sends its epochs again
            fit = progress_text(len(self._done), sum(self.epochs), elapsed, "epochs")
            line = f"{name}: epoch {epoch}/{epochs} in {duration(seconds)}: {shown}; fit: {fit}"
            self.lines.append(line)
        logger.info("%s", line)
        return line


def send_epoch(address: dict[str, Any] | None, model: int, epoch: int, seconds: float,
               metrics: dict[str, float]) -> bool:
    """Send one epoch's line to the driver (from a training process); False if it did not go.

    ``epoch`` counts from 1. Never raises: the training goes on without the driver's line.
    """
    if not address:
        return False
    line = json.dumps({"token": address["token"], "model": model, "epoch": epoch,
                       "seconds": seconds,
                       "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n"
    try:
        with socket.create_connection((address["host"], address["port"]), timeout=5) as sock:
            sock.sendall(line.encode())
    except OSError as exc:
        logger.warning("epoch %s not reported to the driver at %s:%s: %s", epoch,
                       address["host"], address["port"], exc)
        return False
    return True


def epoch_sender(address: dict[str, Any] | None, model: int) -> Any:
    """A Keras callback that sends each epoch's logs with :func:`send_epoch`."""
    import keras

    class EpochSender(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            send_epoch(address, model, epoch + 1, time.perf_counter() - self._started,
                       logs or {})

    return EpochSender()


def _is_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")
