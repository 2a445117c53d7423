import gzip
import struct

import numpy as np
import pytest

from pipelines.io.idx import IdxFormatError, encode_idx, parse_idx, read_idx, write_idx


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.arange(6, dtype=np.int16).reshape(3, 2) - 3,
        np.array([1 << 30, -5], dtype=np.int32),
        np.linspace(0, 1, 5, dtype=np.float32),
        np.linspace(-1, 1, 4, dtype=np.float64).reshape(2, 2),
    ],
)
def test_every_idx_type_round_trips(tmp_path, array):
    path = write_idx(tmp_path / "a.idx", array)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(encode_idx(array)))
    np.testing.assert_array_equal(read_idx(path), array)


def test_header_is_the_canonical_big_endian_layout():
    data = encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 28, 28)


def test_wrong_magic_names_the_file():
    with pytest.raises(IdxFormatError, match=r"f.idx: bad magic number 0x01000801"):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8, name="f.idx")


def test_unsupported_type_code_is_reported():
    with pytest.raises(IdxFormatError, match="unsupported IDX type code 0x0A"):
        parse_idx(b"\x00\x00\x0a\x01\x00\x00\x00\x01\x00", name="f")


def test_truncated_data_and_header_are_reported():
    good = encode_idx(np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"data truncated: shape \(3, 4\) of uint8 needs 12 bytes, found 11"):
        parse_idx(good[:-1], name="f")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        parse_idx(good + b"\x00", name="f")
    with pytest.raises(IdxFormatError, match="truncated header"):
        parse_idx(good[:6], name="f")
    with pytest.raises(IdxFormatError, match="too short"):
        parse_idx(b"\x00", name="f")


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(encode_idx(np.zeros(100, np.uint8)))[:30])
    with pytest.raises(IdxFormatError, match="x.gz: corrupt gzip"):
        read_idx(path)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    write_idx(tmp_path / "a", np.zeros(3, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    with pytest.raises(ValueError, match="no IDX type code for dtype"):
        write_idx(tmp_path / "b", np.zeros(3, np.uint64))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
