"""Training-health findings from the norms normlog logs: nonfinite, exploding, vanishing, dead,
stalled and diverging.

Rules: this module owns the rules, `Finding` and the `Monitor` state; it imports no framework.
The adapters feed `Monitor.observe` online and `normlog report` feeds it the same numbers read
back from event files, so both give the same findings. One cause is one finding: an episode
names its origin and holds the other tensors and the consequences as `members`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULES", "Finding", "HealthWarning", "Monitor", "StepValues", "Thresholds"]

RULES = ("nonfinite", "exploding", "vanishing", "dead", "stalled", "diverging")
GLOBAL = "global_norm"
STATE_VERSION = 2  # of `Monitor.state_dict()`; raised when its layout changes
CAUSES = ("nonfinite", "exploding")  # rules whose episodes take in what follows them


@dataclass(frozen=True)
class Thresholds:
    """When each rule fires. Every default cites the findings benchmark (benchmarks/findings:
    15 healthy and 12 broken PyTorch runs, 3 seeds, 300 logged steps; RESULTS.md there).

    - exploding: a gradient norm (of a tensor, or the global norm) at least `explode_factor`
      (10x) the largest of its last `median_window` (100) logged values, once it has
      `explode_warmup` (20) of them. Healthy runs peak at 4.7x their recent largest (a CNN
      whose loss nears zero; it and momentum SGD reach 100x their *median*, so the reference
      is the recent largest, not the median); the broken runs' first steps after the cause
      reach 10x within 0-4 steps. Before the warm-up only a jump of `explode_early_factor`
      (1000x) over every value so far counts: healthy first steps jump up to 151x (a GRU
      whose first gradient is tiny), and SGD at a learning rate 10x too high passes 1000x by
      step 4. Or above `explode_bound`, if set.
    - vanishing: ‖grad‖/‖weight‖ below `vanish_ratio` (1e-3) and below `vanish_relative`
      (0.1) times the largest ratio of a later matrix (which must itself be at or above
      `vanish_ratio`), for `vanish_steps` (50) logged steps in a row. Not for a gradient of
      exactly 0 (that is `dead`), and for a 1-D tensor (a bias, or a normalisation gain whose
      ratio is small because its weight is all ones) only while its module's matrix
      vanishes too. The broken deep sigmoid and small-init tanh nets sit at 2e-9 to 7e-4,
      75x or more below their last matrix; a healthy conv autoencoder's four matrices sit at
      2.6e-4 to 8e-4, within 3x of each other.
    - dead: a gradient norm of exactly 0 for `dead_steps` (10) logged steps in a row.
    - stalled: an update ratio ‖Δw‖/‖w‖ below `stall_ratio` (1e-6) and below
      `stall_relative` (1e-3) times the median update ratio of the optimizer's tensors that
      step, for `stall_steps` (3) logged updates in a row; only for a tensor the optimizer
      owns (`StepValues.owned`) whose gradient is itself fine (not 0, not below
      `vanish_ratio`): a tensor left out of the optimizer is not stalled (a pretrained
      embedding was, in 3 healthy runs, without `owned`), and a vanishing gradient explains
      a small update. The relative bound keeps a schedule that decays every group together
      quiet.
    - diverging: a matrix's weight norm at least `diverge_growth` (3x) its first logged
      value, rising on `diverge_rising` (90%) of the last `diverge_window` (100) logged
      steps, by at least `diverge_pace` (1.5x) over them, and not slowing: the window's
      second half grew at least `diverge_steady` (1.0) times as much as its first. Healthy
      weights that keep growing (REINFORCE's policy head, logistic regression on separable
      data, which grows like log t) do so by at most 1.23x per 100 steps and slow down; the
      broken run's grow about 2x per 100 steps and speed up. 1-D tensors and weights that
      start at 0 are not judged.

    An episode ends once its condition has been clear for `rearm_steps` (20) logged steps in
    a row; only then can the same rule report the same tensor again, so a noisy quantity
    hovering at a threshold is reported once, not at every crossing. Findings of one rule
    while an episode of it lasts, and of any rule in the `episode_window` (50) logged steps
    after a nonfinite or exploding episode began (ReLUs that die after a blow-up), join that
    episode as members instead of being reported again; a new NaN is always reported.
    """

    explode_factor: float = 10.0
    explode_bound: float | None = None
    explode_warmup: int = 20
    explode_early_factor: float = 1000.0
    median_window: int = 100
    vanish_ratio: float = 1e-3
    vanish_relative: float = 0.1
    vanish_steps: int = 50
    dead_steps: int = 10
    stall_ratio: float = 1e-6
    stall_relative: float = 1e-3
    stall_steps: int = 3
    diverge_growth: float = 3.0
    diverge_window: int = 100
    diverge_pace: float = 1.5
    diverge_rising: float = 0.9
    diverge_steady: float = 1.0
    rearm_steps: int = 20
    episode_window: int = 50


@dataclass(frozen=True)
class Finding:
    """One episode: its origin (`tensor`, `kind`), its first step, and as `members` every
    other finding it explains (other tensors, and the consequences of a blow-up), each with
    its own step."""

    rule: str
    tensor: str
    step: int
    message: str
    kind: str = "gradients"  # or "parameters", for weights
    members: tuple[Finding, ...] = ()
    origin: bool = True  # False for a member

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "tensor": self.tensor,
            "step": self.step,
            "message": self.message,
            "kind": self.kind,
            "origin": self.origin,
            "members": [member.as_dict() for member in self.members],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The inverse of `as_dict`, for `Monitor.load_state_dict` and tools."""
        members = tuple(cls.from_dict(member) for member in data.get("members", ()))
        kind, origin = data.get("kind", "gradients"), data.get("origin", True)
        return cls(data["rule"], data["tensor"], data["step"], data["message"], kind, members, origin)


