"""`EventFile`: one TensorBoard event file, written by a background thread that never stalls training.

Rules: `add` only serializes and queues; it never blocks on the disk and never raises for
I/O. The thread appends each record as soon as it is queued and fsyncs every `flush_secs`
and on `flush()`, so a killed process loses only what was queued in its last moments, and
nothing added before a `flush()`. A failed write (disk full, file-size limit) is cut back to
the last whole record, so the file stays readable; its events are counted as lost, a
warning says so, and writing resumes by itself once the disk takes data again. Past
`max_pending` bytes waiting for a stuck disk, new events are dropped and counted, so memory
stays bounded. Open files are closed at interpreter exit and on SIGTERM.
`check_event_file` checks, record by record, the framing that `_record` writes.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import struct
import threading
import time
import warnings
import weakref
from types import FrameType
from typing import Any

import crc32c

__all__ = ["EventFile", "check_event_file"]

_OPEN: weakref.WeakSet[EventFile] = weakref.WeakSet()


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    header = struct.pack("<Q", len(data))
    return header + _masked_crc(header) + data + _masked_crc(data)


def check_event_file(path: str) -> str | None:
    """What is wrong with an event file, or None: each TFRecord's length and data must
    match their masked CRC32C, and the first record must be an Event with a file version.
    TensorBoard's reader stops at the first bad record; this says where and why. Only a
    regular file is read, and a record's claimed length is checked against the file's size
    before it is read (`normlog._eventreader`, which `normlog report` reads with)."""
    from normlog._eventreader import check

    return check(path)


class EventFile:
    """Append-only `events.out.tfevents.*` file in `logdir`. The first record (the file
    version, and with `purge_step` TensorBoard's restart marker) is written before the
    constructor returns, so an unwritable directory fails here, not during training."""

    def __init__(
        self,
        logdir: str,
        *,
        filename_suffix: str = "",
        flush_secs: float = 10.0,
        purge_step: int | None = None,
        max_pending: int = 64 << 20,
    ) -> None:
        from tensorboardX.proto import event_pb2

        self._event_pb2: Any = event_pb2
        # tensorboardX names files by second and host, so two writers made in the same second
        # in one directory truncate each other (tensorboardX #776), and TensorBoard, which
        # reads a directory's files in name order, could read a restart before the run it
        # restarts. The nanoseconds, pid and a random token fix both.
        now = time.time_ns()
        unique = f"{now % 10**9:09d}.{os.getpid()}.{secrets.token_hex(3)}"
        name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{unique}{filename_suffix}"
        self.path = os.path.join(logdir, name)
        self._flush_secs = float(flush_secs)
        self._max_pending = max_pending
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._size = 0  # bytes of whole records on disk
        self._cond = threading.Condition()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_asked = self._flush_done = 0
        self._closing = self._closed = self._finished = self._behind = False
        self._sync_on_close = True
        self._broken: BaseException | None = None  # what stopped the thread, if anything did
        self._in_flight = 0  # events the thread is writing now
        self.lost = 0  # events that never reached the file
        self._failing: OSError | None = None
        first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        records = [first]
        if purge_step is not None:  # as tensorboardX: TensorBoard drops this run's events from purge_step on
            first.step = purge_step
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            records.append(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))
        try:
            self._write_all(b"".join(_record(e.SerializeToString()) for e in records))
        except OSError:
            os.close(self._fd)
            raise
        self._thread = threading.Thread(target=self._run, name=f"normlog writer {name}", daemon=True)
        self._thread.start()
        _OPEN.add(self)
        _install_exit_handlers()

    # -- the caller's side ---------------------------------------------------------

    def add(self, event: Any) -> None:
        """Queue one `Event` proto, or its encoding as bytes; returns at once."""
        record = _record(event if isinstance(event, bytes) else event.SerializeToString())
        with self._cond:
            if self._closing:
                raise ValueError(f"normlog: event file {self.path!r} is closed")
            if self._broken is not None or self._pending_bytes + len(record) > self._max_pending:
                self.lost += 1
                if not self._behind and self._broken is None:  # a slow disk, not a failing one: once per episode
                    self._behind = True
                    _warn(f"normlog: {self.path!r}: writing is behind by {self._pending_bytes} bytes; events dropped")
                return
            self._pending.append(record)
            self._pending_bytes += len(record)
            self._cond.notify_all()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Write everything queued so far and fsync. False if the disk did not answer in
        `timeout` seconds (the events stay queued)."""
        with self._cond:
            if self._closed or not self._thread.is_alive():
                return not self._pending
            self._flush_asked += 1
            wanted = self._flush_asked
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._flush_done >= wanted or self._finished, timeout)

    def close(self, sync: bool = True) -> None:
        """Write out what is queued, fsync (unless `sync=False`), stop the thread and close
        the file. Calling it again does nothing."""
        with self._cond:  # an RLock, which wait_for releases: safe from a signal handler too
            if self._closing:
                return
            self._closing, self._sync_on_close = True, sync
            self._cond.notify_all()
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._cond.wait_for(lambda: self._finished, timeout=60.0)
            if self._finished or not self._thread.is_alive():  # a wedged disk keeps thread and file
                os.close(self._fd)
                self._closed = True
        _OPEN.discard(self)

    # -- the thread's side ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # a bug here must not leave add() queueing forever
            with self._cond:
                self._broken, self._finished = error, True
                self.lost += self._in_flight + len(self._pending)
                self._pending, self._pending_bytes = [], 0
                self._cond.notify_all()
            _warn(f"normlog: the writer of {self.path!r} stopped ({error!r}); later events are dropped")

    def _loop(self) -> None:
        last_sync = time.monotonic()
        unsynced = False
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._pending or self._closing or self._flush_asked > self._flush_done,
                    timeout=max(0.0, last_sync + self._flush_secs - time.monotonic()) if unsynced else None,
                )
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                asked, closing = self._flush_asked, self._closing
                self._behind = False
            if batch:
                self._in_flight = len(batch)
                unsynced |= self._write_batch(batch)
                self._in_flight = 0
            due = asked > self._flush_done or (closing and self._sync_on_close)
            if unsynced and (due or time.monotonic() >= last_sync + self._flush_secs):
                try:
                    os.fsync(self._fd)
                except OSError as error:
                    self._failed(error, 0)
                last_sync, unsynced = time.monotonic(), False
            with self._cond:
                self._flush_done = asked
                self._finished = closing and not self._pending
                self._cond.notify_all()
                if self._finished:
                    return

    def _write_batch(self, batch: list[bytes]) -> bool:
        try:
            self._write_all(b"".join(batch))
        except OSError as error:
            self._failed(error, len(batch))
            return False
        if self._failing is not None:
            _warn(f"normlog: {self.path!r}: writing works again; {self.lost} events were lost while it failed")
            self._failing = None
        return True

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            try:  # cut a half-written record off, so readers see every whole one
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(data)

    def _failed(self, error: OSError, events: int) -> None:
        self.lost += events
        if self._failing is None:
            _warn(
                f"normlog: cannot write to {self.path!r} ({error}); training goes on, logged events are dropped"
                " until the disk takes data again"
            )
        self._failing = error


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _close_all() -> None:
    # At exit and on SIGTERM the process ends, but the kernel keeps what was written: write
    # everything out, and do not wait for fsync, which a busy disk can hold up for seconds.
    for event_file in list(_OPEN):
        event_file.close(sync=False)


_installed = False


def _install_exit_handlers() -> None:
    """Close open files at interpreter exit, and on SIGTERM when nobody else handles it
    (the default action would kill the process before atexit runs)."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _close_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of SIGTERM, as without normlog
