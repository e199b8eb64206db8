"""`Writer`: SummaryWriter's methods, with values binned by normlog's core.

Rules: the user-facing methods only. Values become numpy through `_convert`, every
statistic comes from `_core`, the bytes from `_proto` (normlog's own encoder; tensorboardX
is used only for tag cleaning, image layout and text, loaded without torch and never by
`import normlog`) and the file from `_eventfile`. Each error names the tag. One Writer owns
one event file, whose name no other Writer can take, and `flush()` means on disk. Once made,
a Writer raises only for bad input: lost events are counted and warned about. Tags are
names, never paths (`_run_directory`). `add_record` is the one entry the adapters and the
health rules write through.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from normlog import _step
from normlog._convert import to_numpy
from normlog._core import Bins, Histogram, Stats, histogram, l2_norm, summarize
from normlog._eventfile import EventFile
from normlog._proto import clean_tag, encode_event, encode_histogram_rows, encode_summary, png, tensorboardx
from normlog._rows import HistogramRows

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Writer"]

_T = TypeVar("_T")

# Every Writer, for a fork()ed child to give each a lock of its own.
_WRITERS: weakref.WeakSet[Writer] = weakref.WeakSet()


def _named(tag: str, convert: Callable[[], _T]) -> _T:
    """Run `convert`, re-raising bad-input errors with the tag in front."""
    try:
        return convert()
    except (TypeError, ValueError) as error:
        raise type(error)(f"normlog: tag {tag!r}: {error}") from error


def _check_key(main_tag: str, key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(
            f"normlog: tag {main_tag!r}: the keys of add_scalars name runs and must be strings, "
            f"got {key!r} ({type(key).__name__})"
        )
    return key


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


def _step_number(tag: str, step: Any) -> int:
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


def _run_directory(logdir: str, *names: str) -> str:
    """The run directory add_scalars writes `names` (its main tag, then a key) to: inside
    `logdir` whatever they hold. '/' nests runs, as in SummaryWriter; empty parts are
    skipped, '.' and '..' become '_' and '__', and a backslash or NUL becomes '_', so that
    an absolute path or '..' names a run instead of escaping the logdir."""
    unsafe = ["\\", "\x00", *([":"] if os.name == "nt" else [])]  # ':' would name a Windows drive
    parts: list[str] = []
    for name in names:
        for character in unsafe:
            name = name.replace(character, "_")
        own = ["_" * len(part) if part in (".", "..") else part for part in name.split("/") if part]
        parts.extend(own or ["_"])
    return os.path.join(logdir, *parts)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _image_hwc(image: np.ndarray, dataformats: str) -> np.ndarray:
    if not isinstance(dataformats, str) or not dataformats or set(dataformats.upper()) - set("NCHW"):
        raise ValueError(f"dataformats must be letters of 'NCHW', got {dataformats!r}")
    if len(set(dataformats.upper())) != len(dataformats) or image.ndim != len(dataformats):
        raise ValueError(f"image of shape {image.shape} does not match dataformats {dataformats!r}")
    if "C" in dataformats.upper() and image.shape[dataformats.upper().index("C")] not in (1, 3, 4):
        raise ValueError(f"image of shape {image.shape} must have 1, 3 or 4 channels ({dataformats!r})")
    if image.dtype.kind not in "biuf" or image.size == 0:
        raise TypeError(f"image must be a non-empty real array, got dtype {image.dtype} and shape {image.shape}")
    hwc = tensorboardx().utils.convert_to_HWC(image, dataformats.upper())
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
    and a failing disk warns and drops events instead of raising (see `lost_events`). A
    Writer dropped without `close()` is written out and closed. In a fork()ed child the
    Writer it inherited goes on working: the child's events go to event files of its own
    (the child's pid in their names) in the same directories.
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
        tensorboardx()
        if logdir is None:
            stamp = datetime.now().strftime("%b%d_%H-%M-%S")
            logdir = os.path.join("runs", f"{stamp}_{socket.gethostname()}{comment}")
        self.logdir: str = os.fspath(logdir)
        if not (isinstance(flush_secs, (int, float)) and flush_secs > 0):
            raise ValueError(f"normlog: flush_secs must be a positive number of seconds, got {flush_secs!r}")
        self._suffix = filename_suffix
        self._flush_secs = float(flush_secs)
        # reentrant: a SIGTERM handler of the user's may close() or add_* while the thread it
        # interrupted is inside add_*
        self._lock = threading.RLock()
        self._closed = False
        self._file = self._open_file(
            self.logdir, None if purge_step is None else _step_number("purge_step", purge_step)
        )
        self._scalar_files: dict[str, EventFile] = {}  # add_scalars' runs, by directory
        self._lost_runs = 0  # add_scalars events whose run could not be made
        self._runs_failing: int | None = None  # _lost_runs when runs began to fail
        _WRITERS.add(self)

    def _open_file(self, logdir: str, purge_step: int | None = None) -> EventFile:
        try:
            os.makedirs(logdir, exist_ok=True)
            return EventFile(logdir, filename_suffix=self._suffix, flush_secs=self._flush_secs, purge_step=purge_step)
        except OSError as error:
            raise OSError(f"normlog: cannot write event files in log directory {logdir!r}: {error}") from error

    @property
    def lost_events(self) -> int:
        """Events that could not be written (a full disk, say), across this Writer's files."""
        return self._file.lost + sum(f.lost for f in self._scalar_files.values()) + self._lost_runs

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
        as in SummaryWriter ('/' in either nests runs; nothing in them leads outside the
        logdir). A run that cannot be made (a full disk) is tried again at its next event;
        meanwhile its events are counted in `lost_events`, with one warning."""
        main_tag = _check_tag(main_tag)
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(
                f"normlog: tag {main_tag!r}: expected a dict of scalars, got {type(tag_scalar_dict).__name__}"
            )
        scalars = {
            _check_key(main_tag, key): _named(f"{main_tag}/{key}", functools.partial(_to_float, v))
            for key, v in tag_scalar_dict.items()
        }
        number, seconds = _step_number(main_tag, step), _walltime(main_tag, walltime)
        messages: list[str] = []
        with self._lock:
            self._open(main_tag)
            for key, value in scalars.items():
                event_file = self._scalar_file(_run_directory(self.logdir, main_tag, key), messages)
                if event_file is None:
                    self._lost_runs += 1
                else:
                    event_file.add(encode_event(seconds, number, encode_summary([(main_tag, value)], [])), main_tag)
        for message in messages:  # outside the lock: a warning hook may log
            _warn(message)

    def _scalar_file(self, run: str, messages: list[str]) -> EventFile | None:
        """add_scalars' file for `run`, made at its first event, or None while it cannot be."""
        event_file = self._scalar_files.get(run)
        if event_file is not None:
            return event_file
        try:
            event_file = self._open_file(run)
        except (OSError, RuntimeError) as error:  # RuntimeError: no thread to be had
            if self._runs_failing is None:  # once per episode
                self._runs_failing = self._lost_runs
                cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
                messages.append(
                    f"normlog: add_scalars cannot make its run {run!r} ({cause}); training goes on, its events are"
                    " dropped (see lost_events) until it can"
                )
            return None
        if self._runs_failing is not None:
            lost, self._runs_failing = self._lost_runs - self._runs_failing, None
            messages.append(f"normlog: add_scalars can make its runs again; {lost} events were lost while it could not")
        self._scalar_files[run] = event_file
        return event_file

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
            [(_step.stat_tag(tag, name), value) for name, value in fields]
            + [(_step.nonfinite_tag(tag), stats.nonfinite)],
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
        nonfinite = [(_step.nonfinite_tag(tag), float(hist.nonfinite))] if hist.nonfinite else []
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
        summary_pb2 = tensorboardx().proto.summary_pb2
        encoded = summary_pb2.Summary.Image(
            height=hwc.shape[0], width=hwc.shape[1], colorspace=hwc.shape[2], encoded_image_string=png(hwc)
        )
        self._emit(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=clean_tag(tag), image=encoded)]),
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
        self._emit(tensorboardx().summary.text(tag, text), tag, step, walltime)

    def add_custom_scalars(self, layout: Mapping[str, Mapping[str, Any]], step: int | None = None) -> None:
        """The Custom Scalars dashboard's layout, as SummaryWriter's: `{category: {chart:
        ["Multiline", [tag regexes]]}}`. TensorBoard shows the layout written last."""
        self._emit(tensorboardx().summary.custom_scalars(layout), "custom_scalars", step, None)

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

    def _open(self, tag: str = "") -> None:
        if self._closed:
            raise ValueError(
                f"normlog: tag {tag!r}: cannot add to a closed Writer ({self.logdir!r}); make a new Writer, "
                "or add before close()"
            )

    def add_record(
        self,
        step: int,
        scalars: Iterable[tuple[str, float]] = (),
        rows: HistogramRows | None = None,
        walltime: float | None = None,
    ) -> None:
        """Write a logged step's scalars and histogram rows as one event: the entry through
        which the adapters and the health rules write (tags made by `normlog._step`).

        One queue entry and one record for a whole logged step, not one per tag, encoded
        straight from the rows (`_proto.encode_histogram_rows`) without Histogram objects.
        """
        self._summary(scalars, step, walltime, rows=rows)

    def _summary(
        self,
        scalars: Iterable[tuple[str, float]],
        step: Any,
        walltime: float | None,
        histograms: Iterable[tuple[str, Histogram]] = (),
        name: str | None = None,
        rows: HistogramRows | None = None,
    ) -> None:
        """Scalars, histograms and rows as one event (see `_proto`); `name` is the tag that
        errors name."""
        scalars, histograms = list(scalars), list(histograms)
        if name is None:
            name = scalars[0][0] if scalars else histograms[0][0] if histograms else rows.tags[0] if rows else ""
        summary = encode_summary(scalars, histograms)
        if rows is not None:
            summary += b"".join(encode_histogram_rows(rows))
        self._add(encode_event(_walltime(name, walltime), _step_number(name, step), summary), name)

    def _emit(self, summary: Any, tag: str, step: Any, walltime: Any) -> None:
        """Write a Summary proto (an image's, a text's) as one event."""
        self._add(encode_event(_walltime(tag, walltime), _step_number(tag, step), summary.SerializeToString()), tag)

    def _add(self, event: bytes, name: str) -> None:
        with self._lock:
            self._open(name)
            self._file.add(event, name)


def _after_fork_in_child() -> None:
    # A lock another thread held at the fork stays held in the child, which lacks that thread.
    for writer in list(_WRITERS):
        writer._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
