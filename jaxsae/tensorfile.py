"""Reading and writing safetensors files with numpy, bfloat16 included, memory-mapped on read.

The format: an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data.
The `safetensors` package's numpy API has no bfloat16, which activation caches often use.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxsae.errors import DataError, naming

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header and the byte offset where the data starts."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{file}: truncated safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DataError(f"{file}: corrupt safetensors header (length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise DataError(f"{file}: corrupt safetensors header (not an object)")
    return header, 8 + n


def tensor_layout(file: Path, header: Mapping[str, Any], name: str,
                  data_start: int) -> tuple[int, tuple[int, ...], np.dtype]:
    """(absolute offset, shape, dtype) of tensor `name`, its header entry checked: a shape of
    non-negative integers, and `data_offsets` [begin, end] of exactly that many bytes from
    the start of the data. (Whether `end` lies within the file is the caller's check: a shard
    names the rows that are there.)"""
    if name not in header:
        raise DataError(f"{file}: no tensor named {name!r}")
    info = header[name]
    # (fault testing: a shape "256x16", null or missing, or data_offsets "0", gave tracebacks;
    # a shape 16.5 was read as 16; [-16, -64] gave numpy's "negative dimensions")
    if not isinstance(info, dict):
        raise DataError(f"{file}: tensor {name!r}: malformed header entry {_shown(info)} "
                        "(expected an object of dtype, shape and data_offsets)")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:  # (["F32"]: a
        # TypeError, unhashable; a review)
        raise DataError(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    dtype = DTYPES[info["dtype"]]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        raise DataError(f"{file}: tensor {name!r}: shape {_shown(shape)} is not a list of "
                        "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise DataError(f"{file}: tensor {name!r}: data_offsets {_shown(offsets)} is not a "
                        "list of two integers [begin, end]")
    begin, end = offsets
    # (fault testing: a negative begin read the JSON header as the tensor's values)
    if begin < 0:
        raise DataError(f"{file}: tensor {name!r}: data_offsets {offsets} lie outside the "
                        "file's data")
    if end < begin:
        raise DataError(f"{file}: tensor {name!r}: data_offsets {offsets} end before they "
                        "begin")
    if end - begin != math.prod(shape) * dtype.itemsize:  # (math.prod: no int64 overflow)
        raise DataError(f"{file}: tensor {name!r}: data_offsets do not match shape {shape}")
    return data_start + begin, tuple(shape), dtype


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A header value as the JSON spells it (null, "256x16"), shortened for one line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read(file: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a file, memory-mapped (read-only)."""
    file = Path(file)
    header, start = read_header(file)
    size = file.stat().st_size
    out, spans = {}, []
    for name in header:
        if name == "__metadata__":
            continue
        offset, shape, dtype = tensor_layout(file, header, name, start)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > size:
            raise DataError(f"{file}: truncated (tensor {name!r} runs past the end of the file)")
        if nbytes:
            spans.append((offset, offset + nbytes, name))
        out[name] = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
    # (two tensors over the same bytes: a damaged or hand-edited header, which the format
    # forbids and the safetensors package refuses)
    spans.sort()
    for (_, first_end, first), (second_begin, _, second) in itertools.pairwise(spans):
        if second_begin < first_end:
            raise DataError(f"{file}: tensors {first!r} and {second!r} overlap (their "
                            "data_offsets share bytes)")
    return out


def write(path: str | Path, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays as a safetensors file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.require(np.asarray(array), requirements="C")  # keeps 0-d shapes
        if array.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} is not supported by the writer")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the format recommends
    # Write beside the target and rename: a reader that memory-mapped the old file keeps it.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path), open(tmp, "wb") as f:  # (a full disk: name the file)
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for array in arrays:
                f.write(array.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
