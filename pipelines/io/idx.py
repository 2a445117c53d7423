"""Reading and writing IDX files (the format of MNIST and its kin), with numpy.

An IDX file is two zero bytes, a type code, the number of dimensions, each dimension as a
big-endian uint32, then the data in row-major order, big-endian. Files may be gzip-compressed;
the reader recognises gzip by its magic bytes, whatever the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from pipelines.io.task_files import write_local_atomic

#: IDX type code -> numpy dtype (big-endian, as stored).
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_DTYPE = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """An IDX file is malformed; the message names the file and what was found."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a numpy array of its declared shape.

    Raises:
        IdxFormatError: bad magic, unsupported type code, or truncated/oversized data.
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxFormatError(f"{path}: corrupt gzip data: {exc}") from None
    return parse_idx(raw, name=str(path))


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (uncompressed). The array is native-endian and owns no copy for uint8."""
    if len(buf) < 4:
        raise IdxFormatError(f"{name}: file too short for an IDX header ({len(buf)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", buf[:4])
    if zero != 0:
        raise IdxFormatError(
            f"{name}: bad magic number 0x{buf[:4].hex()}; an IDX file starts with two zero bytes"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IdxFormatError(f"{name}: unsupported IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IdxFormatError(
            f"{name}: truncated header: {ndim} dimensions need {header} bytes, got {len(buf)}"
        )
    shape = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(buf) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{name}: data {kind}: shape {tuple(shape)} of {dtype.name} needs {expected} bytes, "
            f"found {actual}"
        )
    array = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a numpy array as IDX bytes."""
    array = np.asarray(array)
    code = _CODE_BY_DTYPE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"no IDX type code for dtype {array.dtype}; expected one of "
            f"{sorted(str(d) for d in _CODE_BY_DTYPE)}"
        )
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX arrays need 1 to 255 dimensions. Received: shape={array.shape}")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an uncompressed IDX file, atomically (temp file + rename)."""
    path = Path(path)
    write_local_atomic(os.fspath(path), encode_idx(array))
    return path
