"""Training-health findings from the norms normlog logs: nonfinite, exploding, vanishing, dead,
stalled and diverging.

Rules: this module knows no framework. A `Monitor` sees one logged step at a time (gradient
and weight norms, update ratios, NaN/Inf counts) and returns the findings that step starts.
The adapters feed it online; `normlog report` feeds it the same numbers read back from event
files, so both give the same findings. A finding is reported once per episode: it re-arms
only after its condition has cleared.
"""

from __future__ import annotations

import bisect
import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["RULES", "Finding", "HealthWarning", "Monitor", "StepValues", "Thresholds", "announce"]

RULES = ("nonfinite", "exploding", "vanishing", "dead", "stalled", "diverging")
GLOBAL = "global_norm"


@dataclass(frozen=True)
class Thresholds:
    """When each rule fires. The defaults and why:

    - exploding: a gradient norm above `explode_factor` (10x) times its own running median
      over the last `median_window` logged steps, once `explode_warmup` steps are known; or
      above `explode_bound` if set. A 10x jump is well outside step-to-step noise (~2x).
    - vanishing: ‖grad‖/‖weight‖ below `vanish_ratio` (1e-3) for `vanish_steps` (50) logged
      steps in a row, while a later tensor is at or above it. In the two-circles example,
      tanh's first six layers sit at 5e-5 to 8e-4 and its last three, like every relu
      layer, at 2e-3 to 1e-2.
    - dead: a gradient norm of exactly 0 for `dead_steps` (10) logged steps in a row.
    - stalled: an update ratio ‖Δw‖/‖w‖ below `stall_ratio` (1e-6) for `stall_steps` (3)
      logged updates in a row; healthy training is around 1e-3 per step.
    - diverging: a weight norm that grew by `diverge_growth` (2x) over the last
      `diverge_window` (200) logged steps, rising on at least `diverge_rising` (90%) of them.
      The window also keeps the first 200 steps out, where weights that start near zero
      (biases) grow by design.

    An episode ends once its condition has been clear for `rearm_steps` (20) logged steps in
    a row; only then can the same rule report the same tensor again, so a noisy quantity
    hovering at a threshold is reported once, not at every crossing.
    """

    explode_factor: float = 10.0
    explode_bound: float | None = None
    explode_warmup: int = 3
    median_window: int = 100
    vanish_ratio: float = 1e-3
    vanish_steps: int = 50
    dead_steps: int = 10
    stall_ratio: float = 1e-6
    stall_steps: int = 3
    diverge_growth: float = 2.0
    diverge_window: int = 200
    diverge_rising: float = 0.9
    rearm_steps: int = 20


@dataclass(frozen=True)
class Finding:
    rule: str
    tensor: str
    step: int
    message: str
    kind: str = "gradients"  # or "parameters", for weights

    def as_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "tensor": self.tensor, "step": self.step, "message": self.message}


@dataclass
class StepValues:
    """What one logged step recorded, by tensor name, in the order the model lists them."""

    step: int
    grad_norms: dict[str, float] = field(default_factory=dict)
    weight_norms: dict[str, float] = field(default_factory=dict)
    update_ratios: dict[str, float] = field(default_factory=dict)
    grad_nonfinite: dict[str, float] = field(default_factory=dict)
    weight_nonfinite: dict[str, float] = field(default_factory=dict)
    global_norm: float | None = None


