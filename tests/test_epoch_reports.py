"""The driver's listener for epoch lines from executor training (pipelines.ml.epoch_reports).

The end-to-end path (training tasks on two executor JVMs sending their lines) is in
tests/test_estimator_cluster.py; here, the listener on this suite's session and real sockets.
"""

from __future__ import annotations

import json
import logging
import socket
import time

from pipelines.ml import distributed, training
from pipelines.ml.epoch_reports import EpochReports, send_epoch


def _wait_for(lines: list[str], count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


def test_lines_sent_to_the_driver_are_logged_with_the_model_and_the_fit_so_far(spark, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.ml.epoch_reports")
    with EpochReports(spark, ["model 0 of 2", "model 1 of 2"], [4, 4]) as reports:
        address = reports.address
        assert address["host"] == spark.conf.get("spark.driver.host")
        assert send_epoch(address, 1, 1, 30.0, {"loss": 0.25, "val_top1": 0.9})
        assert send_epoch(address, 0, 1, 95.0, {"loss": 0.125})
        lines = _wait_for(reports.lines, 2)
    assert [line.split("; fit: ")[0] for line in lines] == [
        "model 1 of 2: epoch 1/4 in 30 s: loss=0.2500 val_top1=0.9000",
        "model 0 of 2: epoch 1/4 in 1 min 35 s: loss=0.1250"]
    assert lines[0].split("; fit: ")[1].startswith("1/8 epochs (12 %), ")
    assert lines[1].split("; fit: ")[1].startswith("2/8 epochs (25 %), ")
    assert [r.getMessage() for r in caplog.records
            if r.name == "pipelines.ml.epoch_reports"] == lines
    assert reports.address is None  # closed: nothing listens any more
    with socket.socket() as probe:
        assert probe.connect_ex((address["host"], address["port"])) != 0


def _line(reports: EpochReports, model: int, epoch: int, seconds_in: float) -> str | None:
    report = {"token": reports.address["token"], "model": model, "epoch": epoch,
              "seconds": 5.0, "metrics": {"loss": 0.5}}
    return reports.receive(json.dumps(report).encode(), now=reports._started + seconds_in)


def test_the_fit_eta_counts_every_epoch_done_once_at_the_fit_rate(spark):
    with EpochReports(spark, ["model 0 of 2", "model 1 of 2"], [4, 4]) as reports:
        _line(reports, 0, 1, 50.0)
        # Two tasks at once: 2 of 8 epochs in 100 s, so 6 more take 300 s.
        assert _line(reports, 1, 1, 100.0) == (
            "model 1 of 2: epoch 1/4 in 5 s: loss=0.5000; fit: 2/8 epochs (25 %), "
            "0.02 epochs/s, ETA 5 min 00 s")
        # A retried task sends epoch 1 again: still 2 done.
        assert "fit: 2/8 epochs (25 %)" in _line(reports, 1, 1, 120.0)
    with EpochReports(spark, ["the 2-worker model"], [2]) as reports:
        _line(reports, 0, 1, 10.0)
        assert _line(reports, 0, 2, 20.0).endswith("fit: 2/2 epochs (100 %), 0.1 epochs/s, "
                                                   "ETA 0 s")


def test_lines_without_the_token_or_malformed_are_dropped(spark):
    with EpochReports(spark, ["model 0 of 1"], [3]) as reports:
        good = {"token": reports.address["token"], "model": 0, "epoch": 1, "seconds": 1.0}
        for line in (b"not json", json.dumps({**good, "token": "guess"}).encode(),
                     json.dumps({**good, "model": 5}).encode(),  # no such model
                     json.dumps({**good, "model": -1}).encode(),
                     json.dumps({k: v for k, v in good.items() if k != "epoch"}).encode()):
            assert reports.receive(line) is None
        assert reports.receive(json.dumps(good).encode()).startswith("model 0 of 1: epoch 1/3")
        assert len(reports.lines) == 1


def test_a_driver_that_cannot_be_reached_leaves_training_alone(caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket closes
    address = {"host": "127.0.0.1", "port": port, "token": "x"}
    assert send_epoch(address, 0, 3, 1.0, {"loss": 0.1}) is False
    assert f"epoch 3 not reported to the driver at 127.0.0.1:{port}" in caplog.text
    assert send_epoch(None, 0, 1, 1.0, {}) is False  # no listener (Spark Connect): no attempt


def _child_line(logger: logging.Logger, message: str) -> bytes:
    """A line as a training process logs it (its own format)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None)
    return (logging.Formatter(distributed._CHILD_LOG_FORMAT).format(record) + "\n").encode()


def test_in_local_mode_each_epoch_reaches_the_console_once_through_the_driver(spark):
    with EpochReports(spark, ["model 0 of 1"], [3]) as reports:
        address = reports.address
    assert spark.conf.get("spark.master").startswith("local[")
    assert address["console"] is True  # tasks write to this process's console
    epoch = _child_line(training.epoch_logger, "epoch 3: loss=0.1000")
    chief = _child_line(training.epoch_logger, "worker 0 epoch 3: {'loss': 0.1} (2.0s)")
    other = _child_line(distributed.logger, "worker 0 of 2: 2 threads")
    chatter = b"2026-12-07 20:01:02.000 I tensorflow/core/util/port.cc:153] oneDNN on\n"
    assert [distributed._relayed(line, address) for line in (epoch, chief, other, chatter)] == [
        False, False, True, False]
    # Executors elsewhere (a cluster, local-cluster) or no listener: the task's log keeps them.
    for elsewhere in ({**address, "console": False}, None):
        assert [distributed._relayed(line, elsewhere) for line in (epoch, chief, other)] == [
            True, True, True]
