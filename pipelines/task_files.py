"""File writes from inside Spark tasks, through fsspec (any filesystem fsspec knows).

Spark writes DataFrames with its commit protocol; files a task writes itself (one PNG per image)
need their own guarantee. :func:`write_atomic` writes into a hidden temporary sibling and renames
it into place, so a reader never sees a partial file; writers of deterministic content then get
exactly-once files under task retries and speculation (a second attempt replaces a file with the
same bytes). :func:`remove_temp_files` clears the temporaries of attempts that were killed.
"""

from __future__ import annotations

import uuid
from typing import Any

TEMP_MARK = ".tmp-"

#: Hadoop scheme -> fsspec protocol, where they differ.
_SCHEMES = {"s3a": "s3", "s3n": "s3"}


def open_fs(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``uri`` and the path in it (``file:/x`` and ``/x`` are local)."""
    import fsspec

    scheme, sep, rest = uri.partition("://")
    if sep and scheme in _SCHEMES:
        uri = f"{_SCHEMES[scheme]}://{rest}"
    return fsspec.core.url_to_fs(uri)


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling renamed into place."""
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}{TEMP_MARK}{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as out:
        out.write(data)
    try:
        fs.mv(tmp, path)
    except (FileExistsError, OSError):  # object stores / HDFS refuse to rename onto a file
        fs.rm(path)
        fs.mv(tmp, path)


def remove_temp_files(fs: Any, root: str) -> int:
    """Delete temporaries left under ``root`` by killed writers; returns how many."""
    leftovers = [p for p in fs.find(root) if TEMP_MARK in p.rpartition("/")[2]]
    for path in leftovers:
        fs.rm(path)
    return len(leftovers)