class Monitor:
    """Evaluates the rules over logged steps, in order; `observe` returns new findings."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.findings: list[Finding] = []
        self._active: dict[tuple[str, str, str], int] = {}  # episode -> clean steps since
        self._history: dict[str, tuple[deque[float], list[float]]] = {}  # recent norms, and sorted
        self._streaks: dict[tuple[str, str], int] = {}
        self._weights: dict[str, deque[float]] = {}
        self._rises: dict[str, deque[bool]] = {}  # whether each step in the window rose
        self._rise_counts: dict[str, int] = {}

    def observe(self, values: StepValues) -> list[Finding]:
        # Runs on every logged step for every tensor, so messages are only formatted for a
        # finding, and running medians and counts are kept up to date instead of recomputed.
        found: list[Finding] = []
        t = self.thresholds
        step = values.step

        def starts(rule: str, tensor: str, fires: bool, kind: str = "gradients", holds: bool | None = None) -> bool:
            """Whether `fires` starts an episode, which then lasts while `holds` (default:
            `fires`) and ends after `rearm_steps` logged steps in a row without it."""
            key = (rule, kind, tensor)
            if key not in self._active:
                if fires:
                    self._active[key] = 0
                return fires
            if fires or (fires if holds is None else holds):
                self._active[key] = 0
            else:
                self._active[key] += 1
                if self._active[key] >= t.rearm_steps:
                    del self._active[key]
            return False

        def report(rule: str, tensor: str, message: str, kind: str = "gradients") -> None:
            found.append(Finding(rule, tensor, step, message, kind))

        def streak(rule: str, tensor: str, condition: bool) -> int:
            count = self._streaks.get((rule, tensor), 0) + 1 if condition else 0
            self._streaks[(rule, tensor)] = count
            return count

        # nonfinite: a NaN/Inf count, or a norm that is itself NaN/Inf (logs without counts)
        for kind, counts, norms in (
            ("gradients", values.grad_nonfinite, values.grad_norms),
            ("parameters", values.weight_nonfinite, values.weight_norms),
        ):
            for name, norm in norms.items():
                count = counts.get(name, 0.0)
                if starts("nonfinite", name, count > 0 or not math.isfinite(norm), kind):
                    what = "gradient" if kind == "gradients" else "weight"
                    detail = f"{int(count)} NaN/Inf values" if count > 0 else f"norm {norm}"
                    report("nonfinite", name, f"{what} of {name!r} holds NaN/Inf at step {step} ({detail})", kind)

        # exploding: against the tensor's own running median, before this step joins it
        norms = dict(values.grad_norms)
        if values.global_norm is not None:
            norms[GLOBAL] = values.global_norm
        for name, norm in norms.items():
            if not math.isfinite(norm):
                continue
            history, ordered = self._history.setdefault(name, (deque(maxlen=t.median_window), []))
            median = _median(ordered) if len(ordered) >= t.explode_warmup else None
            jump = median is not None and median > 0 and norm > t.explode_factor * median
            over = t.explode_bound is not None and norm > t.explode_bound
            elevated = median is not None and median > 0 and norm > 2 * median
            if starts("exploding", name, jump or over, holds=elevated or over):
                reason = (
                    f"{norm:.3g} is {norm / median:.0f}x its running median {median:.3g}"
                    if jump and median
                    else f"{norm:.3g} is above the bound {t.explode_bound}"
                )
                report("exploding", name, f"gradient norm of {name!r} exploded at step {step}: {reason}")
            if len(history) == history.maxlen:
                del ordered[bisect.bisect_left(ordered, history[0])]
            history.append(norm)
            bisect.insort(ordered, norm)

        # vanishing: tiny relative to the weight, while a later tensor still learns
        ratios = [
            (name, values.grad_norms[name] / weight)
            for name, weight in values.weight_norms.items()
            if name in values.grad_norms and weight > 0 and math.isfinite(values.grad_norms[name])
        ]
        learns_after, later = [], False  # whether a tensor after each one learns, from the end
        for _, ratio in reversed(ratios):
            learns_after.append(later)
            later = later or ratio >= t.vanish_ratio
        for (name, ratio), later_learn in zip(ratios, reversed(learns_after)):
            low = ratio < t.vanish_ratio
            count = streak("vanishing", name, low and later_learn)
            if starts("vanishing", name, count >= t.vanish_steps, holds=low):
                report(
                    "vanishing",
                    name,
                    f"gradient of {name!r} vanishing: ‖grad‖/‖weight‖ = {ratio:.2g} < {t.vanish_ratio:g} "
                    f"for {count} logged steps up to step {step}, while later layers still learn",
                )

        # dead: exactly zero
        for name, norm in values.grad_norms.items():
            count = streak("dead", name, norm == 0.0)
            if starts("dead", name, count >= t.dead_steps):
                report("dead", name, f"gradient of {name!r} is exactly 0 for {count} logged steps up to step {step}")

        # stalled: updates too small to change the weights
        for name, ratio in values.update_ratios.items():
            count = streak("stalled", name, math.isfinite(ratio) and ratio < t.stall_ratio)
            if starts("stalled", name, count >= t.stall_steps, "parameters"):
                report(
                    "stalled",
                    name,
                    f"updates of {name!r} stalled: ‖Δw‖/‖w‖ = {ratio:.2g} < {t.stall_ratio:g} "
                    f"for {count} logged updates up to step {step}",
                    "parameters",
                )

        # diverging: steady growth of a weight norm
        for name, norm in values.weight_norms.items():
            if not math.isfinite(norm):
                continue
            window = self._weights.setdefault(name, deque(maxlen=t.diverge_window + 1))
            rises = self._rises.setdefault(name, deque(maxlen=t.diverge_window))
            if window:
                if len(rises) == rises.maxlen:
                    self._rise_counts[name] -= rises[0]
                rises.append(norm > window[-1])
                self._rise_counts[name] = self._rise_counts.get(name, 0) + rises[-1]
            window.append(norm)
            growing = (
                len(window) == window.maxlen
                and window[0] > 0
                and window[-1] >= t.diverge_growth * window[0]
                and self._rise_counts[name] >= t.diverge_rising * t.diverge_window
            )
            if starts("diverging", name, growing, "parameters"):
                report(
                    "diverging",
                    name,
                    f"weight norm of {name!r} diverging: {window[0]:.3g} -> {norm:.3g} over the last "
                    f"{t.diverge_window} logged steps up to step {step}",
                    "parameters",
                )

        self.findings += found
        return found


def _median(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def evaluate(steps: Iterable[StepValues], thresholds: Thresholds | None = None) -> list[Finding]:
    """All findings over a run's logged steps, as the online monitor would have reported them."""
    monitor = Monitor(thresholds)
    for values in steps:
        monitor.observe(values)
    return monitor.findings


class HealthWarning(UserWarning):
    """A training-health finding: filter these with `warnings.filterwarnings`."""


def announce(findings: list[Finding], writer: Any, via: Literal["warnings", "logging"] = "warnings") -> None:
    """Tell the user (a HealthWarning, or a `normlog.health` logging record) and TensorBoard
    (text under `health/<rule>`, and a scalar 1 under `health/<rule>/<tensor>`)."""
    scalars: dict[int, list[tuple[str, float]]] = {}
    for finding in findings:
        text = f"normlog [{finding.rule}] {finding.message}"
        if via == "logging":
            logging.getLogger("normlog.health").warning(text)
        else:
            warnings.warn(text, HealthWarning, stacklevel=4)
        writer.add_text(f"health/{finding.rule}", f"step {finding.step}: {finding.message}", finding.step)
        scalars.setdefault(finding.step, []).append((f"health/{finding.rule}/{finding.tensor}", 1.0))
    for step, values in scalars.items():
        writer._summary(values, step, None)
