"""Run state: the output root's lock, stale holders, run summaries read as a scheduler would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines.io.storage import Storage
from pipelines.run.state import RunLock, RunLocked, holder_identity, run_status, stale_reason


def _lock(spark, path, run_id, **kwargs):
    return RunLock(Storage(spark), str(path), holder_identity(run_id, "2026-12-01T00:00:00Z"),
                   stale_after_s=kwargs.pop("stale_after_s", 60), **kwargs)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_while_the_first_is_live_then_gets_the_released_lock(
    spark, tmp_path
):
    path = tmp_path / "root" / "_run.lock"
    first = _lock(spark, path, "run-a").acquire()
    assert json.loads(path.read_text())["run_id"] == "run-a"
    with pytest.raises(RunLocked, match=r"locked by run run-a \(pid \d+ on .*lock file"):
        _lock(spark, path, "run-b").acquire()
    first.release()
    assert not path.exists()
    second = _lock(spark, path, "run-b").acquire()
    assert json.loads(path.read_text())["run_id"] == "run-b" and second.took_over is None
    second.release()


def test_waiting_holder_gets_the_lock_when_it_is_released(spark, tmp_path):
    import threading

    path = tmp_path / "_run.lock"
    first = _lock(spark, path, "run-a").acquire()
    threading.Timer(1.0, first.release).start()
    started = time.monotonic()
    second = _lock(spark, path, "run-b", wait_s=30, poll_s=0.2).acquire()
    assert 0.8 < time.monotonic() - started < 20
    assert json.loads(path.read_text())["run_id"] == "run-b"
    second.release()


def test_stale_locks_are_taken_over_once(spark, tmp_path):
    path = tmp_path / "_run.lock"
    # Same host, process gone: stale at once.
    dead = {"run_id": "dead", "pid": _dead_pid(), "host": socket.gethostname(),
            "pid_start": "1", "started_at": "2026-12-01T00:00:00Z"}
    path.write_text(json.dumps(dead))
    taker = _lock(spark, path, "run-b").acquire()
    assert taker.took_over["run_id"] == "dead"
    assert "is gone" in taker.took_over["stale_reason"]
    # A second contender for the same stale lock finds the takeover token: it does not win.
    assert (tmp_path / "_run.lock.takeover-dead").exists()
    taker.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # Another host: stale only once the heartbeat (the lock's mtime) is old enough.
    remote = {"run_id": "remote", "pid": 1, "host": "some-other-host", "started_at": "x"}
    path.write_text(json.dumps(remote))
    with pytest.raises(RunLocked, match="locked by run remote"):
        _lock(spark, path, "run-c", stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    taker = _lock(spark, path, "run-c", stale_after_s=60).acquire()
    assert "no heartbeat for 1" in taker.took_over["stale_reason"]
    taker.release()


def test_run_status_reads_a_killed_run_as_stale():
    me = holder_identity("r", "2026-12-01T00:00:00Z")
    now_ms = int(time.time() * 1000)
    assert stale_reason(me, now_ms, 60) is None  # this very process
    gone = {**me, "pid": _dead_pid()}
    assert "is gone" in stale_reason(gone, now_ms, 60)
    running = {**gone, "status": "running", "heartbeat_at": "2099-01-01T00:00:00Z",
               "stale_after_s": 300}
    assert run_status(running) == "stale"
    elsewhere = {**running, "host": "other", "heartbeat_at": "2026-01-01T00:00:00Z"}
    assert run_status(elsewhere) == "stale"
    assert run_status({**elsewhere, "heartbeat_at": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) == "running"
    assert run_status({"status": "succeeded"}) == "succeeded"


def test_heartbeat_beats_until_stopped_and_survives_a_failing_beat():
    from pipelines.run.state import Heartbeat

    beats = []

    def beat():
        beats.append(time.monotonic())
        if len(beats) == 2:
            raise OSError("storage hiccup")  # logged; the next beat still comes

    with Heartbeat(beat, 0.05):
        time.sleep(0.5)
    seen = len(beats)
    time.sleep(0.2)
    assert seen >= 4 and len(beats) == seen
