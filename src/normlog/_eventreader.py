"""Reading event files back for `normlog report`: records, Events, and scalar series as TensorBoard shows them.

Rules: never trusts a file, and never blocks on one. Only regular files are read (a FIFO or
a device named like an event file is named, not opened for reading); a record's claimed
length is checked against what is left of the file before anything is read, so memory stays
within the file's size; every checksum is the compiled CRC32C. A file is read up to its
first bad record, as TensorBoard's reader does, and what was wrong is said. Imports neither
TensorBoard nor a framework (the Event proto is tensorboardX's).
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c

from normlog._proto import tensorboardx

__all__ = ["RunScalars", "check", "event_file_names", "events", "is_event_file_name", "read_scalars", "records"]

_HEADER = struct.Struct("<QI")  # TFRecord: data length, masked CRC32C of those 8 bytes
_CRC = struct.Struct("<I")  # ... then the data and its masked CRC32C
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_SESSION_START = 1  # SessionLog.START: TensorBoard drops every later step logged before it
_TENSOR_DTYPES = {  # TensorFlow DataType -> numpy type of `tensor_content` (types.proto)
    1: "<f4",
    2: "<f8",
    3: "<i4",
    4: "u1",
    5: "<i2",
    6: "i1",
    9: "<i8",
    10: "?",
    17: "<u2",
    19: "<f2",
    22: "<u4",
    23: "<u8",
}
_BFLOAT16 = 14
_HALF = 19


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (tensorflow/core/lib/hash/crc32c.h `Mask`), as `_eventfile` writes it."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def is_event_file_name(name: str) -> bool:
    """TensorBoard's rule (`io_wrapper.IsSummaryEventsFile`): "tfevents" in the name, and not
    a profiler's empty placeholder."""
    return "tfevents" in name and not name.endswith(".profile-empty")


def event_file_names(directory: str) -> list[str]:
    """A run directory's event files, in the order TensorBoard reads them (sorted by name).
    A subdirectory is a run of its own, whatever its name; any other entry is listed, so that
    a FIFO or a device is named rather than passed over."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if is_event_file_name(e.name) and not e.is_dir(follow_symlinks=False))


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def records(path: str, problems: list[str]) -> Iterator[bytes]:
    """The data of each whole record of the file at `path`, up to the first bad one; what
    stopped the reading early (or made it impossible) is appended to `problems`.

    The file's size is taken when it is opened: a record claiming more than what is left is a
    cut-off record, whatever its header says, and nothing beyond it is allocated.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | _NONBLOCK)
    except OSError as error:
        problems.append(f"cannot be read ({error.strerror})")
        return
    with open(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"is {_kind_of(info.st_mode)}, not a regular file; it was not read")
            return
        size, offset, count = info.st_size, 0, 0
        try:
            while offset < size:
                cut_off = f"ends in a cut-off record after {count} whole records (byte {offset}"
                header = file.read(12) if size - offset >= 12 else b""
                if len(header) < 12:
                    problems.append(f"{cut_off})")
                    return
                length, length_crc = _HEADER.unpack(header)
                if length_crc != masked_crc32c(header[:8]):
                    if count == 0:
                        problems.append("is not a TensorBoard event file (its first record is not a TFRecord)")
                    else:
                        problems.append(
                            f"has a corrupt record (length CRC mismatch) after {count} whole records (byte {offset})"
                        )
                    return
                left = size - offset - 12
                if length + 4 > left:
                    problems.append(f"{cut_off}: it claims {length:,} bytes, {left:,} are left)")
                    return
                body = file.read(length + 4)
                if len(body) < length + 4:  # the file shrank while it was read
                    problems.append(f"{cut_off})")
                    return
                data = body[:length]
                if _CRC.unpack_from(body, length)[0] != masked_crc32c(data):
                    problems.append(
                        f"has a corrupt record (data CRC mismatch) after {count} whole records (byte {offset})"
                    )
                    return
                yield data
                offset, count = offset + 12 + length + 4, count + 1
        except OSError as error:
            problems.append(f"cannot be read past byte {offset} ({error.strerror})")
            return
    if count == 0:
        problems.append("is empty (a writer that has not written yet?)")


def events(path: str, problems: list[str]) -> Iterator[Any]:
    """The Events (tensorboardX's `event_pb2.Event`) of the file at `path`, read by `records`.

    The first record must be an Event with a file version, or the file is named as not an
    event file and not read. A later record that is not an Event is skipped and counted (its
    framing is whole, so the records after it still are); TensorBoard's own reader would
    stop the whole run there.
    """
    event_type = tensorboardx().proto.event_pb2.Event
    skipped, first_skipped = 0, 0
    for index, data in enumerate(records(path, problems)):
        event = event_type()
        try:
            event.ParseFromString(data)
        except Exception:  # protobuf's DecodeError, whose module differs between backends
            event = None
        if index == 0 and (event is None or not event.file_version):
            problems.append("is not a TensorBoard event file (its first record is not a file-version Event)")
            return
        if event is None:
            skipped, first_skipped = skipped + 1, first_skipped or index
            continue
        yield event
    if skipped:
        problems.append(f"has {skipped} records that are not Events (the first is record {first_skipped}); skipped")


def check(path: str) -> str | None:
    """What is wrong with the event file at `path` (see `events`), or None."""
    problems: list[str] = []
    for _ in events(path, problems):
        pass
    return "; ".join(problems) or None


