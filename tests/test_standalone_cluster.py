"""The cluster recipe of docs/cluster.md, as written: a real standalone master and two workers
(the ``spark-class`` Master and Worker of the installed pyspark) on 127.0.0.1, and ``spark-submit
--archives dist/env.tar.gz#environment`` of the pipeline from a directory outside the project.
Two executor JVMs run the stages whose work runs in Python workers (export, augment, the
featurizer): nothing may rely on driver-local state. A rerun on ``local[1]`` then skips every
stage.

Cost: ``make dist`` when the archive is out of date (about 3 min here; a no-op otherwise), then
about 3 min for the cluster, each executor unpacking the archive, five stages and the rerun.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pyspark
import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SPARK_HOME = Path(pyspark.__file__).resolve().parent
STAGES = ["ingest", "export", "augment", "transfer", "report"]
WORKERS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def dist_archive() -> Path:
    """``dist/env.tar.gz`` as ``make dist`` builds it (a no-op when it is up to date)."""
    proc = subprocess.run(["make", "dist"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return ROOT / "dist" / "env.tar.gz"


def _versions(distributions) -> dict[str, str]:
    """Normalised project name (PEP 503) -> version, this project left out."""
    versions = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions}
    versions.pop("spark-image-pipelines", None)
    return versions


def _spark_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYSPARK_GATEWAY_PORT", "PYSPARK_PYTHON", "PYTHONPATH",
                        "PIPELINES_FAILPOINTS", "PIPELINES_FAILPOINTS_DIR")}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def standalone_cluster(tmp_path):
    """A master and two workers (1 core, 1.5 GiB each) on 127.0.0.1; stopped by pid
    afterwards."""
    port, ui = _free_port(), _free_port()
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    procs = []
    with (logs / "master.log").open("w") as sink:
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui)],
            stdout=sink, stderr=subprocess.STDOUT, env=_spark_env()))
    work = tmp_path / "worker-work"
    for i in range(WORKERS):
        with (logs / f"worker-{i}.log").open("w") as sink:
            procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker",
                 f"spark://127.0.0.1:{port}", "--host", "127.0.0.1", "--cores", "1",
                 "--memory", "1536m", "--work-dir", str(work / str(i)),
                 "--webui-port", str(_free_port())],
                stdout=sink, stderr=subprocess.STDOUT, env=_spark_env()))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(p.poll() is None for p in procs), (logs / "master.log").read_text()[-2000:]
            try:
                if _master_state(ui).get("aliveworkers") == WORKERS:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the workers never registered with the master"
            time.sleep(0.5)
        yield {"master": f"spark://127.0.0.1:{port}", "ui": ui, "work": work, "logs": logs}
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.mark.cluster
@pytest.mark.slow
def test_spark_submit_with_the_packed_env_on_a_standalone_cluster(
    dist_archive, standalone_cluster, tmp_path, tiny_mnist_dir
):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"  # not the project: nothing may rely on its cwd
    elsewhere.mkdir()
    env = _spark_env()
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable  # client mode: the driver uses the venv
    env["PYSPARK_PYTHON"] = "./environment/bin/python"  # executors: the unpacked archive
    sets = [f"output_root={out}", "mnist.sources=[local]", f"mnist.local_dir={tiny_mnist_dir}",
            f"mnist.cache_dir={out}/cache", "ingest.validation_size=10", "ingest.partitions=2",
            "transfer.train_size=30", "transfer.test_size=20"]
    job = [str(ROOT / "jobs" / "run_pipeline.py"), "--config", str(ROOT / "conf" / "test.yaml"),
           "--only", ",".join(STAGES), *[arg for item in sets for arg in ("--set", item)]]
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", standalone_cluster["master"],
           "--archives", f"{dist_archive}#environment",
           "--driver-java-options", f"-Dlog4j2.configurationFile={ROOT}/conf/log4j2.properties",
           "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1", *job]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=900)
    # spark-submit passes the Python driver's stderr on to its own stdout.
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # The configured app name and log level from the first line: no Spark INFO lines at all.
    assert f"master={standalone_cluster['master']}, app=spark-image-pipelines: run_pipeline" \
        in log
    spark_info = [line for line in log.splitlines()
                  if re.search(r"\bINFO\b", line) and " INFO pipelines." not in line]
    assert spark_info == [], spark_info[:10]
    apps = _master_state(standalone_cluster["ui"])
    names = [app["name"] for app in apps["completedapps"] + apps["activeapps"]]
    assert names == ["spark-image-pipelines: run_pipeline"], names

    # The stages ran on the executor, in the archive's Python, and wrote what they should.
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "succeeded", run
    assert [(r["stage"], r["action"]) for r in run["stages"]] == [(s, "ran") for s in STAGES]
    ingest = json.loads((out / "_manifests" / "ingest.json").read_text())
    assert ingest["summary"]["rows_per_split"] == {"train": 30, "validation": 10, "test": 20}
    assert len(list((out / "png").rglob("*.png"))) == 60
    assert len(list((out / "augmented" / "png").rglob("*.png"))) == 60 * 3
    metrics = json.loads((out / "transfer" / "metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0
    assert "none" in json.dumps(metrics).lower()  # says which weights were used
    assert f"stage 1/{len(STAGES)} ingest: running (no manifest)" in log
    assert "Run status: <b class=\"ok\">succeeded</b>" in (out / "report" / "index.html").read_text()
    unpacked = list(standalone_cluster["work"].glob("*/app-*/*/environment"))
    assert len(unpacked) == WORKERS, sorted(
        p.name for p in standalone_cluster["work"].rglob("*"))[:20]
    site = unpacked[0] / "lib" / "python3.11" / "site-packages"
    assert (site / "pipelines").is_dir() and (site / "tensorflow").is_dir()
    assert not (site / "pyspark").exists()  # the cluster's own pyspark serves the executors
    # The executors run the versions this suite passed with (make dist's constraints).
    packed = _versions(metadata.distributions(path=[str(site)]))
    ours = _versions(metadata.distributions())
    assert packed["tensorflow-cpu"] == ours["tensorflow-cpu"]
    differ = {name: (v, ours.get(name)) for name, v in packed.items() if ours.get(name) != v}
    assert not differ, differ
    # docker/Dockerfile's constraints: the same versions, pyspark left to the image's Spark.
    docker = {canonicalize_name(name): version for name, version in
              (line.split("==") for line in (ROOT / "dist" / "constraints.txt").read_text().split())}
    assert "pyspark" not in docker and "py4j" not in docker, sorted(docker)
    assert {n: docker.get(n) for n in packed} == packed
    executor_log = "".join(p.read_text(errors="replace") for p in
                           standalone_cluster["work"].glob("*/app-*/*/stderr"))
    assert "Traceback" not in executor_log, executor_log[-3000:]

    # Another master, this checkout's Python, same config sections: nothing to redo.
    rerun_env = {**_spark_env(), "PYSPARK_PYTHON": sys.executable,
                 "PYTHONPATH": str(ROOT)}
    rerun = subprocess.run([sys.executable, *job, "--set", "spark.master=local[1]"],
                           cwd=elsewhere, env=rerun_env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"stage {i}/{len(STAGES)} {stage}: skipped (up to date" in rerun.stderr
    assert json.loads((out / "_manifests" / "ingest.json").read_text()) == ingest
