"""Training-health findings from the norms normlog logs: nonfinite, exploding, vanishing, dead,
stalled and diverging.

Rules: this module owns the rules, `Finding` and the `Monitor` state; it imports no framework.
The adapters feed `Monitor.observe` online and `normlog report` feeds it the same numbers read
back from event files, so both give the same findings. A finding is reported once per episode:
it re-arms only after its condition has cleared.
"""

from __future__ import annotations

import bisect
import dataclasses
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
STATE_VERSION = 1  # of `Monitor.state_dict()`; raised when its layout changes


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
    """Evaluates the rules over logged steps, in order; `observe` returns new findings.

    Its whole memory (running medians, streaks, open episodes, weight windows) is in
    `state_dict()`, so a resumed run goes on as if it had never stopped.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.findings: list[Finding] = []
        self._active: dict[tuple[str, str, str], int] = {}  # episode -> clean steps since
        self._history: dict[str, tuple[deque[float], list[float]]] = {}  # recent norms, and sorted
        self._streaks: dict[tuple[str, str], int] = {}
        self._weights: dict[str, deque[float]] = {}
        self._rises: dict[str, deque[bool]] = {}  # whether each step in the window rose
        self._rise_counts: dict[str, int] = {}
        self._found: list[Finding] = []  # this step's, while `observe` runs
        self._step = 0

    def observe(self, values: StepValues) -> list[Finding]:
        """The findings that this logged step starts, in rule order; each rule is one method."""
        # Runs on every logged step for every tensor, so messages are only formatted for a
        # finding, and running medians and counts are kept up to date instead of recomputed.
        self._found, self._step = [], values.step
        self._nonfinite(values)
        self._exploding(values)
        self._vanishing(values)
        self._dead(values)
        self._stalled(values)
        self._diverging(values)
        found, self._found = self._found, []
        self.findings += found
        return found

    # -- episodes and streaks, shared by the rules -------------------------------------------

    def _starts(self, rule: str, tensor: str, fires: bool, kind: str = "gradients", holds: bool | None = None) -> bool:
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
            if self._active[key] >= self.thresholds.rearm_steps:
                del self._active[key]
        return False

    def _report(self, rule: str, tensor: str, message: str, kind: str = "gradients") -> None:
        self._found.append(Finding(rule, tensor, self._step, message, kind))

    def _streak(self, rule: str, tensor: str, condition: bool) -> int:
        count = self._streaks.get((rule, tensor), 0) + 1 if condition else 0
        self._streaks[(rule, tensor)] = count
        return count

    # -- the rules ---------------------------------------------------------------------------

    def _nonfinite(self, values: StepValues) -> None:
        """A NaN/Inf count, or a norm that is itself NaN/Inf (logs without counts)."""
        step = values.step
        for kind, counts, norms in (
            ("gradients", values.grad_nonfinite, values.grad_norms),
            ("parameters", values.weight_nonfinite, values.weight_norms),
        ):
            for name, norm in norms.items():
                count = counts.get(name, 0.0)
                if self._starts("nonfinite", name, count > 0 or not math.isfinite(norm), kind):
                    what = "gradient" if kind == "gradients" else "weight"
                    detail = f"{int(count)} NaN/Inf values" if count > 0 else f"norm {norm}"
                    message = f"{what} of {name!r} holds NaN/Inf at step {step} ({detail})"
                    self._report("nonfinite", name, message, kind)

    def _exploding(self, values: StepValues) -> None:
        """A gradient norm against its own running median, before this step joins it."""
        t = self.thresholds
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
            if self._starts("exploding", name, jump or over, holds=elevated or over):
                reason = (
                    f"{norm:.3g} is {norm / median:.0f}x its running median {median:.3g}"
                    if jump and median
                    else f"{norm:.3g} is above the bound {t.explode_bound}"
                )
                self._report("exploding", name, f"gradient norm of {name!r} exploded at step {values.step}: {reason}")
            if len(history) == history.maxlen:
                del ordered[bisect.bisect_left(ordered, history[0])]
            history.append(norm)
            bisect.insort(ordered, norm)

    def _vanishing(self, values: StepValues) -> None:
        """Tiny relative to the weight, while a later tensor still learns."""
        t = self.thresholds
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
            count = self._streak("vanishing", name, low and later_learn)
            if self._starts("vanishing", name, count >= t.vanish_steps, holds=low):
                self._report(
                    "vanishing",
                    name,
                    f"gradient of {name!r} vanishing: ‖grad‖/‖weight‖ = {ratio:.2g} < {t.vanish_ratio:g} "
                    f"for {count} logged steps up to step {values.step}, while later layers still learn",
                )

    def _dead(self, values: StepValues) -> None:
        """A gradient norm of exactly zero."""
        for name, norm in values.grad_norms.items():
            count = self._streak("dead", name, norm == 0.0)
            if self._starts("dead", name, count >= self.thresholds.dead_steps):
                message = f"gradient of {name!r} is exactly 0 for {count} logged steps up to step {values.step}"
                self._report("dead", name, message)

    def _stalled(self, values: StepValues) -> None:
        """Updates too small to change the weights."""
        t = self.thresholds
        for name, ratio in values.update_ratios.items():
            count = self._streak("stalled", name, math.isfinite(ratio) and ratio < t.stall_ratio)
            if self._starts("stalled", name, count >= t.stall_steps, "parameters"):
                self._report(
                    "stalled",
                    name,
                    f"updates of {name!r} stalled: ‖Δw‖/‖w‖ = {ratio:.2g} < {t.stall_ratio:g} "
                    f"for {count} logged updates up to step {values.step}",
                    "parameters",
                )

    def _diverging(self, values: StepValues) -> None:
        """Steady growth of a weight norm."""
        t = self.thresholds
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
            if self._starts("diverging", name, growing, "parameters"):
                self._report(
                    "diverging",
                    name,
                    f"weight norm of {name!r} diverging: {window[0]:.3g} -> {norm:.3g} over the last "
                    f"{t.diverge_window} logged steps up to step {values.step}",
                    "parameters",
                )

    # -- resuming ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the rules remember, as plain lists, dicts, numbers and strings (it
        pickles and goes through `json.dumps`), to save beside a training checkpoint.

        Example:
            >>> monitor = Monitor()
            >>> _ = monitor.observe(StepValues(0, grad_norms={"w": 1.0}))
            >>> resumed = Monitor()
            >>> resumed.load_state_dict(monitor.state_dict())
        """
        return {
            "version": STATE_VERSION,
            "findings": [dataclasses.asdict(finding) for finding in self.findings],
            "active": [[*key, clean] for key, clean in self._active.items()],
            "streaks": [[rule, tensor, count] for (rule, tensor), count in self._streaks.items()],
            "grad_history": {name: list(history) for name, (history, _) in self._history.items()},
            "weight_windows": {name: list(window) for name, window in self._weights.items()},
            "weight_rises": {name: [int(rose) for rose in rises] for name, rises in self._rises.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` saved; the thresholds stay this monitor's own.

        Raises:
            ValueError: `state` was saved by an incompatible version of these rules.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"a Monitor state of version {state.get('version')!r}; this one reads {STATE_VERSION}")
        t = self.thresholds
        self.findings = [Finding(**finding) for finding in state["findings"]]
        self._active = {(rule, kind, tensor): int(clean) for rule, kind, tensor, clean in state["active"]}
        self._streaks = {(rule, tensor): int(count) for rule, tensor, count in state["streaks"]}
        self._history = {}
        for name, norms in state["grad_history"].items():
            history = deque((float(norm) for norm in norms), maxlen=t.median_window)
            self._history[name] = (history, sorted(history))
        self._weights = {
            name: deque((float(norm) for norm in window), maxlen=t.diverge_window + 1)
            for name, window in state["weight_windows"].items()
        }
        self._rises = {
            name: deque((bool(rose) for rose in rises), maxlen=t.diverge_window)
            for name, rises in state["weight_rises"].items()
        }
        self._rise_counts = {name: sum(rises) for name, rises in self._rises.items()}


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
