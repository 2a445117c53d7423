"""Logging set-up for jobs (library modules only call ``logging.getLogger(__name__)``)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Send log records to stderr with timestamps; quiet the chattiest libraries."""
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    for noisy in ("py4j", "matplotlib", "PIL", "urllib3", "h5py", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