def tensor_scalar(tensor: Any, plugin: str) -> tuple[float | None, str]:
    """The number a TF2 tensor summary (`tf.summary.scalar`) holds, or None and why not."""
    if plugin not in ("", "scalars"):
        return None, f"holds tensor summaries of TensorBoard's {plugin!r} plugin, not scalars"
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    if math.prod(shape) != 1:
        return None, f"holds tensors of shape {shape}, not single numbers"
    dtype = tensor.dtype
    if tensor.tensor_content:
        import numpy as np

        if dtype == _BFLOAT16:  # not a numpy type: the high half of a float32
            content, numpy_type = b"\0\0" + bytes(tensor.tensor_content[:2]), "<f4"
        elif dtype in _TENSOR_DTYPES:
            content, numpy_type = tensor.tensor_content, _TENSOR_DTYPES[dtype]
        else:
            return None, f"holds tensors of TensorFlow dtype {dtype}, not numbers"
        if len(content) != np.dtype(numpy_type).itemsize:
            return None, "holds a tensor whose content does not match its shape"
        return float(np.frombuffer(content, numpy_type)[0]), ""
    if dtype == _HALF and tensor.half_val:
        import numpy as np

        return float(np.array(tensor.half_val[:1], dtype=np.uint16).view(np.float16)[0]), ""
    if dtype == _BFLOAT16 and tensor.half_val:
        return struct.unpack("<f", struct.pack("<I", (tensor.half_val[0] & 0xFFFF) << 16))[0], ""
    for values in (tensor.float_val, tensor.double_val, tensor.int_val, tensor.int64_val, tensor.bool_val):
        if values and dtype in _TENSOR_DTYPES:
            return float(values[0]), ""
    return None, f"holds tensors of TensorFlow dtype {dtype} with no number in them"


class _Series:
    """One tag's (step, value) points in the order read; purging keeps steps below a step."""

    __slots__ = ("ordered", "steps", "values")

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []
        self.ordered = True  # steps never decreased: a purge only pops from the end

    def add(self, step: int, value: float) -> None:
        if self.steps and step < self.steps[-1]:
            self.ordered = False
        self.steps.append(step)
        self.values.append(value)

    def purge_from(self, step: int) -> None:
        if self.ordered:
            while self.steps and self.steps[-1] >= step:
                self.steps.pop()
                self.values.pop()
        else:
            kept = [(s, v) for s, v in zip(self.steps, self.values) if s < step]
            self.steps, self.values = [s for s, _ in kept], [v for _, v in kept]


@dataclass
class RunScalars:
    """A run directory's scalars as TensorBoard shows them, and what kept some from being read.

    `series` maps a tag to its (step, value) points in the order written, after TensorBoard's
    purges; `problems` are (file name, what is wrong), the name "" for the directory itself;
    `unreadable` maps a kept tag whose tensor summaries are not single numbers to why.
    """

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


def _file_version(text: str) -> float:
    """TensorBoard's `event_util.ParseFileVersion`: "brain.Event:2" -> 2.0, else -1."""
    try:
        return float(text.split("brain.Event:")[-1])
    except ValueError:
        return -1.0


def read_scalars(directory: str, keep: Callable[[str], bool]) -> RunScalars:
    """The scalar series of the tags for which `keep(tag)` is true (asked once per tag), from
    every event file directly in `directory`, the way TensorBoard's EventAccumulator reads a
    run: files in name order, simple values and `tf.summary.scalar`'s tensors, and its purges
    (file version 2 and later: a SessionLog START at step s drops every step >= s logged
    before it; older files: a step going back drops that tag's later steps).
    """
    result = RunScalars()
    series: dict[str, _Series] = {}
    kept: dict[str, bool] = {}
    plugins: dict[str, str] = {}  # the first metadata of a tag names its plugin, as in TensorBoard
    file_version: float | None = None
    most_recent_step = -1
    try:
        names = event_file_names(directory)
    except OSError as error:
        result.problems.append(("", f"cannot be listed ({error.strerror})"))
        return result
    for name in names:
        problems: list[str] = []
        for event in events(os.path.join(directory, name), problems):
            if event.file_version:
                file_version = _file_version(event.file_version)
            has_summary = event.HasField("summary")
            if file_version is not None and file_version >= 2:
                if event.HasField("session_log") and event.session_log.status == _SESSION_START:
                    for earlier in series.values():
                        earlier.purge_from(event.step)
            elif has_summary and event.step < most_recent_step:
                for value in event.summary.value:
                    if value.tag in series:
                        series[value.tag].purge_from(event.step)
            else:
                most_recent_step = event.step
            if not has_summary:
                continue
            for value in event.summary.value:
                tag = value.tag
                if tag not in plugins and value.HasField("metadata"):
                    plugins[tag] = value.metadata.plugin_data.plugin_name
                wanted = kept.get(tag)
                if wanted is None:
                    wanted = kept[tag] = keep(tag)
                if not wanted:
                    continue
                which = value.WhichOneof("value")
                if which == "simple_value":
                    number = float(value.simple_value)
                elif which == "tensor":
                    tensor_number, why = tensor_scalar(value.tensor, plugins.get(tag, ""))
                    if tensor_number is None:
                        result.unreadable.setdefault(tag, why)
                        continue
                    number = tensor_number
                else:
                    continue
                tag_series = series.get(tag)
                if tag_series is None:
                    tag_series = series[tag] = _Series()
                tag_series.add(event.step, number)
        result.problems += [(name, problem) for problem in problems]
    result.series = {tag: list(zip(kept_series.steps, kept_series.values)) for tag, kept_series in series.items()}
    return result