@dataclass
class StepValues:
    """What one logged step recorded, by tensor name, in the order the model lists them.

    The weights are those the step's gradients were computed from (before the optimizer's
    update); `update_ratios` are ‖Δw‖/‖w‖ of the update that followed. `global_norm` is
    before any clipping. `owned` names the tensors the optimizer updates (None: all of them);
    `ndims` gives each tensor's number of dimensions (missing: guessed from its name).
    """

    step: int
    grad_norms: dict[str, float] = field(default_factory=dict)
    weight_norms: dict[str, float] = field(default_factory=dict)
    update_ratios: dict[str, float] = field(default_factory=dict)
    grad_nonfinite: dict[str, float] = field(default_factory=dict)
    weight_nonfinite: dict[str, float] = field(default_factory=dict)
    global_norm: float | None = None
    owned: set[str] | None = None
    ndims: dict[str, int] = field(default_factory=dict)


@dataclass
class _Candidate:
    """A finding a rule raised this step, before episodes decide whether it is new; the one
    of highest `rank` among a step's new findings of one rule becomes the origin."""

    finding: Finding
    rank: float


@dataclass
class _Episode:
    rule: str
    index: int  # of its finding in `Monitor.findings`
    start: int
    message: str  # the origin's, before the count of members is added
    keys: list[tuple[str, str, str]]  # (rule, kind, tensor) of every member, for `_active`


_VECTOR = re.compile(r"(^|[./_])(bias|beta|gamma)$|(norm|^ln|[._/]ln|^bn|[._/]bn)[^./]*[./](weight|scale)$", re.I)


