"""``jobs/run_pipeline.py`` as a scheduler runs it: separate processes, exit codes, a run killed
in the middle of a stage and rerun. The pipeline on two executor JVMs, and its rerun, are in
tests/test_standalone_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_mnist_dir

from pipelines.config import load_config
from pipelines.run.state import run_status
from pipelines.stages.ingest import run_ingest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "run_pipeline.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYSPARK_PYTHON"] = sys.executable
    env["SPARK_LOCAL_IP"] = "127.0.0.1"  # executors and the driver talk over loopback only
    for key in ("PIPELINES_FAILPOINTS", "PIPELINES_FAILPOINTS_DIR", "PYSPARK_GATEWAY_PORT"):
        env.pop(key, None)
    return env


def _args(out: Path, mnist_dir: Path, *extra: str) -> list[str]:
    sets = [f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={mnist_dir}",
            f"mnist.cache_dir={out}/cache", "ingest.validation_size=10", "ingest.partitions=2"]
    args = [sys.executable, str(JOB), "--config", str(ROOT / "conf" / "test.yaml")]
    for item in sets:
        args += ["--set", item]
    return args + list(extra)


def _run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if "._tmp-" in p.name
                  or "._old-" in p.name)


def test_bad_config_or_stage_name_exits_2_before_spark_starts(tmp_path, tiny_mnist_dir):
    bad = _run(_args(tmp_path / "out", tiny_mnist_dir, "--set", "pipeline.report=maybe"))
    assert bad.returncode == 2, bad.stderr
    assert "pipeline.report" in bad.stderr and "maybe" in bad.stderr
    unknown = _run(_args(tmp_path / "out", tiny_mnist_dir, "--only", "ingest,nope"))
    assert unknown.returncode == 2, unknown.stderr
    assert "unknown stage" in unknown.stderr and "'nope'" in unknown.stderr
    # An archive's interpreter on a local master cannot work: refused before Spark starts.
    env = {**_env(), "PYSPARK_PYTHON": "./environment/bin/python"}
    archive_locally = subprocess.run(
        _args(tmp_path / "out", tiny_mnist_dir, "--set", "spark.master=local[1]"),
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert archive_locally.returncode == 2, archive_locally.stderr[-3000:]
    assert "Received: master='local[1]', PYSPARK_PYTHON='./environment/bin/python'" \
        in archive_locally.stderr
    assert "SparkSession ready" not in bad.stderr + unknown.stderr + archive_locally.stderr
    assert not (tmp_path / "out").exists()


def test_missing_input_fails_with_exit_1_naming_the_stage_and_cause(tmp_path, tiny_mnist_dir):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-folder"
    proc = _run(_args(out, tiny_mnist_dir, "--only", "ingest", "--set", "ingest.source=folder",
                      "--set", f"ingest.folder={missing}"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage 1/1 ingest: failed" in proc.stderr
    assert str(missing) in proc.stderr
    assert not (out / "_manifests" / "ingest.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "images").exists() and _leftovers(out) == []


def _tree(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*")}


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            tail = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"the run ended before {what}: {tail}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_run_on_one_output_root_exits_3_and_writes_nothing_or_waits_if_asked(
    tmp_path, tiny_mnist_dir
):
    out = tmp_path / "out"
    args = _args(out, tiny_mnist_dir, "--only", "ingest")
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env(), cwd=ROOT)
    try:
        # Once the first run holds the lock and has written its summary, freeze it there.
        _wait_for(lambda: (out / "run.json").exists(), first, "the first run started")
        os.kill(first.pid, signal.SIGSTOP)
        holder = json.loads((out / "_run.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"]
        before = _tree(out)

        second = _run(args)
        assert second.returncode == 3, second.stderr[-3000:]
        assert f"locked by run {holder['run_id']} (pid {first.pid}" in second.stderr
        assert "stage 1/1" not in second.stderr
        assert _tree(out) == before  # not one file written, touched or removed

        # Asked to wait, a run starts once the first one is done.
        log = tmp_path / "waiting.log"
        with log.open("w") as sink:
            waiting = subprocess.Popen(args + ["--set", "pipeline.lock_wait_s=300"],
                                       stdout=subprocess.DEVNULL, stderr=sink, env=_env(),
                                       cwd=ROOT)
        _wait_for(lambda: "waiting up to 300 s" in log.read_text(), waiting,
                  "the second run waited")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert waiting.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "stage 1/1 ingest: skipped (up to date" in log.read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "succeeded" and run["run_id"] != holder["run_id"]
    assert not (out / "_run.lock").exists()


@pytest.fixture
def medium_mnist_dir(tmp_path) -> Path:
    """IDX files with 5,000 train and 1,000 test random images: a write that takes a while."""
    return write_mnist_dir(tmp_path / "mnist-medium", 5000, 1000, seed=3)


def _rows(spark, path: Path) -> list[tuple]:
    df = spark.read.parquet(str(path))
    return sorted((r.id, r.split, r.label, bytes(r.image.data)) for r in df.collect())


@pytest.mark.slow
def test_run_killed_in_the_middle_of_a_stage_then_rerun_gives_the_uninterrupted_output(
    spark, tmp_path, medium_mnist_dir
):
    out = tmp_path / "out"
    args = _args(out, medium_mnist_dir, "--only", "ingest", "--set", "ingest.partitions=4")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(), cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob("images._tmp-*")):  # the stage is writing its output
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "ingest never started writing"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM, like a lost node
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "_manifests" / "ingest.json").exists()
    assert _leftovers(out), "the kill should have left a half-written folder"
    # The killed run's summary still says "running", with what a scheduler needs to see that
    # it is not: its pid and host (and a heartbeat that stopped).
    killed = json.loads((out / "run.json").read_text())
    assert killed["status"] == "running" and killed["pid"] == proc.pid
    assert killed["heartbeat_at"] and killed["started_at"]
    assert run_status(killed) == "stale"

    rerun = _run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"taking over the lock of run {killed['run_id']}" in rerun.stderr
    assert "stage 1/1 ingest: running (no manifest)" in rerun.stderr
    assert _leftovers(out) == []
    after = json.loads((out / "run.json").read_text())
    assert after["status"] == "succeeded"
    assert after["previous_run"]["run_id"] == killed["run_id"]
    assert after["previous_run"]["status"] == "stale"
    assert not (out / "_run.lock").exists()

    reference = load_config(ROOT / "conf" / "test.yaml", [
        f"output_root={tmp_path / 'reference'}", "mnist.sources=[local]",
        f"mnist.local_dir={medium_mnist_dir}", "ingest.validation_size=10",
        "ingest.partitions=4"])
    run_ingest(spark, reference)
    expected = _rows(spark, tmp_path / "reference" / "images")
    assert len(expected) == 6000
    assert _rows(spark, out / "images") == expected
