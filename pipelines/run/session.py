"""Building the SparkSession a job runs in, from :class:`pipelines.config.SparkConfig`.

What ``spark-submit`` (or ``spark-defaults.conf``) already set wins over the config file: the
master, the app name and every conf entry given there are left alone, so one config file serves a
laptop and a cluster. One exception: without ``--name``, spark-submit names the application after
its script (``run_pipeline.py``); that default gives way to the configured name.

Spark's own log lines before the session exists follow log4j2's configuration: pass
``conf/log4j2.properties`` (WARN) with ``--driver-java-options`` (docs/cluster.md). The configured
``spark.log_level`` is also set as ``spark.log.level``, which the SparkContext applies as it
starts, and again once it runs.
"""

from __future__ import annotations

import logging
import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from pipelines.config import ConfigError, SparkConfig
from pipelines.run.logs import tensorflow_env

logger = logging.getLogger(__name__)


def build_session(config: SparkConfig, app_name: str | None = None) -> SparkSession:
    """Get or create the SparkSession for a job.

    Args:
        config: the ``spark`` section of the configuration.
        app_name: overrides ``config.app_name`` (jobs pass their own name).
    """
    submitted = submitted_conf()
    builder = SparkSession.builder
    if not submitted.contains("spark.master"):
        builder = builder.master(config.master)
    if not submitted.contains("spark.app.name") or _default_submit_name(submitted):
        builder = builder.appName(app_name or config.app_name)
    if not submitted.contains("spark.log.level"):
        builder = builder.config("spark.log.level", config.log_level)
    for key, value in config.conf.items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    for name, value in tensorflow_env().items():
        # Python workers on executors get the driver's TensorFlow log threshold (local-mode
        # workers also inherit the driver's environment).
        key = f"spark.executorEnv.{name}"
        if not submitted.contains(key) and key not in config.conf:
            builder = builder.config(key, value)
    master = submitted.get("spark.master", config.master)
    python = os.environ.get("PYSPARK_PYTHON") or submitted.get("spark.pyspark.python", "")
    if _is_local(master) and python.startswith("./"):
        # Otherwise the run fails at the first Python stage, after unpacking the archive.
        raise ConfigError(
            f"master {master!r} runs the Python workers on this machine, where {python!r} (a "
            "folder that --archives unpacks on a cluster's executors) does not exist: give "
            "spark-submit --master of a cluster (docs/cluster.md), or unset PYSPARK_PYTHON to "
            f"run locally. Received: master={master!r}, PYSPARK_PYTHON={python!r}"
        )
    if _is_local(master) and not _python_set(submitted):
        # Python workers on this machine use the driver's interpreter (and so its packages).
        # PySpark reads PYSPARK_PYTHON when the context starts; the conf key alone is only
        # honoured by spark-submit.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(config.log_level)
    logger.info(
        "SparkSession ready: master=%s, app=%s, Spark %s",
        spark.sparkContext.master, spark.sparkContext.appName, spark.version,
    )
    return spark


def connect_remote() -> str | None:
    """What asks for a Spark Connect session in this process (``SPARK_REMOTE``, or spark-submit's
    ``--remote``), as ``NAME=value`` for messages; None for a classic session."""
    for name in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def submitted_conf() -> SparkConf:
    """The conf ``spark-submit`` was given (empty when the job was started as plain Python).

    Under spark-submit the JVM is already up and holds ``--master``/``--conf`` as system
    properties; attaching to it and loading a fresh SparkConf reads them. Started as plain
    Python there is no JVM yet, and none is started here, so that conf entries such as
    ``spark.driver.memory`` from the config file still reach the JVM when the builder starts it.
    """
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        SparkContext._ensure_initialized()
        return SparkConf()
    return SparkConf(loadDefaults=False)


def _default_submit_name(conf: SparkConf) -> bool:
    """True when the app name is the one spark-submit gives without ``--name``: the script's."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return bool(script) and conf.get("spark.app.name") == script


def _is_local(master: str) -> bool:
    return master.startswith("local")


def _python_set(conf: SparkConf) -> bool:
    return bool(
        conf.contains("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON")
    )
