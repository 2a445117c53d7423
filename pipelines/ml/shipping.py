"""Getting a model or weights file from where the user names it to every Python worker.

One way for every stage (featurizer and predictor weights, ``KerasImageClassifier`` models, SQL
UDF models) and for both kinds of session, classic and Spark Connect: nothing here touches
``SparkContext`` (``addFile``, ``SparkFiles``, the JVM), which a Connect client does not have.
:func:`ship_file` runs on the driver (or the Connect client) and returns a :class:`ModelFile`,
a plain picklable value that travels inside the UDF's closure; on the worker
:meth:`ModelFile.local_path` gives a local file Keras can open.

How the bytes travel:

* A file of at most :data:`INLINE_LIMIT` bytes (32 MiB) travels *with the function*: the driver
  reads it (local path, or any URI fsspec reads: ``hdfs://``, ``s3a://``, ``gs://``, ...; or
  ``http(s)://``) and the bytes go inside the pickled UDF. Spark broadcasts large pickled
  functions on a classic session; a Connect client sends them in the query plan, which the
  server accepts up to ``spark.connect.grpc.maxInboundMessageSize`` (128 MiB by default).
  Each worker writes them once to a file named after their SHA-256 in its temp folder.
* A larger file is *read by the workers* from where it is: a URI (the workers need the same
  fsspec backend as the driver: ``s3fs`` for ``s3a://``, ``pyarrow`` with libhdfs for
  ``hdfs://``), or a local path when the master is ``local[...]`` (driver and workers share the
  machine). A larger driver-local file with a cluster master is refused with a message saying
  to put it on storage the workers read.

The identity of a file (its :attr:`ModelFile.digest`) is its content's SHA-256 when the driver
reads it, else the URI with its size and modification stamp: a file replaced in place is a new
model for every cache keyed on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlparse

from pyspark.sql import SparkSession

from pipelines.io.task_files import temp_name, write_local_atomic

logger = logging.getLogger(__name__)

#: Largest file (bytes) that travels inside the pickled function instead of being read by the
#: workers from its path or URI.
INLINE_LIMIT = 32 * 2**20
#: Where workers keep the files they materialise (one per content digest).
CACHE_DIR = os.path.join(tempfile.gettempdir(), "pipelines-models")
#: Local files already shipped, by (path, (size, mtime), master): read and hashed once.
_SHIPPED: OrderedDict[tuple, ModelFile] = OrderedDict()
_SHIPPED_CAPACITY = 8
_HTTP = ("http", "https")


@dataclass(frozen=True)
class ModelFile:
    """A model or weights file as the workers get it (see the module docstring).

    Attributes:
        name: what the user gave (path or URI), for messages.
        digest: hex identity of the content (see the module docstring).
        uri: what workers read when :attr:`data` is None: a local path or a URI.
        data: the file's bytes when they travel with the function.
    """

    name: str
    digest: str
    uri: str = ""
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def basename(self) -> str:
        return os.path.basename(urlparse(self.name).path.rstrip("/")) or "model"

    def local_path(self) -> str:
        """A local file with this content, on whatever machine runs this (worker or driver).

        Bytes that travelled with the function, or a remote file, are written once per machine
        to :data:`CACHE_DIR` under the digest (atomically: concurrent workers never see a
        partial file); a local path is used in place.

        Raises:
            ValueError: a local path does not exist on this machine.
        """
        if self.data is None and _is_local(self.uri):
            path = _local(self.uri)
            if not os.path.isfile(path):
                raise ValueError(
                    f"model file {self.name!r} does not exist on this worker "
                    f"(a local path is only usable where the driver's files are). "
                    f"Received: {path!r}"
                )
            return path
        target = os.path.join(CACHE_DIR, f"{self.digest[:24]}-{self.basename}")
        if os.path.isfile(target):
            return target
        if self.data is not None:
            write_local_atomic(target, self.data)
        else:  # streamed to a temporary sibling, renamed when complete
            os.makedirs(CACHE_DIR, exist_ok=True)
            tmp = temp_name(target, str(os.getpid()))
            try:
                _download(self.uri, tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        logger.info("materialised %s as %s", self.name, target)
        return target


def ship_file(spark: SparkSession, path: str, param: str, owner: str) -> ModelFile:
    """Check ``path`` on the driver and decide how its bytes reach the workers.

    A file already shipped and unchanged since (same size and modification time) is not read
    or hashed again: later ``transform`` calls of a stage cost nothing here.

    Args:
        spark: the session (classic or Connect); only its ``spark.master`` conf is read.
        path: local path, ``file://`` path, fsspec URI or ``http(s)://`` URL.
        param, owner: the Param and the stage or function it belongs to, for messages.

    Raises:
        ValueError: empty or missing file, an unreadable URI scheme, or a file over
            :data:`INLINE_LIMIT` on the driver's disk with a cluster master; names the value.
    """
    if not path:
        raise ValueError(f"{param} for {owner} must name a file. Received: {param}=''")
    master = spark.conf.get("spark.master", "") or ""
    stamp = _local_stamp(path)
    if stamp is not None and (path, stamp, master) in _SHIPPED:
        _SHIPPED.move_to_end((path, stamp, master))
        return _SHIPPED[(path, stamp, master)]
    shipped = _ship_file(path, master, param, owner)
    if stamp is not None:
        _SHIPPED[(path, stamp, master)] = shipped
        while len(_SHIPPED) > _SHIPPED_CAPACITY:
            _SHIPPED.popitem(last=False)
    return shipped


def _local_stamp(path: str) -> tuple[int, int] | None:
    """(size, modification time) of a local file; None for a URI or a missing file."""
    if not _is_local(path):
        return None
    try:
        stat = os.stat(os.path.expanduser(_local(path)))
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _ship_file(path: str, master: str, param: str, owner: str) -> ModelFile:
    if _is_local(path):
        local = os.path.abspath(os.path.expanduser(_local(path)))
        if not os.path.isfile(local):
            raise ValueError(
                f"{param} file for {owner} not found on the driver. Received: {param}={path!r}"
            )
        size = os.path.getsize(local)
        if size <= INLINE_LIMIT:
            with open(local, "rb") as fh:
                data = fh.read()
            return ModelFile(path, hashlib.sha256(data).hexdigest(), data=data)
        if not master.startswith("local"):
            raise ValueError(
                f"{param} file for {owner} is {size / 2**20:.1f} MiB, over the "
                f"{INLINE_LIMIT / 2**20:.0f} MiB that can travel with the function, and the "
                f"master {master!r} runs workers on other machines: put it where every worker "
                f"can read it (hdfs://, s3a://, gs://, ... or http(s)://) and pass that URI. "
                f"Received: {param}={path!r}"
            )
        return ModelFile(path, _sha256_file(local), uri=local)
    size, stamp, data = _remote_info(path, param, owner)
    if data is not None:
        return ModelFile(path, hashlib.sha256(data).hexdigest(), data=data)
    identity = f"{path}\n{size}\n{stamp}".encode()
    return ModelFile(path, hashlib.sha256(identity).hexdigest(), uri=path)


def _is_local(path: str) -> bool:
    return urlparse(path).scheme in ("", "file")


def _local(path: str) -> str:
    return urlparse(path).path if path.startswith("file:") else path


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remote_info(path: str, param: str, owner: str) -> tuple[int, str, bytes | None]:
    """(size, modification stamp, bytes when at most :data:`INLINE_LIMIT`) of a remote file."""
    try:
        if urlparse(path).scheme in _HTTP:
            with urllib.request.urlopen(path, timeout=60) as response:  # noqa: S310
                data = response.read(INLINE_LIMIT + 1)
                stamp = response.headers.get("ETag") or response.headers.get("Last-Modified")
                size = int(response.headers.get("Content-Length") or len(data))
            return size, str(stamp), data if len(data) <= INLINE_LIMIT else None
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path)
        info = fs.info(fs_path)
        if info.get("type") != "file":
            raise FileNotFoundError(fs_path)
        size = int(info.get("size") or 0)
        stamp = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified",
                                              "last_modified", "updated", "md5Hash")
                      if info.get(k)), "")
        data = fs.cat_file(fs_path) if size <= INLINE_LIMIT else None
        return size, stamp, data
    except (ImportError, ValueError) as exc:  # no fsspec backend for the scheme
        raise ValueError(
            f"cannot read {param} for {owner}: {type(exc).__name__}: {exc} (install the fsspec "
            f"backend for this scheme on the driver and the workers). Received: {param}={path!r}"
        ) from exc
    except (OSError, urllib.error.URLError) as exc:  # FileNotFoundError, HTTP errors
        raise ValueError(
            f"{param} file for {owner} not found or unreadable: {type(exc).__name__}: {exc}. "
            f"Received: {param}={path!r}"
        ) from exc


def _download(uri: str, target: str) -> None:
    if urlparse(uri).scheme in _HTTP:
        with urllib.request.urlopen(uri, timeout=600) as response, open(target, "wb") as fh:  # noqa: S310
            for block in iter(lambda: response.read(2**20), b""):
                fh.write(block)
        return
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(uri)
    fs.get_file(fs_path, target)


def ship_weights(spark: SparkSession, weights: str, owner: str) -> ModelFile | None:
    """A ``weights`` Param: None for ``imagenet``/``none`` (no file), else :func:`ship_file`."""
    if weights in ("imagenet", "none"):
        return None
    if not weights:
        raise ValueError(
            f"weights for {owner} must be 'imagenet', 'none' or a path/URL. Received: weights=''"
        )
    return ship_file(spark, weights, "weights", owner)
