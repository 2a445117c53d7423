"""The command line every job shares: ``--config``, ``--set``, logging, exit codes.

Exit codes, for schedulers: 0 success, 1 the stage failed (the log names the cause),
2 bad usage or configuration (nothing was started), 3 another run holds the output root's lock
(nothing was written; retry later).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pyspark.sql import SparkSession

from pipelines.config import Config, ConfigError, load_config
from pipelines.run.logs import configure_logging
from pipelines.run.state import RunLocked

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3

Stage = Callable[[SparkSession, Config], Any]


def job_parser(description: str | None) -> argparse.ArgumentParser:
    # Raw: a job's docstring is its description, and its example commands keep their lines.
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file (default: built-in defaults)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. "
                             "--set ingest.validation_size=1000")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


class StageFailed(RuntimeError):
    """A stage failed and the failure was already logged with its cause and traceback."""


def run_job(name: str, stage: Stage, argv: Sequence[str] | None = None,
            description: str | None = None,
            add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse arguments, load the config (before Spark starts), run ``stage``; an exit code.

    Args:
        add_arguments: for a job with options of its own (the pipeline run): adds them to the
            parser. ``stage`` is then a factory called as ``stage(config, args)`` before Spark
            starts (a :class:`ConfigError` there exits 2); it returns the stage function to run.
    """
    parser = job_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config, args.overrides)
        if add_arguments is not None:
            stage = stage(config, args)
    except ConfigError as exc:
        logger.error("%s: %s", name, exc)
        return EXIT_USAGE
    from pipelines.run.progress import SparkProgress
    from pipelines.run.session import build_session, connect_remote  # pyspark's JVM glue

    remote = connect_remote()
    if remote:
        logger.error(
            "%s: the jobs need a classic SparkSession (they publish outputs atomically through "
            "the JVM's Hadoop FileSystem, which a Spark Connect client cannot reach); unset "
            "SPARK_REMOTE / drop spark-submit's --remote and give a master instead. The library's "
            "stages (pipelines.ml) do run on Connect. Received: %s", name, remote)
        return EXIT_USAGE

    try:
        spark = build_session(config.spark, app_name=f"{config.spark.app_name}: {name}")
    except ConfigError as exc:
        logger.error("%s: %s", name, exc)
        return EXIT_USAGE
    try:
        with SparkProgress(spark, config.pipeline.progress_seconds):
            summary = stage(spark, config)
    except RunLocked as exc:
        logger.error("%s did not start: %s", name, exc)
        return EXIT_LOCKED
    except StageFailed as exc:
        logger.error("%s failed: %s", name, exc)
        return EXIT_FAILED
    except Exception as exc:
        logger.exception("%s failed: %s", name, exc)
        return EXIT_FAILED
    finally:
        spark.stop()
    logger.info("%s finished: %s", name, json.dumps(summary, default=str))
    return EXIT_OK
