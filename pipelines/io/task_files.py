"""File writes from inside Spark tasks (fsspec, any filesystem it knows) and atomic local writes.

Spark writes DataFrames with its commit protocol; files a task writes itself (one PNG per image)
need their own guarantee. :meth:`FsspecFiles.write_atomic` writes into a hidden temporary
sibling (:func:`temp_name`) and renames it into place, so a reader never sees a partial file;
writers of deterministic content then get exactly-once files under task retries and speculation
(a second attempt replaces a file with the same bytes). :func:`remove_temp_files` clears the
temporaries of attempts that were killed.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

#: Marks every temporary name this project writes, files and staged folders alike (here, in
#: :class:`pipelines.io.storage.Storage`, and in what cleans up after killed writers).
TEMP_MARK = "._tmp-"

#: Hadoop scheme -> fsspec protocol, where they differ.
_SCHEMES = {"s3a": "s3", "s3n": "s3"}


def open_fs(uri: str, **storage_options: Any) -> tuple[Any, str]:
    """The fsspec filesystem of ``uri`` and the path in it (``file:/x`` and ``/x`` are local).

    Hadoop spellings such as ``s3a://`` are mapped to fsspec's; ``storage_options`` go to the
    filesystem (endpoint, credentials profile, ...).
    """
    import fsspec

    scheme, sep, rest = uri.partition("://")
    if sep and scheme in _SCHEMES:
        uri = f"{_SCHEMES[scheme]}://{rest}"
    return fsspec.core.url_to_fs(uri, **storage_options)


def temp_name(path: str, token: str) -> str:
    """The hidden temporary sibling of file ``path`` for the writer ``token``."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}{TEMP_MARK}{token}"


def is_temp_name(name: str) -> bool:
    """True for a file name that :func:`temp_name` made."""
    return name.startswith(".") and TEMP_MARK in name


def write_local_atomic(path: str, data: bytes) -> None:
    """Write a local file so that readers see either nothing or the whole file."""
    files = LocalFiles(None)
    files.makedirs(os.path.dirname(os.path.abspath(path)))
    files.write_atomic(os.fspath(path), data)


class FsspecFiles:
    """The file operations of a writing task, through any fsspec filesystem."""

    def __init__(self, fs: Any):
        self.fs = fs
        #: Marks this writer's temporary files apart from those of other task attempts.
        self.token = uuid.uuid4().hex

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def names(self, folder: str) -> list[str]:
        """The names of the files in ``folder``."""
        return [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as out:
            out.write(data)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` via a temporary sibling published with :meth:`publish`."""
        tmp = temp_name(path, self.token)
        try:
            self.write(tmp, data)
            self.publish(tmp, path)
        except BaseException:
            self.remove(tmp)
            raise

    def remove(self, path: str) -> None:
        """Delete a file if it is there."""
        if self.fs.exists(path):
            self.fs.rm(path)

    def publish(self, tmp: str, final: str) -> None:
        """Rename a finished temporary file onto its final name.

        Where rename does not replace (HDFS, object stores), the final file can only have come
        from another attempt writing the same bytes: keep it and drop ours.
        """
        try:
            self.fs.mv(tmp, final)
        except OSError:
            if not self.fs.exists(final):
                raise
            self.fs.rm(tmp)


class LocalFiles(FsspecFiles):
    """The same operations on a local filesystem with plain ``os`` calls.

    fsspec's per-file cost (path normalisation, file object wrappers) is as much as encoding a
    small PNG; ``os.replace`` is the same atomic rename, replacing the final name.
    """

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def names(self, folder: str) -> list[str]:
        return os.listdir(folder)

    def read(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, path: str, data: bytes) -> None:
        # os-level calls: a buffered Python file object costs more than writing a small PNG.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def publish(self, tmp: str, final: str) -> None:
        os.replace(tmp, final)


def local_files(fs: Any) -> FsspecFiles:
    """File operations for ``fs``: plain ``os`` calls when it is the local filesystem."""
    from fsspec.implementations.local import LocalFileSystem

    return LocalFiles(fs) if isinstance(fs, LocalFileSystem) else FsspecFiles(fs)


def find_files(fs: Any, root: str) -> dict[str, int]:
    """Every file under ``root`` -> its size in bytes (``fs.find``; ``os.walk`` when local,
    much faster on a folder of many small files)."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        return {path: info.get("size") or 0 for path, info in fs.find(root, detail=True).items()}
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = f"{folder}/{name}"
            found[path] = os.stat(path).st_size
    return found


def remove_temp_files(fs: Any, root: str) -> int:
    """Delete temporaries left under ``root`` by killed writers; returns how many."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):  # names only: no stat per file
        leftovers = [f"{folder}/{name}" for folder, _, names in os.walk(root)
                     for name in names if is_temp_name(name)]
    else:
        leftovers = [p for p in fs.find(root) if is_temp_name(p.rpartition("/")[2])]
    for path in leftovers:
        fs.rm(path)
    return len(leftovers)