class Monitor:
    """Evaluates the rules over logged steps, in order; `observe` returns new findings.

    Its whole memory (recent norms, streaks, open episodes, weight windows) is in
    `state_dict()`, so a resumed run goes on as if it had never stopped.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.findings: list[Finding] = []
        self._active: dict[tuple[str, str, str], int] = {}  # episode -> clean steps since
        self._history: dict[str, tuple[deque[float], list[float]]] = {}  # recent norms, and sorted
        self._streaks: dict[tuple[str, str], int] = {}
        self._initial: dict[str, float] = {}  # first finite weight norm
        self._weights: dict[str, deque[float]] = {}
        self._rises: dict[str, deque[bool]] = {}  # whether each step in the window rose
        self._rise_counts: dict[str, int] = {}
        self._ndims: dict[str, int] = {}
        self._episodes: list[_Episode] = []  # open ones
        self._candidates: list[_Candidate] = []  # this step's, while `observe` runs
        self._was_active: set[tuple[str, str, str]] = set()
        self._step = 0

    def observe(self, values: StepValues) -> list[Finding]:
        """The episodes that this logged step starts (each rule is one method), with the
        members known so far; later members update the episode in `findings`."""
        # Runs on every logged step for every tensor, so messages are only formatted for a
        # finding, and running medians and counts are kept up to date instead of recomputed.
        self._candidates, self._step = [], values.step
        self._was_active = set(self._active)  # episodes as they stood before this step
        self._ndims.update(values.ndims)
        self._nonfinite(values)
        self._exploding(values)
        self._vanishing(values)
        self._dead(values)
        self._stalled(values)
        self._diverging(values)
        found = self._gather()
        self._candidates = []
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

    def _report(self, rule: str, tensor: str, message: str, kind: str = "gradients", rank: float = 0.0) -> None:
        self._candidates.append(_Candidate(Finding(rule, tensor, self._step, message, kind), rank))

    def _streak(self, rule: str, tensor: str, condition: bool) -> int:
        count = self._streaks.get((rule, tensor), 0) + 1 if condition else 0
        self._streaks[(rule, tensor)] = count
        return count

    def _persists(self, episode: _Episode) -> bool:
        """Whether one of its members was still in its episode before this step (one that
        ended and fires again this very step starts a new episode)."""
        return any(key in self._was_active for key in episode.keys)

    def _is_recent(self, episode: _Episode) -> bool:
        return self._step - episode.start <= self.thresholds.episode_window

    def _explains(self, finding: Finding) -> _Episode | None:
        """The episode this finding belongs to: one of its own rule while that persists, else
        (for anything but a NaN, which the user must always hear of) a recent blow-up."""
        for episode in reversed(self._episodes):
            if episode.rule == finding.rule and self._persists(episode):
                return episode
        if finding.rule != "nonfinite":
            for episode in reversed(self._episodes):
                if episode.rule in CAUSES and self._is_recent(episode):
                    return episode
        return None

    def _gather(self) -> list[Finding]:
        """Turns this step's candidates into new episodes or members of open ones. Rules go
        in `RULES` order, so what a NaN or a blow-up of this very step explains joins it."""
        self._episodes = [e for e in self._episodes if self._persists(e) or self._is_recent(e)]
        found: list[Finding] = []
        for rule in RULES:
            new: list[_Candidate] = []
            for candidate in self._candidates:
                if candidate.finding.rule != rule:
                    continue
                episode = self._explains(candidate.finding)
                if episode is None:
                    new.append(candidate)
                else:
                    self._join(episode, [candidate.finding])
            if not new:
                continue
            origin = max(new, key=lambda c: c.rank)  # the first of equals: model order
            others = [c.finding for c in new if c is not origin]
            finding = origin.finding
            episode = _Episode(rule, len(self.findings), self._step, finding.message, [_key(finding)])
            self.findings.append(finding)
            self._episodes.append(episode)
            self._join(episode, others)
            found.append(self.findings[episode.index])
        return found

    def _join(self, episode: _Episode, members: list[Finding]) -> None:
        if not members:
            return
        head = self.findings[episode.index]
        everyone = head.members + tuple(dataclasses.replace(member, origin=False) for member in members)
        episode.keys += [_key(member) for member in members]
        self.findings[episode.index] = dataclasses.replace(
            head, members=everyone, message=episode.message + _count(head, everyone)
        )

    def _is_vector(self, name: str) -> bool:
        """A bias or a normalisation gain: 1-D, by the shape the adapter gave, else by name."""
        ndim = self._ndims.get(name)
        return ndim <= 1 if ndim is not None else _guess_vector(name)

    # -- the rules ---------------------------------------------------------------------------

    def _nonfinite(self, values: StepValues) -> None:
        """A NaN/Inf count, or a norm that is itself NaN/Inf (logs without counts).

        The origin: a weight whose norm is already NaN/Inf went first (the forward pass
        spread it to every gradient), and of several the first in model order, where the
        forward pass meets them. Else the gradient went first: the backward pass runs the
        model in reverse, so the last tensor in model order that turned NaN/Inf is where it
        started (a NaN in the loss reaches every gradient; one from a layer's backward only
        those before it). A weight counted after a NaN gradient's update does not count as
        first, as its norm, taken before the update, is finite.
        """
        step = values.step
        order = {name: i for i, name in enumerate(values.weight_norms or values.grad_norms)}
        for kind, counts, norms in (
            ("gradients", values.grad_nonfinite, values.grad_norms),
            ("parameters", values.weight_nonfinite, values.weight_norms),
        ):
            for name, norm in norms.items():
                count = counts.get(name, 0.0)
                if self._starts("nonfinite", name, count > 0 or not math.isfinite(norm), kind):
                    position = order.get(name, 0)
                    if kind == "gradients":
                        what, rank = "gradient", 1e9 + position
                    elif not math.isfinite(norm):
                        what, rank = "weight", 2e9 - position
                    else:
                        what, rank = "weight", -position
                    detail = f"{int(count)} NaN/Inf values" if count > 0 else f"norm {norm}"
                    first = "; the weight went first" if rank > 2e9 - 1e6 else ""
                    first = "; first in the backward pass" if kind == "gradients" else first
                    message = f"{what} of {name!r} holds NaN/Inf at step {step} ({detail}){first}"
                    self._report("nonfinite", name, message, kind, rank)

    def _exploding(self, values: StepValues) -> None:
        """A gradient norm against the largest of its own recent ones, before it joins them."""
        t = self.thresholds
        norms = dict(values.grad_norms)
        if values.global_norm is not None:
            norms[GLOBAL] = values.global_norm
        for name, norm in norms.items():
            if not math.isfinite(norm) or norm <= 0:  # NaN is nonfinite's, zero is dead's
                continue
            history, ordered = self._history.setdefault(name, (deque(maxlen=t.median_window), []))
            reference = ordered[-1] if ordered else None
            factor = t.explode_factor if len(ordered) >= t.explode_warmup else t.explode_early_factor
            jump = reference is not None and norm >= factor * reference
            over = t.explode_bound is not None and norm > t.explode_bound
            elevated = bool(ordered) and norm > 2 * _median(ordered)
            if self._starts("exploding", name, jump or over, holds=elevated or over):
                reason = (
                    f"{norm:.3g} is {norm / reference:.3g}x the largest of its last {len(ordered)} ({reference:.3g})"
                    if jump and reference
                    else f"{norm:.3g} is above the bound {t.explode_bound}"
                )
                rank = math.log(norm / reference) if jump and reference else 0.0
                self._report(
                    "exploding", name, f"gradient norm of {name!r} exploded at step {values.step}: {reason}", rank=rank
                )
            if len(history) == history.maxlen:
                del ordered[bisect.bisect_left(ordered, history[0])]
            history.append(norm)
            bisect.insort(ordered, norm)

    def _vanishing(self, values: StepValues) -> None:
        """Tiny relative to the weight, and to the matrices after it, which still learn. The
        origin is the last in model order: where the backward pass first lost its gradient."""
        t = self.thresholds
        ratios = [
            (name, values.grad_norms[name] / weight)
            for name, weight in values.weight_norms.items()
            if name in values.grad_norms and weight > 0 and math.isfinite(values.grad_norms[name])
        ]
        best_after, best = [], 0.0  # the largest ratio of a matrix after each tensor, from the end
        for name, ratio in reversed(ratios):
            best_after.append(best)
            if not self._is_vector(name):
                best = max(best, ratio)
        for position, ((name, ratio), later) in enumerate(zip(ratios, reversed(best_after))):
            low = 0 < ratio < t.vanish_ratio
            behind = later >= t.vanish_ratio and ratio < t.vanish_relative * later
            count = self._streak("vanishing", name, low and behind)
            fires = count >= t.vanish_steps and (not self._is_vector(name) or self._matrix_vanishes(name, values))
            if self._starts("vanishing", name, fires, holds=low):
                self._report(
                    "vanishing",
                    name,
                    f"gradient of {name!r} vanishing: ‖grad‖/‖weight‖ = {ratio:.2g} < {t.vanish_ratio:g} "
                    f"for {count} logged steps up to step {values.step}, {ratio / later:.2g}x that of a later "
                    "matrix, which still learns",
                    rank=position - (1e6 if self._is_vector(name) else 0),  # its matrix, not its bias
                )

    def _matrix_vanishes(self, name: str, values: StepValues) -> bool:
        module = _module(name)
        return any(
            ("vanishing", "gradients", other) in self._active
            for other in values.weight_norms
            if other != name and _module(other) == module and not self._is_vector(other)
        )

    def _dead(self, values: StepValues) -> None:
        """A gradient norm of exactly zero. The origin is the last module in model order
        whose every gradient is 0 (a layer of dead ReLUs, not the matrix after it, whose
        bias still learns)."""
        alive = {_module(name) for name, norm in values.grad_norms.items() if norm != 0.0}
        seen: set[str] = set()
        for position, (name, norm) in enumerate(values.grad_norms.items()):
            module = _module(name)
            first_of_module = module not in seen
            seen.add(module)
            count = self._streak("dead", name, norm == 0.0)
            if self._starts("dead", name, count >= self.thresholds.dead_steps):
                message = f"gradient of {name!r} is exactly 0 for {count} logged steps up to step {values.step}"
                rank = position + (1e6 if module not in alive and first_of_module else 0)
                self._report("dead", name, message, rank=rank)

    def _stalled(self, values: StepValues) -> None:
        """Updates too small to change the weights of a tensor whose gradient is fine, while
        the optimizer's other tensors move."""
        t = self.thresholds
        owned = {
            name: ratio for name, ratio in values.update_ratios.items() if values.owned is None or name in values.owned
        }
        moving = sorted(ratio for ratio in owned.values() if math.isfinite(ratio) and ratio >= t.stall_ratio)
        typical = _median(moving) if moving else 0.0
        for position, (name, ratio) in enumerate(owned.items()):
            grad, weight = values.grad_norms.get(name, 0.0), values.weight_norms.get(name, 0.0)
            gradient_fine = math.isfinite(grad) and weight > 0 and grad / weight >= t.vanish_ratio
            low = math.isfinite(ratio) and ratio < t.stall_ratio and ratio < t.stall_relative * typical
            count = self._streak("stalled", name, low and gradient_fine)
            if self._starts("stalled", name, count >= t.stall_steps, "parameters", holds=low):
                self._report(
                    "stalled",
                    name,
                    f"updates of {name!r} stalled: ‖Δw‖/‖w‖ = {ratio:.2g} < {t.stall_ratio:g}, {ratio / typical:.1g}x "
                    f"the optimizer's median, for {count} logged updates up to step {values.step}",
                    "parameters",
                    rank=-position,
                )

    def _diverging(self, values: StepValues) -> None:
        """Steady, unslowing growth of a matrix's weight norm, relative to where it began."""
        t = self.thresholds
        for name, norm in values.weight_norms.items():
            if not math.isfinite(norm):
                continue
            initial = self._initial.setdefault(name, norm)
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
                and initial > 0
                and norm >= t.diverge_growth * initial
                and self._rise_counts[name] >= t.diverge_rising * t.diverge_window
                and not self._is_vector(name)
            )
            if growing:
                middle = window[len(window) // 2]
                steady = norm - middle >= t.diverge_steady * (middle - window[0])
                growing = steady and norm >= t.diverge_pace * window[0]
            if self._starts("diverging", name, growing, "parameters"):
                self._report(
                    "diverging",
                    name,
                    f"weight norm of {name!r} diverging: {initial:.3g} at first, {window[0]:.3g} -> {norm:.3g} over "
                    f"the last {t.diverge_window} logged steps up to step {values.step}, and not slowing",
                    "parameters",
                    rank=norm / initial,
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
            "findings": [finding.as_dict() for finding in self.findings],
            "active": [[*key, clean] for key, clean in self._active.items()],
            "streaks": [[rule, tensor, count] for (rule, tensor), count in self._streaks.items()],
            "grad_history": {name: list(history) for name, (history, _) in self._history.items()},
            "initial_weights": dict(self._initial),
            "weight_windows": {name: list(window) for name, window in self._weights.items()},
            "weight_rises": {name: [int(rose) for rose in rises] for name, rises in self._rises.items()},
            "ndims": dict(self._ndims),
            "episodes": [
                {"rule": e.rule, "index": e.index, "start": e.start, "message": e.message, "keys": e.keys}
                for e in self._episodes
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` saved; the thresholds stay this monitor's own.

        Raises:
            ValueError: `state` was saved by an incompatible version of these rules.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"a Monitor state of version {state.get('version')!r}; this one reads {STATE_VERSION}")
        t = self.thresholds
        self.findings = [Finding.from_dict(finding) for finding in state["findings"]]
        self._active = {(rule, kind, tensor): int(clean) for rule, kind, tensor, clean in state["active"]}
        self._streaks = {(rule, tensor): int(count) for rule, tensor, count in state["streaks"]}
        self._history = {}
        for name, norms in state["grad_history"].items():
            history = deque((float(norm) for norm in norms), maxlen=t.median_window)
            self._history[name] = (history, sorted(history))
        self._initial = {name: float(norm) for name, norm in state["initial_weights"].items()}
        self._weights = {
            name: deque((float(norm) for norm in window), maxlen=t.diverge_window + 1)
            for name, window in state["weight_windows"].items()
        }
        self._rises = {
            name: deque((bool(rose) for rose in rises), maxlen=t.diverge_window)
            for name, rises in state["weight_rises"].items()
        }
        self._rise_counts = {name: sum(rises) for name, rises in self._rises.items()}
        self._ndims = {name: int(ndim) for name, ndim in state["ndims"].items()}
        self._episodes = [
            _Episode(e["rule"], int(e["index"]), int(e["start"]), e["message"], [tuple(key) for key in e["keys"]])
            for e in state["episodes"]
        ]


@functools.lru_cache(maxsize=4096)  # asked for every tensor at every logged step
def _guess_vector(name: str) -> bool:
    return _VECTOR.search(name) is not None


def _key(finding: Finding) -> tuple[str, str, str]:
    return (finding.rule, finding.kind, finding.tensor)


def _module(name: str) -> str:
    """The module a tensor belongs to: its name up to the last '.' or '/'."""
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else ""


def _count(head: Finding, members: tuple[Finding, ...]) -> str:
    """What an episode's message adds for its members: "(and 5 more tensors; then dead in 3)"."""
    same = {m.tensor for m in members if m.rule == head.rule} - {head.tensor}
    parts = [f"and {len(same)} more tensor{'s' if len(same) > 1 else ''}"] if same else []
    for rule in RULES:
        if rule != head.rule:
            tensors = {m.tensor for m in members if m.rule == rule}
            if tensors:
                parts.append(f"then {rule} in {len(tensors)} tensor{'s' if len(tensors) > 1 else ''}")
    return f" ({'; '.join(parts)})" if parts else ""


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
