"""Driver-side file operations on any path Spark can write (local, ``file://``, ``hdfs://``,
``s3a://``, ...), through Hadoop's FileSystem API: the same filesystem layer Spark writes with.

Used to publish job outputs atomically: a job writes into a temporary sibling folder, then
:meth:`Storage.publish_dir` swaps it into place, so a failed run never leaves a half-written
output under the final name and never destroys the previous good one.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark import TaskContext
from pyspark.sql import SparkSession

from pipelines.io.task_files import TEMP_MARK, temp_name

logger = logging.getLogger(__name__)

_OLD_MARK = "._old-"


class Storage:
    """File operations for the driver. Refuses to run inside a Spark task."""

    def __init__(self, spark: SparkSession):
        if TaskContext.get() is not None:
            raise RuntimeError("Storage is driver-only; it was created inside a Spark task")
        self._jvm = spark.sparkContext._jvm
        self._hconf = spark.sparkContext._jsc.hadoopConfiguration()
        self._sc = spark.sparkContext

    def _path(self, path: str):
        jpath = self._jvm.org.apache.hadoop.fs.Path(path)
        fs = jpath.getFileSystem(self._hconf)
        fs.setWriteChecksum(False)  # no ".name.crc" side files next to local outputs
        return fs, jpath

    def qualify(self, path: str) -> str:
        """The fully qualified URI of ``path`` (relative local paths become ``file:/...``)."""
        fs, jpath = self._path(path)
        return fs.makeQualified(jpath).toString()

    def exists(self, path: str) -> bool:
        fs, jpath = self._path(path)
        return bool(fs.exists(jpath))

    def is_dir(self, path: str) -> bool:
        fs, jpath = self._path(path)
        return bool(fs.exists(jpath) and fs.getFileStatus(jpath).isDirectory())

    def delete(self, path: str) -> bool:
        """Delete a file or folder (recursively); False when there was nothing."""
        fs, jpath = self._path(path)
        return bool(fs.delete(jpath, True))

    def stat(self, path: str) -> dict[str, object] | None:
        """``{"kind": "file"|"dir", "files", "bytes", "mtime"}`` of a path (None when absent).

        Two filesystem calls whatever the size of a folder (a content summary, not a listing).
        """
        fs, jpath = self._path(path)
        if not fs.exists(jpath):
            return None
        status = fs.getFileStatus(jpath)
        if status.isDirectory():
            summary = fs.getContentSummary(jpath)
            return {"kind": "dir", "files": int(summary.getFileCount()),
                    "bytes": int(summary.getLength()), "mtime": int(status.getModificationTime())}
        return {"kind": "file", "files": 1, "bytes": int(status.getLen()),
                "mtime": int(status.getModificationTime())}

    def mkdirs(self, path: str) -> None:
        fs, jpath = self._path(path)
        fs.mkdirs(jpath)

    def list(self, path: str) -> list[str]:
        """Names (not paths) of the entries of a folder, sorted."""
        fs, jpath = self._path(path)
        return sorted(status.getPath().getName() for status in fs.listStatus(jpath))

    def rename(self, src: str, dst: str) -> None:
        fs, jsrc = self._path(src)
        _, jdst = self._path(dst)
        if not fs.rename(jsrc, jdst):
            raise OSError(f"rename failed: {src} -> {dst}")

    def read_bytes(self, path: str) -> bytes:
        fs, jpath = self._path(path)
        stream = fs.open(jpath)
        try:
            # The byte[] must be filled on the JVM side and returned: py4j copies arrays by value.
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small file atomically: into a temporary sibling, then renamed into place."""
        fs, jpath = self._path(path)
        tmp = self._jvm.org.apache.hadoop.fs.Path(temp_name(jpath.toString(), uuid.uuid4().hex))
        fs.mkdirs(jpath.getParent())
        out = fs.create(tmp, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()
        if fs.exists(jpath):
            fs.delete(jpath, False)
        if not fs.rename(tmp, jpath):
            fs.delete(tmp, False)
            raise OSError(f"could not move {tmp} to {path}")

    def refuse_existing(self, path: str, section: str) -> None:
        """Raise when ``path`` exists: the ``mode: error`` of a stage that must not replace it.

        Raises:
            FileExistsError: names the setting and the path.
        """
        if self.exists(path):
            raise FileExistsError(
                f"{section}.output already exists and {section}.mode is 'error'. "
                f"Received: {section}.output={path!r}"
            )

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def create_new(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if nothing is there; False when something is.

        Exclusive on a local filesystem (``O_EXCL``) and on HDFS (a create without overwrite is
        one NameNode call); on object stores only as good as their conditional writes.
        """
        qualified = self.qualify(path)
        if qualified.startswith("file:"):
            local = "/" + qualified.removeprefix("file:").lstrip("/")
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return True
        fs, jpath = self._path(path)
        fs.mkdirs(jpath.getParent())
        try:
            out = fs.create(jpath, False)
        except Exception as exc:  # py4j wraps FileAlreadyExistsException
            if "AlreadyExists" in str(exc) or fs.exists(jpath):
                return False
            raise
        try:
            out.write(bytearray(data))
        finally:
            out.close()
        return True

    def touch(self, path: str) -> None:
        """Set the modification time of an existing ``path`` to now (a heartbeat)."""
        fs, jpath = self._path(path)
        fs.setTimes(jpath, int(time.time() * 1000), -1)

    def temp_sibling(self, path: str) -> str:
        """A fresh, unused path next to ``path`` for building a replacement of it."""
        return f"{path.rstrip('/')}{TEMP_MARK}{uuid.uuid4().hex[:12]}"

    def publish_dir(self, tmp: str, final: str) -> None:
        """Move a finished folder ``tmp`` to ``final``, replacing what was there.

        The old folder is moved aside first and deleted only once the new one is in place.
        """
        old = None
        if self.exists(final):
            old = f"{final.rstrip('/')}{_OLD_MARK}{uuid.uuid4().hex[:12]}"
            self.rename(final, old)
        try:
            self.rename(tmp, final)
        except Exception:
            if old is not None:
                self.rename(old, final)
            raise
        if old is not None:
            self.delete(old)
        logger.info("published %s", final)

    @contextmanager
    def staged_dir(self, final: str) -> Iterator[str]:
        """Yield a temporary folder to write into; publish it as ``final`` on success.

        On an exception the temporary folder is removed and ``final`` is left untouched.
        Leftovers of earlier crashed runs (``<final>._tmp-*``) are removed first.
        """
        self.remove_leftovers(final)
        tmp = self.temp_sibling(final)
        try:
            yield tmp
        except BaseException:
            # When one task fails, Spark kills the job's other tasks asynchronously: wait until
            # they have stopped, or one could write into the folder after it was removed.
            self.wait_for_running_tasks()
            self.delete(tmp)
            raise
        self.publish_dir(tmp, final)

    def wait_for_running_tasks(self, timeout_s: float = 60.0) -> bool:
        """Wait until no executor runs a task (True), or ``timeout_s`` passed (False)."""
        tracker = self._sc._jsc.sc().statusTracker()
        deadline = time.monotonic() + timeout_s
        while True:
            infos = tracker.getExecutorInfos()
            if all(info.numRunningTasks() == 0 for info in infos):
                return True
            if time.monotonic() > deadline:
                logger.warning("tasks still running %.0f s after the failure", timeout_s)
                return False
            time.sleep(0.2)

    def remove_leftovers(self, final: str) -> None:
        """Delete ``<final>._tmp-*`` and ``<final>._old-*`` left by runs that were killed."""
        fs, jpath = self._path(final.rstrip("/"))
        parent = jpath.getParent()
        if parent is None or not fs.exists(parent):
            return
        prefix = jpath.getName()
        for status in fs.listStatus(parent):
            name = status.getPath().getName()
            if name.startswith(prefix + TEMP_MARK) or name.startswith(prefix + _OLD_MARK):
                logger.info("removing leftover of an interrupted run: %s", status.getPath())
                fs.delete(status.getPath(), True)
