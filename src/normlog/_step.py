"""What one logged step records: its tags, scalars, histograms, health input and writer call.

Rules: knows no framework. The adapters reduce their tensors where they live and hand the
small results here as numpy (`Group`, `Updates`); `Recorder.record` turns them into the
scalars and histogram rows of one event, counts NaN/Inf (one warning per tensor), feeds the
health rules and announces their findings. This module alone spells tags (`norm_tag`, …);
`parse_tag` reads them back for `normlog report`. Both adapters follow one rule for what a
step writes, so they cannot drift: a zero-norm weight has no update ratio (none is written).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from normlog._rows import HistogramRows
from normlog.health import Finding, HealthWarning, Monitor, StepValues

if TYPE_CHECKING:
    from normlog._watching import Guard
    from normlog.writer import Writer

__all__ = [
    "GLOBAL_NORM",
    "LOSS_SCALE",
    "SKIPPED_STEP",
    "Group",
    "ParsedTag",
    "Recorder",
    "Updates",
    "announce",
    "finding_scalar_tag",
    "finding_text_tag",
    "histogram_tag",
    "nonfinite_tag",
    "norm_tag",
    "parse_tag",
    "ratio_tag",
    "run_directory",
    "stat_tag",
]

Kind = Literal["gradients", "parameters", "activations"]
KINDS: tuple[Kind, ...] = ("gradients", "parameters", "activations")

# -- the tag scheme ------------------------------------------------------------------------

GLOBAL_NORM = "gradients/global_norm"  # L2 norm over all watched gradients: what clip_grad_norm_ sees
LOSS_SCALE = "amp/loss_scale"
SKIPPED_STEP = "amp/skipped_step"
_UPDATES = "updates"
_HEALTH = "health"


def histogram_tag(kind: str, name: str) -> str:
    """The histogram of tensor `name`'s gradients, weights or activations."""
    return f"{kind}/{name}"


def norm_tag(kind: str, name: str) -> str:
    return f"{kind}/{name}/norm"


def nonfinite_tag(tag: str) -> str:
    """The count of NaN and ±Inf beside a histogram or a tensor's statistics at `tag`."""
    return f"{tag}/nonfinite"


def stat_tag(tag: str, statistic: str) -> str:
    """`Writer.add_stats`' scalars: `<tag>/norm`, `/mean`, `/std`, `/min`, `/max`."""
    return f"{tag}/{statistic}"


def ratio_tag(name: str) -> str:
    """‖w_after - w_before‖ / ‖w_before‖ of one optimizer step."""
    return f"{_UPDATES}/{name}/ratio"


def finding_text_tag(rule: str) -> str:
    return f"{_HEALTH}/{rule}"


def finding_scalar_tag(rule: str, tensor: str) -> str:
    return f"{_HEALTH}/{rule}/{tensor}"


@dataclass(frozen=True)
class ParsedTag:
    """What a tag written by `Recorder` holds: a `statistic` ("norm", "nonfinite", "ratio",
    "global_norm" or "histogram") of the tensor `name` in `kind` ("gradients",
    "parameters", "activations"; "" for the global norm)."""

    statistic: str
    kind: str
    name: str


def parse_tag(tag: str) -> ParsedTag | None:
    """The tensor and statistic a normlog tag names, or None for any other tag."""
    if tag == GLOBAL_NORM:
        return ParsedTag("global_norm", "", "")
    kind, _, rest = tag.partition("/")
    if kind == _UPDATES and rest.endswith("/ratio"):
        return ParsedTag("ratio", "parameters", rest[: -len("/ratio")])
    if kind not in KINDS or not rest:
        return None
    for statistic in ("norm", "nonfinite"):
        if rest.endswith(f"/{statistic}"):
            return ParsedTag(statistic, kind, rest[: -len(statistic) - 1])
    return ParsedTag("histogram", kind, rest)


# -- what a step records ---------------------------------------------------------------------


@dataclass
class Group:
    """One kind of tensor at one logged step, in model order. `norms` are L2 norms (NaN if
    a value is NaN, else inf if one is infinite), or None where only histograms are due;
    `nonfinite` counts NaN and ±Inf per tensor (None: none counted, every norm finite);
    `rows` are histogram rows (`normlog._rows`) of the finite values, or None."""

    kind: Kind
    names: Sequence[str]
    norms: np.ndarray | None = None
    nonfinite: np.ndarray | None = None
    rows: np.ndarray | None = None


@dataclass
class Updates:
    """One optimizer step's update norms ‖w_after - w_before‖ and weight norms ‖w_before‖."""

    names: Sequence[str]
    update_norms: np.ndarray
    weight_norms: np.ndarray

    def ratios(self) -> dict[str, float]:
        """The update ratio of each tensor whose weight norm is not 0: a zero weight (a bias
        initialised to zeros) has no relative update, and writing inf would blank its chart."""
        return {
            name: float(update) / float(weight)
            for name, update, weight in zip(self.names, self.update_norms, self.weight_norms)
            if weight != 0 and not math.isnan(weight)
        }


