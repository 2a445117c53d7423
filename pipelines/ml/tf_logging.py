"""TensorFlow's import-time log lines, held to ``TF_CPP_MIN_LOG_LEVEL``.

TensorFlow 2.19 and later log a few lines from static initialisers of its extension modules
("oneDNN custom operations are on...", once per module that carries them) through absl before
its own log threshold is applied, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence them
(tensorflow/tensorflow#100442); every Python worker that imports TensorFlow prints them again.

:func:`quiet_tensorflow_import` makes the first ``import tensorflow`` of the process (also the one
``import keras`` does) run with file descriptor 2 passed through a pipe: absl-format lines below the
threshold (``I0000 ...`` for level >= 1, ``W0000 ...`` for level >= 2) and absl's notice about
logging before its initialisation are dropped; every other byte goes to the real stderr in order.
It does nothing when the level is unset or 0, or when TensorFlow is already imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

#: absl's notice printed before the first message logged ahead of its initialisation.
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called"
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:]+\.\d+ +\d+ [^ ]+:\d+\] ")


def tf_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as an int (0 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def quiet_tensorflow_import() -> None:
    """Filter the first ``import tensorflow`` as the module docstring says (idempotent)."""
    if tf_log_level() < 1 or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def _dropped(line: bytes, level: int) -> bool:
    if line.startswith(_ABSL_NOTICE):
        return True
    match = _ABSL_LINE.match(line)
    return bool(match) and "IWEF".index(match.group(1).decode()) < level


@contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Run the block with fd 2 through a pipe that drops absl lines below ``level``."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not _dropped(line, level):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="tf-import-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees the end and stops
        thread.join(timeout=10)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):  # get_resource_reader, is_package...
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with filtered_stderr(tf_log_level()):
            self.loader.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once (through the other finders) and wraps its loader."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec
