"""`EventFile`: one TensorBoard event file, written by a background thread that never stalls training.

Rules: `add` only queues; it never blocks on the disk and never raises for I/O. The thread
holds the file's `_Sink`, never the EventFile, so a dropped EventFile is closed by its
finalizer; it appends each record as soon as it is queued and fsyncs every `flush_secs` and
on `flush()`. A full disk costs counted events and two warnings (it fails; it works again).
A fork()ed child starts every file afresh. Exit and SIGTERM write out every open file,
taking no lock that the thread they interrupt, or a fork, could hold (see `_on_sigterm`).
`check_event_file` checks, record by record, the framing that `_record` writes.
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import crc32c

__all__ = ["EventFile", "check_event_file"]

# Schedulers send SIGKILL some time after SIGTERM (Slurm's KillWait and Kubernetes'
# terminationGracePeriodSeconds are 30 s by default): writing out must fit well inside.
_SIGTERM_GRACE = 10.0
_BATCH = 4 << 20  # bytes the thread joins into one write


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


def _header(purge_step: int | None) -> bytes:
    """A file's first records: the file version, and with `purge_step` TensorBoard's restart
    marker (as tensorboardX: TensorBoard drops the run's events from purge_step on)."""
    from tensorboardX.proto import event_pb2

    first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    events = [first]
    if purge_step is not None:
        first.step = purge_step
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        events.append(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))
    return b"".join(_record(event.SerializeToString()) for event in events)