# Writer -> the recorders writing into it: two watched models in one run write the same tags.
_RECORDERS: weakref.WeakKeyDictionary[Writer, weakref.WeakSet[Recorder]] = weakref.WeakKeyDictionary()


def run_directory(logdir: str | os.PathLike[str] | None, name: str | None) -> str | None:
    """Where a watcher named `name` writes: its own run `<logdir>/<name>`, so that two models
    (a GAN's generator and discriminator) keep their own tags and TensorBoard can overlay
    them. No name: `logdir` itself."""
    if name is None:
        return None if logdir is None else os.fspath(logdir)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"name must be a non-empty run name without '/' (e.g. 'generator'), got {name!r}")
    return os.path.join("runs" if logdir is None else os.fspath(logdir), name)


class Recorder:
    """Writes what each logged step recorded, and runs the health rules on it. `writer=None`
    (a rank that does not write) records nothing. A second recorder on a Writer that one
    already writes into warns: both would write the same tags (pass `name=` to each)."""

    def __init__(
        self,
        writer: Writer | None,
        guard: Guard,
        bins: int,
        monitor: Monitor | None,
        health_via: Literal["warnings", "logging"] = "warnings",
    ) -> None:
        self.writer = writer
        self.monitor = monitor
        self._guard = guard
        self._bins = bins
        self._health_via = health_via
        if writer is not None:
            others = _RECORDERS.setdefault(writer, weakref.WeakSet())
            if len(others):
                warnings.warn(
                    f"normlog: a second watcher writes into {writer!r}: both write the same tags, and their "
                    "charts mix. Pass name= to each watch() (each then writes its own run), or a Writer each.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            others.add(self)

    def close(self) -> None:
        """This recorder writes no more (its watcher was unwatched)."""
        if self.writer is not None and self.writer in _RECORDERS:
            _RECORDERS[self.writer].discard(self)

    def record(
        self,
        step: int,
        groups: Sequence[Group] = (),
        updates: Updates | None = None,
        scalars: Iterable[tuple[str, float]] = (),
    ) -> None:
        """Write one event holding `groups`' norms, NaN/Inf counts and histograms, the update
        ratios and any other `scalars`, at `step`; then run the health rules when there are
        norms to judge."""
        if self.writer is None:
            return
        out = list(scalars)
        values = StepValues(step)
        tags: list[str] = []
        rows: list[np.ndarray] = []
        judged = False
        for group in groups:
            if group.norms is not None:
                judged = True
                out += self._norms(step, group, values)
            if group.rows is not None:
                tags += [histogram_tag(group.kind, name) for name in group.names]
                rows.append(group.rows)
        if updates is not None:
            values.update_ratios = updates.ratios()
            out += [(ratio_tag(name), ratio) for name, ratio in values.update_ratios.items()]
        histograms = HistogramRows(tags, np.concatenate(rows), self._bins) if tags else None
        if out or histograms is not None:
            self.writer.add_record(step, out, rows=histograms)
        if judged and self.monitor is not None:
            announce(self.monitor.observe(values), self.writer, self._health_via)

    def _norms(self, step: int, group: Group, values: StepValues) -> list[tuple[str, float]]:
        assert group.norms is not None
        kind = group.kind
        norms = [float(n) for n in group.norms]
        out = [(norm_tag(kind, name), norm) for name, norm in zip(group.names, norms)]
        if kind == "gradients":
            values.grad_norms = dict(zip(group.names, norms))
            values.global_norm = math.sqrt(sum(n * n for n in norms))
            out.append((GLOBAL_NORM, values.global_norm))
        elif kind == "parameters":
            values.weight_norms = dict(zip(group.names, norms))
        if group.nonfinite is not None:
            counts = values.grad_nonfinite if kind == "gradients" else values.weight_nonfinite
            for name, count in zip(group.names, group.nonfinite):
                if count:
                    out.append((nonfinite_tag(histogram_tag(kind, name)), float(count)))
                    if kind != "activations":
                        counts[name] = float(count)
                    self._guard.warn_once(
                        f"nonfinite:{kind}/{name}",
                        f"normlog: {int(count)} NaN/Inf values in the {kind} of {name!r} at step {step}",
                    )
        return out


def announce(findings: list[Finding], writer: Writer, via: Literal["warnings", "logging"] = "warnings") -> None:
    """Tell the user (a HealthWarning, or a `normlog.health` logging record) and TensorBoard
    (text under `health/<rule>`, and a scalar 1 under `health/<rule>/<tensor>`)."""
    scalars: dict[int, list[tuple[str, float]]] = {}
    for finding in findings:
        text = f"normlog [{finding.rule}] {finding.message}"
        if via == "logging":
            logging.getLogger("normlog.health").warning(text)
        else:
            warnings.warn(text, HealthWarning, stacklevel=5)
        writer.add_text(finding_text_tag(finding.rule), f"step {finding.step}: {finding.message}", finding.step)
        scalars.setdefault(finding.step, []).append((finding_scalar_tag(finding.rule, finding.tensor), 1.0))
    for step, values in scalars.items():
        writer.add_record(step, values)
