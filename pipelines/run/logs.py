"""Logging set-up for jobs (library modules only call ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging
import os
import sys

from pipelines.ml.tf_logging import quiet_tensorflow_import

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: TensorFlow's C++ logging threshold: 2 keeps errors and drops the INFO/WARNING banner
#: ("oneDNN custom operations are on", "This TensorFlow binary is optimized...") that every
#: process importing TensorFlow would print, the driver and each Python worker alike.
TF_QUIET = "2"


def configure_logging(level: str | int = "INFO") -> None:
    """Send log records to stderr with timestamps; quiet the chattiest libraries.

    Below DEBUG, TensorFlow's C++ banner is turned off for this process and, through the
    environment, for the Python workers it starts (see :func:`tensorflow_env`); a value of
    ``TF_CPP_MIN_LOG_LEVEL`` already in the environment is kept.
    """
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    for noisy in ("py4j", "matplotlib", "PIL", "urllib3", "h5py", "absl", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    numeric = level if isinstance(level, int) else logging.getLevelName(level)
    if isinstance(numeric, int) and numeric > logging.DEBUG:
        # Read by TensorFlow when it is imported: this must happen before any import of it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_QUIET)
        quiet_tensorflow_import()  # the lines TensorFlow logs before reading it


def tensorflow_env() -> dict[str, str]:
    """``TF_CPP_MIN_LOG_LEVEL`` as set for this process, for the executors' environment."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    return {"TF_CPP_MIN_LOG_LEVEL": value} if value is not None else {}