class _Flush:
    """Queued behind the records a flush must see written; `done` is set once they are."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.done = threading.Event()


class _Close(_Flush):
    """Queued last: write out, (fsync,) close the descriptor, end the thread."""


_Item = bytes | _Flush


class _Sink:
    """One file's writing, shared by the callers and its thread, which holds nothing else.

    The callers serialize on `lock`, which the thread never takes: a caller stopped inside it
    (by a signal, or a fork) cannot stop the writing. Each counter has one writer side: the
    callers' under `lock`, the thread's without. The thread holds `write_lock` while it
    writes, so that SIGTERM can stop it between whole records.
    """

    def __init__(self, logdir: str, suffix: str, flush_secs: float, max_pending: int) -> None:
        self.logdir, self.suffix = logdir, suffix
        self.flush_secs, self.max_pending = flush_secs, max_pending
        self.path, self.fd, self.size = "", -1, 0  # size: bytes of whole records in the file
        self.closing = False
        self.fresh()

    def fresh(self) -> None:
        """The state a fork()ed child must not share with its parent."""
        self.lock = threading.RLock()  # reentrant: a user's SIGTERM handler may add or close
        self.write_lock = threading.Lock()
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()  # put() is safe in finalizers and signal handlers
        self.thread: threading.Thread | None = None
        self.queued_bytes = self.queued_events = self.dropped = 0  # the callers'
        self.behind = False
        self.oversized: set[str] = set()
        self.done_bytes = self.taken_events = self.failed = self.in_flight = 0  # the thread's
        self.failing: OSError | None = None
        self.failing_until = self.lost_before_failing = 0
        self.broken: BaseException | None = None

    @property
    def lost(self) -> int:
        stuck = self.queued_events - self.taken_events if self.broken is not None else 0
        return self.dropped + self.failed + stuck

    def open(self, header: bytes) -> None:
        """Create a file of a name no other writer can take, and write its first records."""
        # tensorboardX names files by second and host, so two writers made in the same second
        # in one directory truncate each other (tensorboardX #776), and TensorBoard, which
        # reads a directory's files in name order, could read a restart before the run it
        # restarts. The nanoseconds, pid and a random token fix both.
        now = time.time_ns()
        unique = f"{now % 10**9:09d}.{os.getpid()}.{secrets.token_hex(3)}"
        name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{unique}{self.suffix}"
        path = os.path.join(self.logdir, name)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.path, self.size = path, 0
        try:
            self.write_all(header)
        except OSError:
            os.close(self.fd)
            self.fd = -1
            try:  # an empty file would read as a broken run
                os.unlink(path)
            except OSError:
                pass
            raise

    def start(self) -> None:
        name = f"normlog writer {os.path.basename(self.path) or self.logdir}"
        self.thread = threading.Thread(target=self.serve, name=name, daemon=True)
        self.thread.start()
        _SINKS.add(self)
        _handle_exit()

    # -- the callers' side -------------------------------------------------------------

    def add(self, record: bytes, name: str) -> None:
        warning = ""
        with self.lock:
            if self.closing:
                raise ValueError(f"normlog: event file {self.path!r} is closed")
            pending = self.queued_bytes - self.done_bytes
            if self.behind and pending + len(record) <= self.max_pending // 2:
                self.behind = False  # the thread has caught up: the episode is over
            if len(record) > self.max_pending:
                self.dropped += 1
                if name not in self.oversized:
                    self.oversized.add(name)
                    warning = (
                        f"normlog: the event of tag {name!r} is {len(record):,} bytes, more than an event file"
                        f" queues ({self.max_pending:,} bytes); it is dropped (see lost_events)"
                    )
            elif self.broken is not None or not self.started():
                self.dropped += 1
            elif pending + len(record) > self.max_pending:
                self.dropped += 1
                if not self.behind:  # a slow disk: once per episode
                    self.behind = True
                    warning = f"normlog: {self.path!r}: writing is behind by {pending:,} bytes; events dropped"
            else:
                self.queued_bytes += len(record)
                self.queued_events += 1
                self.queue.put(record)
        if warning:
            _warn(warning)

    def started(self) -> bool:
        """Whether the thread runs; a fork()ed child starts it at its first event. A child
        that cannot start a thread (or anything else it needs) drops the event, with a
        warning, rather than raise into training."""
        if self.thread is None:
            try:
                self.start()
            except (OSError, RuntimeError) as error:
                self.broken = error
                _warn(f"normlog: cannot start writing {self.logdir!r} in this forked child ({error}); events dropped")
                return False
        return True

    def flush(self, timeout: float | None, sync: bool = True) -> bool:
        thread = self.thread
        if thread is None or not thread.is_alive():
            return self.queued_events == self.taken_events
        token = _Flush(sync)
        self.queue.put(token)
        return token.done.wait(timeout)

    def close(self, sync: bool, timeout: float | None) -> None:
        with self.lock:
            already, self.closing = self.closing, True
        self.release(sync, already)
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)  # a wedged disk keeps thread and file

    def release(self, sync: bool = True, already: bool | None = None) -> None:
        """Close without waiting and without a lock: a dropped EventFile's finalizer."""
        if not (self.closing if already is None else already):
            self.closing = True
            self.queue.put(_Close(sync))
        if self.thread is None:
            self.end()

    def forked(self) -> None:
        """In a fork()ed child: the parent's descriptor, queue and thread stay the parent's.
        The child's events go to a file of its own, opened by its first write."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd, self.size = -1, 0
        self.fresh()

    # -- the thread's side ---------------------------------------------------------------

    def serve(self) -> None:
        try:
            self.loop()
        except BaseException as error:  # a bug here must not leave add() queueing forever
            self.broken = error
            self.failed += self.in_flight
            _warn(f"normlog: the writer of {self.path!r} stopped ({error!r}); later events are dropped")
            self.end()

    def loop(self) -> None:
        last_sync, unsynced = time.monotonic(), False
        while True:
            timeout = max(0.0, last_sync + self.flush_secs - time.monotonic()) if unsynced else None
            records, tokens = self.take(timeout)
            if records:
                self.in_flight = len(records)
                unsynced |= self.write(records)
                self.done_bytes += sum(map(len, records))
                self.in_flight = 0
            due = any(token.sync for token in tokens) or time.monotonic() >= last_sync + self.flush_secs
            if unsynced and due:
                try:
                    os.fsync(self.fd)
                except OSError as error:
                    self.failed_write(error, 0, self.size + 1)
                last_sync, unsynced = time.monotonic(), False
            closing = any(isinstance(token, _Close) for token in tokens)
            if closing:
                self.end()
            for token in tokens:
                token.done.set()
            if closing:
                return

    def take(self, timeout: float | None) -> tuple[list[bytes], list[_Flush]]:
        """What is queued now (at least one item, unless `timeout` passes), up to a Close."""
        records: list[bytes] = []
        tokens: list[_Flush] = []
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return records, tokens
        size = 0
        while True:
            if isinstance(item, bytes):
                records.append(item)
                size += len(item)
            else:
                tokens.append(item)
                if isinstance(item, _Close):
                    break
            if size >= _BATCH:
                break
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
        self.taken_events += len(records)
        return records, tokens

    def write(self, records: list[bytes]) -> bool:
        data = b"".join(records)
        try:
            with self.write_lock:
                if self.fd < 0:  # a fork()ed child's first write
                    self.open(_header(None))
                self.write_all(data)
        except OSError as error:
            self.failed_write(error, len(records), self.size + len(data))
            return False
        if self.failing is not None and self.size >= self.failing_until:
            # The file has grown past the write that failed: the disk takes data again. (A
            # full disk still takes small records into its last block's slack; those do not
            # end the episode.)
            lost = self.lost - self.lost_before_failing
            _warn(f"normlog: {self.path!r}: writing works again; {lost} events were lost while it failed")
            self.failing = None
        return True

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            try:  # cut a half-written record off, so readers see every whole one
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(data)

    def failed_write(self, error: OSError, events: int, until: int) -> None:
        """`events` were lost to `error`; `until`: the size the file must reach to count as
        writable again."""
        self.failed += events
        if self.failing is None:
            self.lost_before_failing, self.failing_until = self.lost - events, until
            _warn(
                f"normlog: cannot write to {self.path!r} ({error}); training goes on, logged events are dropped"
                " until the disk takes data again"
            )
        self.failing = error
        self.failing_until = max(self.failing_until, until)

    def end(self) -> None:
        """Close the descriptor and answer whatever is still queued (a flush racing a close,
        events added after the thread broke)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _SINKS.discard(self)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, bytes):
                self.taken_events += 1
                self.failed += 1
            else:
                item.done.set()


