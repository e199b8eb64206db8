"""`Writer`: TensorBoard event files through tensorboardX, with values binned by normlog's core.

Rules: tensorboardX is imported when the first Writer is made, never by `import normlog`,
and without pulling torch in with it. Values become numpy through `_convert`, and every
statistic comes from `_core`. Each error names the tag. One Writer owns one event file,
whose name no other Writer can take, and `flush()` means on disk.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from normlog._convert import to_numpy
from normlog._core import Bins, Histogram, Stats, _histogram_from_row, _ordinary_edges, histogram, l2_norm, summarize
from normlog._eventfile import EventFile

if TYPE_CHECKING:
    from types import ModuleType, TracebackType

__all__ = ["Writer"]

_T = TypeVar("_T")


@functools.lru_cache(maxsize=1)
def _tensorboardx() -> ModuleType:
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
def _clean_tag(tag: str) -> str:
    # The same cleaning tensorboardX applies in add_scalar, cached: adapters reuse tags.
    return str(_tensorboardx().summary._clean_tag(tag))


def _named(tag: str, convert: Callable[[], _T]) -> _T:
    """Run `convert`, re-raising bad-input errors with the tag in front."""
    try:
        return convert()
    except (TypeError, ValueError) as error:
        raise type(error)(f"normlog: tag {tag!r}: {error}") from error


def _check_tag(tag: Any) -> str:
    if not isinstance(tag, str):
        raise TypeError(f"normlog: tag must be a string, got {tag!r} ({type(tag).__name__})")
    return tag


def _to_float(value: Any) -> float:
    array = to_numpy(value)
    if array.size != 1:
        raise ValueError(f"a scalar must hold one value, got shape {array.shape}")
    if array.dtype.kind not in "biuf" and not array.dtype.type.__module__.startswith("ml_dtypes"):
        raise TypeError(f"a scalar must be a real number, got {value!r}")
    return float(array.reshape(()).astype(np.float64))


def _step(tag: str, step: Any) -> int:
    """An Event's int64 step: an integer (or a whole float, as SummaryWriter takes); None is 0."""
    if step is None:
        return 0
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise TypeError(f"normlog: tag {tag!r}: step must be an integer, got {step!r}")
    value = int(step.__index__())
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"normlog: tag {tag!r}: step {value} does not fit TensorBoard's int64 steps")
    return value


def _walltime(tag: str, walltime: Any) -> float:
    if walltime is None:
        return time.time()
    value = _named(tag, lambda: _to_float(walltime))
    if not np.isfinite(value):
        raise ValueError(f"normlog: tag {tag!r}: walltime must be finite, got {walltime!r}")
    return value


