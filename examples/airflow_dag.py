"""Airflow DAG: the pipeline nightly through spark-submit (an example, not a dependency).

Needs ``apache-airflow`` and ``apache-airflow-providers-apache-spark`` on the Airflow side and a
Spark connection ``spark_default`` (master URL, e.g. ``yarn`` or ``spark://host:7077``). The
packed environment and the job files come from ``make dist`` (see docs/cluster.md).

One task runs the whole pipeline: it skips the stages whose manifests still match, so an
Airflow retry redoes only the stage that failed and those after it. A task per stage is also
possible (``--only <stage>``), in the same order, each depending on the previous one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

PROJECT = "/opt/spark-image-pipelines"   # where the repository (jobs/, conf/, dist/) is deployed

with DAG(
    dag_id="spark_image_pipelines",
    start_date=datetime(2026, 1, 1),
    schedule="30 2 * * *",
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["spark", "images"],
) as dag:
    common = dict(
        conn_id="spark_default",
        archives=f"{PROJECT}/dist/env.tar.gz#environment",
        conf={
            "spark.pyspark.python": "./environment/bin/python",
            "spark.yarn.appMasterEnv.PYSPARK_PYTHON": "./environment/bin/python",
            "spark.executor.memory": "4g",
            "spark.executor.cores": "2",
        },
        # In cluster mode the driver runs on a cluster node: ship the config files with the job;
        # they land in its working directory (cluster.yaml includes base.yaml beside it).
        files=f"{PROJECT}/conf/base.yaml,{PROJECT}/conf/cluster.yaml",
        deploy_mode="cluster",
    )
    SparkSubmitOperator(
        task_id="run_pipeline",
        application=f"{PROJECT}/jobs/run_pipeline.py",
        application_args=["--config", "cluster.yaml"],
        name="spark-image-pipelines",
        **common,
    )
