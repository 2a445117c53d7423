"""Jobs as a scheduler sees them: exit codes and logs, through a real subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(job, *args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / job), *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def test_bad_config_exits_2_before_spark_starts(tmp_path):
    proc = _run("ingest_mnist.py", "--config", str(ROOT / "conf/test.yaml"),
                "--set", "ingest.partitions=zero", cwd=tmp_path)
    assert proc.returncode == 2
    assert "ingest.partitions" in proc.stderr and "'zero'" in proc.stderr
    assert "SparkSession ready" not in proc.stderr


def test_help_shows_the_jobs_example_commands_one_per_line(tmp_path):
    proc = _run("train_cnn.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "    python jobs/train_cnn.py --config conf/local.yaml" in lines
    assert "    spark-submit jobs/train_cnn.py --config conf/cluster.yaml --set cnn.num_workers=2" \
        in lines


@pytest.mark.slow
def test_ingest_job_succeeds_as_a_subprocess_and_reruns_cleanly(tmp_path, tiny_mnist_dir):
    common = ["--config", str(ROOT / "conf/test.yaml"), "--set", f"output_root={tmp_path}/out",
              "--set", "mnist.sources=[local]", "--set", f"mnist.local_dir={tiny_mnist_dir}",
              "--set", f"mnist.cache_dir={tmp_path}/cache", "--set", "ingest.validation_size=5"]
    ingest = _run("ingest_mnist.py", *common, cwd=tmp_path)
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert "ingest_mnist finished" in ingest.stderr
    assert '"rows_per_split": {"train": 35, "validation": 5, "test": 20}' in ingest.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images"]
