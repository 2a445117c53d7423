"""Failpoints for fault-injection tests (off unless an environment variable names them).

``PIPELINES_FAILPOINTS="export.write=kill,runner.stage=raise"`` arms failpoints; each fires
once per marker folder ``PIPELINES_FAILPOINTS_DIR`` (the first caller to create the marker
file ``<dir>/<name>`` fires, every later call passes), so a retried Spark task or a rerun job
succeeds. ``kill`` ends the process at once, like an OOM-killed Python worker or a ``kill -9``;
``raise`` raises :class:`InjectedFault`.

In a running SparkSession, executors see the variables when they are set in
``spark.sparkContext.environment`` before the job's functions are created.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_POINTS = "PIPELINES_FAILPOINTS"
ENV_DIR = "PIPELINES_FAILPOINTS_DIR"


class InjectedFault(RuntimeError):
    """Raised by an armed ``raise`` failpoint."""


def maybe_fail(name: str) -> None:
    """Fire failpoint ``name`` if it is armed and has not fired yet in this marker folder."""
    spec = os.environ.get(ENV_POINTS)
    if not spec:
        return
    actions = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    action = actions.get(name)
    if action is None:
        return
    folder = Path(os.environ.get(ENV_DIR, "/tmp/pipelines-failpoints"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    if action == "kill":
        os._exit(137)
    raise InjectedFault(f"failpoint {name!r} fired")
