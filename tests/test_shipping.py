"""How model and weights files reach the workers: inline bytes, a path or URI, or a refusal.

The driver side only reads ``spark.master`` from the session's conf, so these tests give it a
small stand-in for the conf; fsspec's in-memory filesystem stands for a cluster URI.
"""

from __future__ import annotations

import fsspec
import pytest

from pipelines.ml import shipping
from pipelines.ml.shipping import ModelFile, ship_file


class Session:
    """What :func:`ship_file` reads of a SparkSession: ``conf.get("spark.master")``."""

    def __init__(self, master: str):
        self.conf = self
        self.master = master

    def get(self, key, default=None):
        return self.master if key == "spark.master" else default


@pytest.fixture
def small_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(shipping, "INLINE_LIMIT", 16)
    monkeypatch.setattr(shipping, "CACHE_DIR", str(tmp_path / "cache"))
    shipping._SHIPPED.clear()
    yield
    shipping._SHIPPED.clear()


def test_a_small_file_travels_as_bytes_and_is_written_once_by_content(tmp_path, small_limit):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"0123456789")
    shipped = ship_file(Session("spark://cluster:7077"), str(path), "weights", "InceptionV3")
    assert shipped.data == b"0123456789" and not shipped.uri
    local = shipped.local_path()
    assert local.endswith("-model.weights.h5") and local.startswith(str(tmp_path / "cache"))
    assert open(local, "rb").read() == b"0123456789"
    assert ship_file(Session("spark://cluster:7077"), str(path), "weights", "x") is shipped

    path.write_bytes(b"another version")  # same path, new content: a new identity
    assert ship_file(Session("local[2]"), str(path), "weights", "x").digest != shipped.digest


def test_a_large_local_file_is_used_in_place_locally_and_refused_on_a_cluster(
    tmp_path, small_limit
):
    path = tmp_path / "big.h5"
    path.write_bytes(b"x" * 100)
    shipped = ship_file(Session("local[*]"), str(path), "weights", "InceptionV3")
    assert shipped.data is None and shipped.local_path() == str(path)
    with pytest.raises(ValueError, match=r"over the 0 MiB.*'spark://cluster:7077'.*"
                                         r"Received: weights='.*big.h5'"):
        ship_file(Session("spark://cluster:7077"), str(path), "weights", "InceptionV3")


def test_a_uri_is_read_inline_when_small_and_by_the_workers_when_large(small_limit):
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/small.keras", b"tiny")
    fs.pipe("/models/large.keras", b"y" * 64)
    small = ship_file(Session("spark://c:7077"), "memory://models/small.keras", "modelPath", "s")
    assert small.data == b"tiny"
    large = ship_file(Session("spark://c:7077"), "memory://models/large.keras", "modelPath", "s")
    assert large.data is None and large.uri == "memory://models/large.keras"
    assert open(large.local_path(), "rb").read() == b"y" * 64  # what a worker does


def test_missing_files_and_unknown_schemes_are_clear_errors(tmp_path, small_limit):
    with pytest.raises(ValueError, match="not found on the driver. Received: weights="):
        ship_file(Session("local[2]"), str(tmp_path / "none.h5"), "weights", "VGG16")
    with pytest.raises(ValueError, match="not found or unreadable.*Received: modelPath="):
        ship_file(Session("local[2]"), "memory://nowhere/x.keras", "modelPath", "s")
    with pytest.raises(ValueError, match="Received: modelPath='nosuch://a/b.keras'"):
        ship_file(Session("local[2]"), "nosuch://a/b.keras", "modelPath", "s")
    with pytest.raises(ValueError, match="Received: modelPath=''"):
        ship_file(Session("local[2]"), "", "modelPath", "s")
    gone = ModelFile("gone.h5", "0" * 64, uri=str(tmp_path / "gone.h5"))
    with pytest.raises(ValueError, match="does not exist on this worker"):
        gone.local_path()