def _png(image: np.ndarray) -> bytes:
    """Encode an HxWxC uint8 image (C = 3 or 4) as PNG with the standard library."""
    height, width, channels = image.shape
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if channels == 4 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def _image_hwc(image: np.ndarray, dataformats: str) -> np.ndarray:
    if not isinstance(dataformats, str) or not dataformats or set(dataformats.upper()) - set("NCHW"):
        raise ValueError(f"dataformats must be letters of 'NCHW', got {dataformats!r}")
    if len(set(dataformats.upper())) != len(dataformats) or image.ndim != len(dataformats):
        raise ValueError(f"image of shape {image.shape} does not match dataformats {dataformats!r}")
    if "C" in dataformats.upper() and image.shape[dataformats.upper().index("C")] not in (1, 3, 4):
        raise ValueError(f"image of shape {image.shape} must have 1, 3 or 4 channels ({dataformats!r})")
    if image.dtype.kind not in "biuf" or image.size == 0:
        raise TypeError(f"image must be a non-empty real array, got dtype {image.dtype} and shape {image.shape}")
    hwc = _tensorboardx().utils.convert_to_HWC(image, dataformats.upper())
    if hwc.dtype != np.uint8:  # floats are in [0, 1], as in tensorboardX and tf.summary.image
        hwc = np.nan_to_num(hwc.astype(np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(hwc)


class Writer:
    """Write scalars, norms, stats, histograms, images and text to TensorBoard event files.

    The method names and arguments follow tensorboardX's (and torch's) SummaryWriter:
    `add_scalar(tag, value, step)`, `add_histogram(tag, values, step, bins=...)`, and so on.
    `values` may be numpy arrays, Python numbers or lists, torch tensors (any device and
    float dtype) or TensorFlow tensors and variables. NaN and ±Inf are data: a histogram
    counts them and writes the count as the scalar `<tag>/nonfinite`.

    With `logdir=None` the run goes to `runs/<date>_<host><comment>`, as in SummaryWriter.
    Events reach the file from a background thread as soon as they are added, and are
    fsynced every `flush_secs` seconds and on `flush()`; nothing here waits for the disk,
    and a failing disk warns and drops events instead of raising (see `lost_events`).
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        *,
        comment: str = "",
        purge_step: int | None = None,
        flush_secs: float = 10,
        filename_suffix: str = "",
    ) -> None:
        _tensorboardx()
        if logdir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            logdir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        self.logdir: str = os.fspath(logdir)
        if not (isinstance(flush_secs, (int, float)) and flush_secs > 0):
            raise ValueError(f"normlog: flush_secs must be a positive number of seconds, got {flush_secs!r}")
        self._suffix = filename_suffix
        self._flush_secs = float(flush_secs)
        self._lock = threading.Lock()
        self._closed = False
        self._file = self._open_file(self.logdir, None if purge_step is None else _step("purge_step", purge_step))
        self._scalar_files: dict[str, EventFile] = {}  # add_scalars' runs, by directory

    def _open_file(self, logdir: str, purge_step: int | None = None) -> EventFile:
        try:
            os.makedirs(logdir, exist_ok=True)
            return EventFile(logdir, filename_suffix=self._suffix, flush_secs=self._flush_secs, purge_step=purge_step)
        except OSError as error:
            raise OSError(f"normlog: cannot write event files in log directory {logdir!r}: {error}") from error

    @property
    def lost_events(self) -> int:
        """Events that could not be written (a full disk, say), across this Writer's files."""
        return self._file.lost + sum(f.lost for f in self._scalar_files.values())

    # -- scalars -------------------------------------------------------------------

    def add_scalar(self, tag: str, value: Any, step: int | None = None, walltime: float | None = None) -> None:
        """One scalar. NaN and ±Inf are written as they are."""
        tag = _check_tag(tag)
        scalar = _named(tag, lambda: _to_float(value))
        self._summary([(tag, scalar)], step, walltime)

    def add_scalars(
        self, main_tag: str, tag_scalar_dict: Mapping[str, Any], step: int | None = None, walltime: float | None = None
    ) -> None:
        """Several scalars on one chart: each key becomes a run `<logdir>/<main_tag>/<key>`,
        as in SummaryWriter."""
        main_tag = _check_tag(main_tag)
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(
                f"normlog: tag {main_tag!r}: expected a dict of scalars, got {type(tag_scalar_dict).__name__}"
            )
        scalars = {
            _check_tag(key): _named(f"{main_tag}/{key}", functools.partial(_to_float, v))
            for key, v in tag_scalar_dict.items()
        }
        number, seconds = _step(main_tag, step), _walltime(main_tag, walltime)
        with self._lock:
            self._open()
            for key, value in scalars.items():
                run = os.path.join(self.logdir, main_tag, key)
                if run not in self._scalar_files:
                    self._scalar_files[run] = self._open_file(run)
                self._scalar_files[run].add(_encode_event(seconds, number, _encode_summary([(main_tag, value)], [])))

    def add_norm(self, tag: str, values: Any, step: int | None = None, walltime: float | None = None) -> float:
        """The L2 norm of `values` as a scalar; returns it."""
        tag = _check_tag(tag)
        norm = _named(tag, lambda: l2_norm(to_numpy(values)))
        self._summary([(tag, norm)], step, walltime)
        return norm

    def add_stats(self, tag: str, values: Any, step: int | None = None, walltime: float | None = None) -> Stats:
        """Scalars `<tag>/norm`, `/mean`, `/std`, `/min`, `/max` (of the finite values) and
        `/nonfinite` (the count of NaN and ±Inf); returns the Stats."""
        tag = _check_tag(tag)
        stats = _named(tag, lambda: summarize(to_numpy(values)))
        fields = ("norm", stats.norm), ("mean", stats.mean), ("std", stats.std), ("min", stats.min), ("max", stats.max)
        self._summary(
            [(f"{tag}/{name}", value) for name, value in fields] + [(f"{tag}/nonfinite", stats.nonfinite)],
            step,
            walltime,
            name=tag,
        )
        return stats

    # -- histograms ----------------------------------------------------------------

    def add_histogram(
        self, tag: str, values: Any, step: int | None = None, bins: Bins = 30, walltime: float | None = None
    ) -> Histogram:
        """A histogram binned once by `normlog.histogram` (30 equal-width buckets by default,
        as `tf.summary.histogram`); returns it. NaN and ±Inf are counted, not binned, and
        their count is written as the scalar `<tag>/nonfinite` when there are any.
        `values` may also be a `normlog.Histogram` computed before (say, merged from shards)."""
        tag = _check_tag(tag)
        hist = values if isinstance(values, Histogram) else _named(tag, lambda: histogram(to_numpy(values), bins))
        nonfinite = [(f"{tag}/nonfinite", float(hist.nonfinite))] if hist.nonfinite else []
        self._summary(nonfinite, step, walltime, histograms=[(tag, hist)], name=tag)
        return hist

    # -- images and text -----------------------------------------------------------

    def add_image(
        self, tag: str, image: Any, step: int | None = None, walltime: float | None = None, dataformats: str = "CHW"
    ) -> None:
        """An image: uint8 in [0, 255] or floats in [0, 1]; `dataformats` names the axes
        ("CHW", "HWC", "HW", or "NCHW" for a grid of images), as in SummaryWriter."""
        tag = _check_tag(tag)
        hwc = _named(tag, lambda: _image_hwc(to_numpy(image), dataformats))
        if hwc.shape[2] == 1:
            hwc = np.repeat(hwc, 3, axis=2)
        summary_pb2 = _tensorboardx().proto.summary_pb2
        encoded = summary_pb2.Summary.Image(
            height=hwc.shape[0], width=hwc.shape[1], colorspace=hwc.shape[2], encoded_image_string=_png(hwc)
        )
        self._emit(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=_clean_tag(tag), image=encoded)]),
            tag,
            step,
            walltime,
        )

    def add_figure(
        self, tag: str, figure: Any, step: int | None = None, close: bool = True, walltime: float | None = None
    ) -> None:
        """A matplotlib figure, rendered with the Agg backend; closed afterwards by default."""
        tag = _check_tag(tag)
        if not hasattr(figure, "savefig"):
            raise TypeError(f"normlog: tag {tag!r}: expected a matplotlib Figure, got {type(figure).__name__}")
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(figure)
        canvas.draw()  # type: ignore[no-untyped-call]
        rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[no-untyped-call]
        if close and "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(figure)
        self.add_image(tag, rgba, step, walltime, dataformats="HWC")

    def add_text(self, tag: str, text: str, step: int | None = None, walltime: float | None = None) -> None:
        """Markdown text, shown in TensorBoard's Text tab."""
        tag = _check_tag(tag)
        if not isinstance(text, str):
            raise TypeError(f"normlog: tag {tag!r}: text must be a string, got {type(text).__name__}")
        self._emit(_tensorboardx().summary.text(tag, text), tag, step, walltime)

    # -- life cycle ----------------------------------------------------------------

    def flush(self) -> None:
        """Make everything added so far durable on disk."""
        with self._lock:
            files = [] if self._closed else [self._file, *self._scalar_files.values()]
        for event_file in files:
            event_file.flush()

    def close(self) -> None:
        """Flush and close the event files. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for event_file in [self._file, *self._scalar_files.values()]:
            event_file.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"normlog.Writer({self.logdir!r}{', closed' if self._closed else ''})"

    # -- internals -------------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise ValueError(f"normlog: {self!r}: cannot add to a closed Writer")

    def _summary(
        self,
        scalars: Iterable[tuple[str, float]],
        step: Any,
        walltime: float | None,
        histograms: Iterable[tuple[str, Histogram]] = (),
        name: str | None = None,
        rows: tuple[Sequence[str], np.ndarray, int] | None = None,
    ) -> None:
        """Write scalars and histograms as one event: one queue entry and one record for a
        whole logged step, not one per tag (tensorboardX's queue holds 10 and then blocks).
        The event is encoded here, field by field, rather than built as protobuf objects:
        adapters write hundreds of values per step, and the objects cost ~2 us per scalar
        and ~13 us per histogram. TensorBoard's reader reads it back in every test.
        `rows` (tags, [tags, 8 + bins] rows as `_core._histogram_from_row` reads them,
        bins) are more histograms, encoded from the rows without Histogram objects."""
        scalars, histograms = list(scalars), list(histograms)
        if name is None:  # the tag that errors name
            name = scalars[0][0] if scalars else histograms[0][0] if histograms else rows[0][0] if rows else ""
        summary = _encode_summary(scalars, histograms)
        if rows is not None:
            summary += b"".join(_encode_histogram_rows(*rows))
        self._add(_encode_event(_walltime(name, walltime), _step(name, step), summary))

    def _emit(self, summary: Any, tag: str, step: Any, walltime: Any) -> None:
        """Write a Summary proto (an image's, a text's) as one event."""
        self._add(_encode_event(_walltime(tag, walltime), _step(tag, step), summary.SerializeToString()))

    def _add(self, event: bytes) -> None:
        with self._lock:
            self._open()
            self._file.add(event)


def _proto_buckets(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
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
    return _field(0x0A, _clean_tag(tag).encode())  # Summary.Value.tag = 1


def _encode_summary(scalars: list[tuple[str, float]], histograms: list[tuple[str, Histogram]]) -> bytes:
    """A Summary with one Value (field 1) per scalar and histogram."""
    with np.errstate(over="ignore"):  # past float32's range: inf, as protobuf's float field stores it
        packed = np.array([float(value) for _, value in scalars], dtype=np.float64).astype("<f4").tobytes()
    parts = [
        _field(0x0A, _tag_field(tag) + b"\x15" + packed[4 * i : 4 * i + 4])  # simple_value = 2, a float
        for i, (tag, _) in enumerate(scalars)
    ]
    for tag, hist in histograms:
        limits, counts = _proto_buckets(hist)
        header = _HEADER.pack(0x09, hist.min, 0x11, hist.max, 0x19, hist.num, 0x21, hist.sum, 0x29, hist.sum_squares)
        parts.append(_histogram_value(tag, header, limits.astype("<f8").tobytes(), counts.astype("<f8").tobytes()))
    return b"".join(parts)


# HistogramProto's first fields: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5 (doubles)
_HEADER = struct.Struct("<BdBdBdBdBd")
_HEADERS = np.dtype([(f"{name}{i}", "u1" if name == "key" else "<f8") for i in range(5) for name in ("key", "value")])


def _histogram_value(tag: str, header: bytes, limits: bytes, counts: bytes) -> bytes:
    """A Summary.Value holding a HistogramProto (histo = 5): its header, then bucket_limit
    = 6 and bucket = 7, each packed doubles (as many limits as counts)."""
    length = _varint(len(limits))
    histo = b"".join((header, b"\x32", length, limits, b"\x3a", length, counts))
    value = b"".join((_tag_field(tag), b"\x2a", _varint(len(histo)), histo))
    return b"\x0a" + _varint(len(value)) + value


def _encode_histogram_rows(tags: Sequence[str], rows: np.ndarray, bins: int) -> list[bytes]:
    """The Summary.Value of each row's histogram, byte for byte what `_encode_summary`
    writes for `_histogram_from_row(row, bins)`. The ordinary rows' headers, limits and
    counts are packed all at once, and each only sliced; the rest (constant, empty, past
    the doubles' limits) go through a Histogram."""
    rows = np.asarray(rows, dtype=np.float64)
    ordinary, edges = _ordinary_edges(rows, bins)
    counts = rows[ordinary, 8:]
    filled = counts > 0
    first = filled.argmax(axis=1).tolist()
    stop = (bins - filled[:, ::-1].argmax(axis=1)).tolist()  # past the last filled bucket
    headers = np.empty(len(edges), dtype=_HEADERS)
    for i, column in enumerate((0, 1, 4, 2, 3)):  # min, max, num, sum, sum_squares
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
            values.append(_encode_summary([], [(tag, _histogram_from_row(row, bins))]))
            continue
        lo, hi = 8 * (k * bins + first[k]), 8 * (k * bins + stop[k])
        values.append(
            _histogram_value(tag, header_bytes[k * size : (k + 1) * size], limit_bytes[lo:hi], count_bytes[lo:hi])
        )
        k += 1
    return values


def _encode_event(walltime: float, step: int, summary: bytes) -> bytes:
    """An Event: wall_time = 1 (double), step = 2 (varint), summary = 5."""
    return struct.pack("<Bd", 0x09, walltime) + b"\x10" + _varint(step) + _field(0x2A, summary)
