"""What both adapters share and no framework needs: option checks, and the rule that logging
never breaks training.

Rules: standard library only. A failure inside logging warns once, naming its cause, and
the adapter goes on with a default; with strict=True it raises instead. Work handed to
`Background` runs in order on one thread and never makes training wait, unless it falls
`depth` pieces behind.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def check_options(log: str, every: int, histogram_every: int | None, update_every: int | None) -> None:
    if log not in ("gradients", "parameters", "all"):
        raise ValueError(f"log must be 'gradients', 'parameters' or 'all', got {log!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    for option, value in (("histogram_every", histogram_every), ("update_every", update_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be a positive int or None, got {value!r}")


class Guard:
    """Runs logging work so that a failure never breaks training."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._warned: set[str] = set()

    def safely(self, action: Callable[[], _T], where: str = "") -> _T | None:
        """`action()`, or None after a failure (warned about once), unless strict."""
        try:
            return action()
        except Exception as error:
            if self.strict:
                raise
            self.warn_once("error", f"normlog: logging failed{where} and is skipped: {error!r}")
            return None

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class Background:
    """One daemon thread that runs the work given to `submit`, in order. At most `depth`
    pieces wait; `submit` then blocks, so a training loop that outruns its logging slows
    down rather than filling memory. The thread holds the queue alone, not the caller."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[[], object]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._queue,), name="normlog-writing", daemon=True)
            self._thread.start()
        self._queue.put(work)

    def wait(self) -> None:
        """Return once all submitted work is done."""
        if self._thread is not None:
            self._queue.join()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def _serve(work_queue: queue.Queue[Callable[[], object] | None]) -> None:
    while True:
        work = work_queue.get()
        try:
            if work is None:
                return
            work()  # the caller's work catches its own errors; see Watcher._write_later
        finally:
            work = None  # nothing done may stay alive here while the thread waits (a dropped watcher)
            work_queue.task_done()
