"""Run state a scheduler can trust: one lock per output root, a heartbeat, stale-run detection.

A pipeline run first takes the lock ``pipeline.lock`` (default ``{output_root}/_run.lock``), a
small JSON file created exclusively (:meth:`Storage.create_new`) that names its holder: run id,
pid, host, start time. While the run lasts, a heartbeat thread touches the lock every
``pipeline.heartbeat_s`` seconds and rewrites ``heartbeat_at`` in the run summary. Another run
that finds the lock:

- exits with :data:`EXIT_LOCKED` (``RunLocked``), or waits up to ``pipeline.lock_wait_s``;
- takes it over when the holder is stale: on the same host its process is gone, or on any host
  the lock has had no heartbeat for ``pipeline.stale_after_s``. A takeover first creates the
  token ``<lock>.takeover-<stale run id>`` exclusively, so of several runs that found the same
  stale lock exactly one replaces it.

:func:`run_status` reads a run summary the same way: ``running`` with a dead process or an old
heartbeat reads as ``stale``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipelines.io.storage import Storage

logger = logging.getLogger(__name__)

RUNNING = "running"
STALE = "stale"


class RunLocked(RuntimeError):
    """Another run holds the output root's lock (and was not stale, or waiting timed out)."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None.

    Recorded beside the pid so that a recycled pid is not taken for the original process.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Field 22; the command name (field 2) may hold spaces, so split after its ")".
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_identity(run_id: str, started_at: str) -> dict[str, Any]:
    """Who this process is, as the lock and the run summary record it."""
    pid = os.getpid()
    return {"run_id": run_id, "pid": pid, "host": socket.gethostname(),
            "pid_start": process_start(pid), "started_at": started_at}


def stale_reason(holder: dict[str, Any], heartbeat_ms: int | None, stale_after_s: float,
                 now_ms: int | None = None) -> str | None:
    """Why ``holder`` (a lock's or run summary's record) is stale, or None when it may be live."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        start = process_start(pid)
        if start is None:
            return f"process {pid} on {holder['host']} is gone"
        if holder.get("pid_start") not in (None, start):
            return f"process {pid} on {holder['host']} is gone (its pid was reused)"
    if heartbeat_ms is not None and now_ms - heartbeat_ms > stale_after_s * 1000:
        return f"no heartbeat for {(now_ms - heartbeat_ms) / 1000:.0f} s"
    return None


def run_status(run: dict[str, Any], stale_after_s: float | None = None,
               now: datetime | None = None) -> str:
    """A run summary's status as a scheduler should read it: a killed run is ``stale``."""
    status = run.get("status", "unknown")
    if status != RUNNING:
        return status
    limit = stale_after_s if stale_after_s is not None else run.get("stale_after_s")
    beat = run.get("heartbeat_at") or run.get("started_at")
    beat_ms = _parse_ms(beat) if beat else None
    now_ms = int((now or datetime.now(UTC)).timestamp() * 1000)
    reason = stale_reason(run, beat_ms if limit else None, limit or 0, now_ms)
    return STALE if reason else RUNNING


class RunLock:
    """The lock of one output root, held by this process for one run."""

    def __init__(self, storage: Storage, path: str, holder: dict[str, Any], *,
                 stale_after_s: float, wait_s: float = 0.0, poll_s: float = 2.0):
        self.storage = storage
        self.path = path
        self.holder = holder
        self.stale_after_s = stale_after_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._tokens: list[str] = []
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, waiting up to ``wait_s``; take over a stale one.

        Raises:
            RunLocked: a live run holds it (after waiting ``wait_s``).
        """
        deadline = time.monotonic() + self.wait_s
        data = json.dumps(self.holder, indent=2).encode()
        said = False
        while True:
            if self.storage.create_new(self.path, data):
                return self
            current = self._read()
            if current is not None:
                heartbeat = (self.storage.stat(self.path) or {}).get("mtime")
                reason = stale_reason(current, heartbeat, self.stale_after_s)
                if reason is not None and self._take_over(current, reason, data):
                    return self
            if time.monotonic() >= deadline:
                who = current or {}
                raise RunLocked(
                    f"output root is locked by run {who.get('run_id', '?')} (pid "
                    f"{who.get('pid', '?')} on {who.get('host', '?')}, started "
                    f"{who.get('started_at', '?')}); lock file {self.path}. Wait for it, set "
                    f"pipeline.lock_wait_s to wait, or remove the lock file if that run is "
                    f"certainly gone"
                )
            if not said:
                logger.info("output root locked by run %s (pid %s on %s); waiting up to %.0f s",
                            (current or {}).get("run_id", "?"), (current or {}).get("pid", "?"),
                            (current or {}).get("host", "?"), self.wait_s)
                said = True
            time.sleep(max(0.05, min(self.poll_s, deadline - time.monotonic())))

    def _take_over(self, stale: dict[str, Any], reason: str, data: bytes) -> bool:
        token = f"{self.path}.takeover-{stale.get('run_id', 'unknown')}"
        if not self.storage.create_new(token, data):
            # Another run is taking this stale lock over, unless it was killed doing so.
            taker = _read_json(self.storage, token)
            beat = (self.storage.stat(token) or {}).get("mtime")
            if taker is None or stale_reason(taker, beat, self.stale_after_s) is None:
                return False
            self.storage.delete(token)
            if not self.storage.create_new(token, data):
                return False
        self._tokens.append(token)
        again = self._read()
        if again is None or again.get("run_id") != stale.get("run_id"):
            return False
        logger.warning("taking over the lock of run %s (pid %s on %s): %s",
                       stale.get("run_id"), stale.get("pid"), stale.get("host"), reason)
        self.storage.delete(self.path)
        if not self.storage.create_new(self.path, data):
            return False
        self.took_over = {**stale, "stale_reason": reason}
        return True

    def _read(self) -> dict[str, Any] | None:
        return _read_json(self.storage, self.path)

    def touch(self) -> None:
        self.storage.touch(self.path)

    def release(self) -> None:
        """Remove the lock (only if it is still ours) and the takeover tokens this run made."""
        current = self._read()
        if current is not None and current.get("run_id") == self.holder["run_id"]:
            self.storage.delete(self.path)
        for token in self._tokens:
            self.storage.delete(token)
        self._tokens.clear()


class Heartbeat:
    """Calls ``beat`` every ``interval_s`` seconds in a daemon thread, until stopped."""

    def __init__(self, beat: Callable[[], None], interval_s: float):
        self._beat = beat
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # a missed beat is not worth stopping the run for
                logger.warning("heartbeat failed: %s", exc)


def _read_json(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_bytes(path).decode("utf-8"))
    except Exception:  # gone meanwhile, or being written: look again at the next poll
        return None
    return value if isinstance(value, dict) else None


def _parse_ms(stamp: str) -> int | None:
    try:
        return int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                   .timestamp() * 1000)
    except ValueError:
        return None
