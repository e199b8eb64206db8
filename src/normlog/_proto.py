"""The bytes of TensorBoard's Event, Summary and HistogramProto messages, encoded by hand,
and PNG images for image summaries.

Rules: numpy and the standard library; tensorboardX only for tag cleaning, images' HWC
conversion and text summaries, loaded without torch. Nothing here writes files. Histograms
are encoded straight from rows (`normlog._rows`), byte for byte what a Histogram gives,
because protobuf objects cost ~2 us per scalar and ~13 us per histogram and the adapters
write hundreds per step. TensorBoard's reader reads the bytes back in every test.
"""

from __future__ import annotations

import functools
import struct
import sys
import zlib
from typing import TYPE_CHECKING

import numpy as np

from normlog import _rows
from normlog._core import Histogram

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "clean_tag",
    "encode_event",
    "encode_histogram_rows",
    "encode_summary",
    "png",
    "proto_buckets",
    "tensorboardx",
]


@functools.lru_cache(maxsize=1)
def tensorboardx() -> ModuleType:
    # tensorboardX's writer.py runs `import torch` at import time, only to widen one type
    # check. Hide torch while it loads, so that logging numpy data never imports torch.
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX
        import tensorboardX.proto.event_pb2
        import tensorboardX.proto.summary_pb2
        import tensorboardX.summary
    finally:
        if hidden:
            del sys.modules["torch"]
    return tensorboardX  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=4096)
def clean_tag(tag: str) -> str:
    # The same cleaning tensorboardX applies in add_scalar, cached: adapters reuse tags.
    return str(tensorboardx().summary._clean_tag(tag))


def png(image: np.ndarray) -> bytes:
    """Encode an HxWxC uint8 image (C = 3 or 4) as PNG with the standard library."""
    height, width, channels = image.shape
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if channels == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def proto_buckets(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """Bucket limits and counts for HistogramProto, without the empty buckets at either end
    (as tensorboardX writes them). TensorBoard draws bucket i from limit i-1 (`min` for the
    first) to limit i (`max` for the last), so no edge is lost."""
    filled = np.flatnonzero(hist.counts)
    if not filled.size:
        return np.zeros(1), np.zeros(1)
    first, last = int(filled[0]), int(filled[-1])
    return hist.bucket_limits[first : last + 1], hist.counts[first : last + 1]


# -- the protobuf wire format of Event, Summary and HistogramProto (tensorboard's .proto files):
# a field is a key byte, (field number << 3) | wire type, then its value: 8 bytes for a
# double (type 1), 4 for a float (type 5), a varint (type 0), or a varint length and the
# bytes (type 2, for strings, messages and packed repeated doubles).


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if 0 <= value < 16384:  # the length of most histograms' fields
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    value &= 0xFFFFFFFFFFFFFFFF  # a negative int64 as its two's complement, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(128)]


def _field(key: int, payload: bytes) -> bytes:
    return _ONE_BYTE[key] + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=65536)
def _tag_field(tag: str) -> bytes:
    return _field(0x0A, clean_tag(tag).encode())  # Summary.Value.tag = 1


def encode_summary(scalars: list[tuple[str, float]], histograms: list[tuple[str, Histogram]]) -> bytes:
    """A Summary with one Value (field 1) per scalar and histogram."""
    with np.errstate(over="ignore"):  # past float32's range: inf, as protobuf's float field stores it
        packed = np.array([float(value) for _, value in scalars], dtype=np.float64).astype("<f4").tobytes()
    parts = [
        _field(0x0A, _tag_field(tag) + b"\x15" + packed[4 * i : 4 * i + 4])  # simple_value = 2, a float
        for i, (tag, _) in enumerate(scalars)
    ]
    for tag, hist in histograms:
        limits, counts = proto_buckets(hist)
        header = _HEADER.pack(0x09, hist.min, 0x11, hist.max, 0x19, hist.num, 0x21, hist.sum, 0x29, hist.sum_squares)
        parts.append(_histogram_value(tag, header, limits.astype("<f8").tobytes(), counts.astype("<f8").tobytes()))
    return b"".join(parts)


# HistogramProto's first fields: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5 (doubles)
_DOUBLE = 8  # bytes
_HEADER = struct.Struct("<BdBdBdBdBd")
_HEADERS = np.dtype([(f"{name}{i}", "u1" if name == "key" else "<f8") for i in range(5) for name in ("key", "value")])


def _histogram_value(tag: str, header: bytes, limits: bytes, counts: bytes) -> bytes:
    """A Summary.Value holding a HistogramProto (histo = 5): its header, then bucket_limit
    = 6 and bucket = 7, each packed doubles (as many limits as counts)."""
    length = _varint(len(limits))
    histo = b"".join((header, b"\x32", length, limits, b"\x3a", length, counts))
    value = b"".join((_tag_field(tag), b"\x2a", _varint(len(histo)), histo))
    return b"\x0a" + _varint(len(value)) + value


def encode_histogram_rows(histogram_rows: _rows.HistogramRows) -> list[bytes]:
    """The Summary.Value of each row's histogram, byte for byte what `encode_summary`
    writes for the row's Histogram (`_rows.histograms`). The ordinary rows' headers, limits and
    counts are packed all at once, and each only sliced; the rest (constant, empty, past
    the doubles' limits) go through a Histogram."""
    tags, bins = histogram_rows.tags, histogram_rows.bins
    rows = np.asarray(histogram_rows.rows, dtype=np.float64)
    ordinary, edges = _rows.ordinary_edges(rows, bins)
    counts = rows[ordinary, _rows.COUNTS]
    filled = counts > 0
    first = filled.argmax(axis=1).tolist()
    stop = (bins - filled[:, ::-1].argmax(axis=1)).tolist()  # past the last filled bucket
    headers = np.empty(len(edges), dtype=_HEADERS)
    columns = (_rows.MIN, _rows.MAX, _rows.FINITE, _rows.SUM, _rows.SUM_SQUARES)  # the header's order
    for i, column in enumerate(columns):
        headers[f"key{i}"] = 0x09 + 8 * i
        headers[f"value{i}"] = rows[ordinary, column]
    header_bytes = headers.tobytes()
    limit_bytes = np.ascontiguousarray(edges[:, 1:], dtype="<f8").tobytes()
    count_bytes = np.ascontiguousarray(counts, dtype="<f8").tobytes()
    size = _HEADERS.itemsize
    values = []
    k = 0  # the ordinary row's index
    for tag, row, regular in zip(tags, rows, ordinary.tolist(), strict=True):
        if not regular:
            values.append(encode_summary([], [(tag, _rows.histograms(row[None], bins)[0])]))
            continue
        lo, hi = _DOUBLE * (k * bins + first[k]), _DOUBLE * (k * bins + stop[k])
        values.append(
            _histogram_value(tag, header_bytes[k * size : (k + 1) * size], limit_bytes[lo:hi], count_bytes[lo:hi])
        )
        k += 1
    return values


def encode_event(walltime: float, step: int, summary: bytes) -> bytes:
    """An Event: wall_time = 1 (double), step = 2 (varint), summary = 5."""
    return struct.pack("<Bd", 0x09, walltime) + b"\x10" + _varint(step) + _field(0x2A, summary)
