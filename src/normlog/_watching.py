"""What both adapters share and no framework needs: option checks, and the rule that logging
never breaks training.

Rules: standard library only. A failure inside logging warns once, naming its cause, and
the adapter goes on with a default; with strict=True it raises instead.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

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
