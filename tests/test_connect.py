"""Every inference stage and the SQL UDF on a Spark Connect session, in a child process.

A classic SparkSession (this run's ``spark`` fixture) and a Connect session cannot live in one
Python process, so the checks in ``tests/connect_checks.py`` run in a child pytest whose only
session is ``SparkSession.builder.remote("local[2]")``: featurizer with a weights file,
predictor, KerasImageClassifier, SQL UDF, a Pipeline with LogisticRegression fit/save/load,
and KerasImageEstimator (an ensemble trained as tasks, a two-worker barrier fit). The child's
report is shown when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_stages_estimator_and_sql_udf_work_on_a_spark_connect_session(tmp_path):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("SPARK_REMOTE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "connect_checks.py"), "-q", "-p",
         "no:cacheprovider", f"--basetemp={tmp_path / 'child'}", "-rA"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout[:12000] + result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "6 passed" in result.stdout, report


def test_a_job_asked_to_run_on_connect_stops_at_start_with_exit_code_2():
    env = {**os.environ, "SPARK_REMOTE": "sc://localhost:15002"}
    result = subprocess.run(
        [sys.executable, "jobs/transfer.py", "--config", "conf/test.yaml"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "need a classic SparkSession" in result.stderr
    assert "Received: SPARK_REMOTE=sc://localhost:15002" in result.stderr