# Open sinks, held here until their thread has written them out (a dropped EventFile's
# too), so that exit and SIGTERM write them.
_SINKS: set[_Sink] = set()
# Every sink, for a fork()ed child to make afresh.
_EVERY: weakref.WeakSet[_Sink] = weakref.WeakSet()


class EventFile:
    """Append-only `events.out.tfevents.*` file in `logdir`. The first record (the file
    version, and with `purge_step` TensorBoard's restart marker) is written before the
    constructor returns, so an unwritable directory fails here, not during training.

    Dropped without `close()`, it is written out and closed by its thread. In a fork()ed
    child, events added go to a new file of the child's own in the same directory (its name
    has the child's pid), written out when the child exits (a multiprocessing child too) or
    gets SIGTERM; the parent's queued events are left to the parent.
    """

    def __init__(
        self,
        logdir: str,
        *,
        filename_suffix: str = "",
        flush_secs: float = 10.0,
        purge_step: int | None = None,
        max_pending: int = 64 << 20,
    ) -> None:
        sink = _Sink(logdir, filename_suffix, float(flush_secs), max_pending)
        sink.open(_header(purge_step))
        _EVERY.add(sink)
        try:
            sink.start()
        except RuntimeError:  # no thread to be had
            sink.end()
            raise
        self._sink = sink
        self._finalizer = weakref.finalize(self, sink.release)

    @property
    def path(self) -> str:
        """The file's path (in a fork()ed child, the child's own file once it has written)."""
        return self._sink.path

    @property
    def lost(self) -> int:
        """Events that never reached the file."""
        return self._sink.lost

    def add(self, event: Any, name: str = "") -> None:
        """Queue one `Event` proto, or its encoding as bytes; returns at once. `name` (the
        tag) is what a warning about this event names."""
        if _sigterm == "pending":
            _want_sigterm()
        self._sink.add(_record(event if isinstance(event, bytes) else event.SerializeToString()), name)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Write everything queued so far and fsync. False if the disk did not answer in
        `timeout` seconds (the events stay queued)."""
        return self._sink.flush(timeout)

    def close(self, sync: bool = True) -> None:
        """Write out what is queued, fsync (unless `sync=False`), stop the thread and close
        the file. Calling it again does nothing."""
        self._finalizer.detach()
        self._sink.close(sync, timeout=60.0)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)


# -- exit and SIGTERM ------------------------------------------------------------------


def _close_all() -> None:
    """At exit: write every open file out. The process ends, but the kernel keeps what was
    written, so do not wait for fsync, which a busy disk can hold up for seconds."""
    sinks = list(_SINKS)
    for sink in sinks:
        sink.close(sync=False, timeout=0.0)
    deadline = time.monotonic() + 60.0
    for sink in sinks:
        if sink.thread is not None:
            sink.thread.join(max(0.0, deadline - time.monotonic()))


def _drain(deadline: float) -> None:
    """Every open file writes out what is queued now, without fsync, by `deadline`. Takes no
    lock but the fresh ones of its own tokens."""
    waits: list[Callable[[float], Any]] = []
    for sink in list(_SINKS):
        thread = sink.thread
        if thread is None or not thread.is_alive():
            continue
        if sink.closing:
            waits.append(thread.join)
        else:
            token = _Flush(sync=False)
            sink.queue.put(token)
            waits.append(token.done.wait)
    for wait in waits:
        wait(max(0.0, deadline - time.monotonic()))


_exit_registered = False
# "on": normlog's handler is installed in this process; "pending": wanted, but no file has
# started on the main thread yet; "declined": SIGTERM had a handler that is not normlog's.
_sigterm = "off"
_ready_pid = os.getpid()  # the process this module's state belongs to (not a child still being set up)
_explained = False
_wakeup: tuple[int, int] | None = None  # the pipe the C-level handler writes SIGTERM into
_set_default: Callable[[int, Any], Any] | None = None  # PyOS_setsig: signal.signal from any thread


def _handle_exit() -> None:
    """A file has started writing: write open files out at exit and on SIGTERM."""
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_close_all)
    if _sigterm in ("off", "pending"):
        _want_sigterm()


def _want_sigterm() -> None:
    """Install the SIGTERM handler, which Python allows only on the main thread: now, or at
    the next add_* there. Explain once if that has not happened yet."""
    global _sigterm, _explained
    if threading.current_thread() is threading.main_thread():
        _install_sigterm()
        return
    _sigterm = "pending"
    if not _explained:
        _explained = True
        _warn(
            f"normlog: a Writer was made on thread {threading.current_thread().name!r}, not the main thread, where"
            " Python lets SIGTERM handlers be set: until an add_* runs on the main thread, SIGTERM ends the process"
            " without writing out queued events (call flush() before it can come, or make the Writer on the main"
            " thread)"
        )


def _install_sigterm() -> None:
    global _sigterm, _wakeup, _set_default
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _on_sigterm):  # the user's own (or SIG_IGN) stays
        _sigterm = "declined"
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm = "on"
    # A Python-level handler runs only when the main thread next runs Python code, which a
    # long C call (a big matmul) holds off for as long as it lasts. The C-level handler
    # also writes the signal's number into the wakeup descriptor at once: a thread reading
    # it writes the files out and ends the process without waiting for the main thread.
    if _wakeup is None:  # (a fork()ed child keeps its parent's descriptor numbers, on a pipe of its own)
        try:
            read_end, write_end = os.pipe()
        except OSError:  # no descriptor left: the handler alone then
            return
        os.set_blocking(write_end, False)
        try:
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except (ValueError, OSError):
            previous = -2
        if previous != -1:  # the wakeup descriptor is someone else's (asyncio's): the handler alone then
            if previous >= 0:
                signal.set_wakeup_fd(previous)
            os.close(read_end)
            os.close(write_end)
            return
        _wakeup = read_end, write_end
    if _set_default is None:
        try:
            import ctypes

            prototype = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
            _set_default = prototype(("PyOS_setsig", ctypes.pythonapi))
        except (ImportError, AttributeError, OSError):
            pass
    try:
        threading.Thread(target=_watch_wakeup, args=(_wakeup[0],), name="normlog SIGTERM", daemon=True).start()
    except RuntimeError:  # no thread to be had: the handler alone then
        pass


def _watch_wakeup(read_end: int) -> None:
    while True:
        try:
            signals = os.read(read_end, 64)
        except OSError:
            return
        if not signals:
            return
        if int(signal.SIGTERM) in signals and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            _end_process()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """normlog's SIGTERM handler. Installed (only ever in place of the default action), it
    writes every open file out and ends the process by SIGTERM, as the default would.
    Called by a handler of the user's that replaced it, it writes out and returns, and that
    handler goes on. It waits on no lock that the thread it interrupts, or a fork, could hold."""
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        _end_process()
    elif os.getpid() == _ready_pid:
        _drain(time.monotonic() + _SIGTERM_GRACE)


def _end_process() -> None:
    if os.getpid() == _ready_pid:  # not a fork()ed child still being set up
        deadline = time.monotonic() + _SIGTERM_GRACE
        _drain(deadline)
        for sink in list(_SINKS):  # no record is cut by the death: the threads stop between writes
            sink.write_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elif _set_default is not None:
        _set_default(signal.SIGTERM, None)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)  # the signal is on its way to some thread
    os._exit(128 + signal.SIGTERM)


def _after_fork_in_child() -> None:
    """The child of a fork() has only the thread that forked. Every file starts afresh, and
    SIGTERM is the default again until the child starts writing (most children never do)."""
    global _SINKS, _sigterm, _ready_pid, _wakeup
    for sink in list(_EVERY):
        sink.forked()
    _SINKS = set()
    if _wakeup is not None:
        # The C-level handler would write the child's signals into the parent's pipe, where
        # the parent's thread would take a child's SIGTERM for its own: the same descriptor
        # numbers get a pipe of the child's own.
        try:
            for end, fresh in zip(_wakeup, os.pipe()):
                os.dup2(fresh, end, inheritable=False)
                os.close(fresh)
            os.set_blocking(_wakeup[1], False)
        except OSError:  # no descriptor left: no wakeup descriptor, rather than the parent's
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            for end in _wakeup:
                os.close(end)
            _wakeup = None
    if _sigterm == "on":
        _sigterm = "off"
        try:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # not the main thread (in the child, the forking thread is): keep normlog's
            pass
    # multiprocessing ends a fork()ed child with os._exit, past atexit: its exit runs
    # multiprocessing's own finalizers, which it clears when the child starts.
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.register_after_fork(_close_all, _close_at_multiprocessing_exit)
    _ready_pid = os.getpid()


def _close_at_multiprocessing_exit(_: object) -> None:
    sys.modules["multiprocessing.util"].Finalize(None, _close_all, exitpriority=10)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
