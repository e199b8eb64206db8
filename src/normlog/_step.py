"""What one logged step records: its tags, scalars, histograms, health input and writer call.

Rules: knows no framework. The adapters reduce their tensors where they live and hand the
small results here as numpy (`Group`, `Updates`); `Recorder.record` turns them into the
scalars and histogram rows of one event, counts NaN/Inf (one warning per tensor), feeds the
health rules and announces their findings. This module alone spells tags (`norm_tag`, …);
`parse_tag` reads them back for `normlog report`. Both adapters follow one rule for what a
step writes, so they cannot drift: a zero-norm weight has no update ratio (none is written).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import math
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from normlog import _rows
from normlog._overview import DepthHistory, Pace, Panel, draw_norm_by_depth, matplotlib_available
from normlog._rows import HistogramRows
from normlog.health import Finding, HealthWarning, Monitor, StepValues

if TYPE_CHECKING:
    from normlog._watching import Guard
    from normlog.writer import Writer

__all__ = [
    "BURST_RULES",
    "CLIPPED_GLOBAL_NORM",
    "GLOBAL_NORM",
    "HISTOGRAMS_AFTER_FINDING",
    "LOSS_SCALE",
    "SKIPPED_STEP",
    "Group",
    "ParsedTag",
    "Recorder",
    "Updates",
    "announce",
    "finding_scalar_tag",
    "finding_text_tag",
    "findings_table",
    "histogram_tag",
    "image_tag",
    "layout",
    "nonfinite_count_tag",
    "nonfinite_tag",
    "owned_run",
    "norm_tag",
    "parse_tag",
    "ratio_tag",
    "run_directory",
    "stat_tag",
    "tensor_tags",
]

Kind = Literal["gradients", "parameters", "activations"]
KINDS: tuple[Kind, ...] = ("gradients", "parameters", "activations")

# -- the tag scheme ------------------------------------------------------------------------
# By statistic first, so TensorBoard's groups (the tag up to its first '/') read as a user
# asks: every gradient norm under grad_norm/, every histogram of gradients under grad/, ...
#
#   grad_norm/<name>  weight_norm/<name>  act_norm/<name>      L2 norms (scalars)
#   update_ratio/<name>                                        ‖Δw‖/‖w‖ (scalar)
#   nonfinite/grad/<name>  nonfinite/weight/<name>  nonfinite/act/<name>   NaN/Inf counts
#   grad/<name>  weight/<name>  act/<name>                     histograms
#   global/grad_norm  global/grad_norm_clipped                 L2 norm over all gradients
#   health/<rule>  (scalar: tensors flagged)  health/<rule> (text: a table of the findings)
#   normlog/grad_norm_by_depth  normlog/update_ratio_by_depth  images
#   amp/loss_scale  amp/skipped_step                           AMP (torch)
#
# normlog 0.x before this scheme wrote <kind>/<name>/norm, <kind>/<name>/nonfinite,
# <kind>/<name> (histograms), updates/<name>/ratio and gradients/global_norm, with <kind>
# one of gradients, parameters, activations; `parse_tag` reads both.

_GLOBAL = "global"
GLOBAL_NORM = f"{_GLOBAL}/grad_norm"  # L2 norm over all watched gradients: what clip_grad_norm_ sees
# what optimizer.step() applied, where clipping changed the gradients (torch)
CLIPPED_GLOBAL_NORM = f"{_GLOBAL}/grad_norm_clipped"
LOSS_SCALE = "amp/loss_scale"
SKIPPED_STEP = "amp/skipped_step"
_SHORT: dict[str, str] = {"gradients": "grad", "parameters": "weight", "activations": "act"}
_KIND_OF: dict[str, Kind] = {"grad": "gradients", "weight": "parameters", "act": "activations"}
_RATIO = "update_ratio"
_NONFINITE = "nonfinite"
_HEALTH = "health"
_IMAGES = "normlog"
_OLD_GLOBAL_NORM = "gradients/global_norm"
_OLD_UPDATES = "updates"


def histogram_tag(kind: str, name: str) -> str:
    """The histogram of tensor `name`'s gradients, weights or activations: `grad/<name>`."""
    return f"{_SHORT[kind]}/{name}"


def norm_tag(kind: str, name: str) -> str:
    """The L2 norm of tensor `name`'s gradient, weight or activation: `grad_norm/<name>`."""
    return f"{_SHORT[kind]}_norm/{name}"


def nonfinite_count_tag(kind: str, name: str) -> str:
    """The count of NaN and ±Inf in tensor `name`'s gradient, weight or activation."""
    return f"{_NONFINITE}/{_SHORT[kind]}/{name}"


def nonfinite_tag(tag: str) -> str:
    """The count of NaN and ±Inf beside a user's histogram or statistics at `tag`
    (`Writer.add_histogram`, `Writer.add_stats`)."""
    return f"{tag}/nonfinite"


def stat_tag(tag: str, statistic: str) -> str:
    """`Writer.add_stats`' scalars: `<tag>/norm`, `/mean`, `/std`, `/min`, `/max`."""
    return f"{tag}/{statistic}"


def ratio_tag(name: str) -> str:
    """‖w_after - w_before‖ / ‖w_before‖ of one optimizer step: `update_ratio/<name>`."""
    return f"{_RATIO}/{name}"


def finding_text_tag(rule: str) -> str:
    """The text holding a table of every finding of `rule` at one step."""
    return f"{_HEALTH}/{rule}"


def finding_scalar_tag(rule: str) -> str:
    """How many tensors `rule` flagged at a step (written at steps with findings)."""
    return f"{_HEALTH}/{rule}"


def image_tag(statistic: str) -> str:
    """The norm-by-depth pictures: `normlog/grad_norm_by_depth`, `normlog/update_ratio_by_depth`."""
    return f"{_IMAGES}/{statistic}_by_depth"


@dataclass(frozen=True)
class ParsedTag:
    """What a tag written by `Recorder` holds: a `statistic` ("norm", "nonfinite", "ratio",
    "global_norm" or "histogram") of the tensor `name` in `kind` ("gradients",
    "parameters", "activations"; "" for the global norm)."""

    statistic: str
    kind: str
    name: str


def parse_tag(tag: str) -> ParsedTag | None:
    """The tensor and statistic a normlog tag names, or None for any other tag. Reads this
    scheme and the one before it (see the table above), into the same ParsedTag."""
    if tag in (GLOBAL_NORM, _OLD_GLOBAL_NORM):
        return ParsedTag("global_norm", "", "")
    head, _, rest = tag.partition("/")
    if not rest:
        return None
    if head == _RATIO:
        return ParsedTag("ratio", "parameters", rest)
    if head.endswith("_norm") and head[: -len("_norm")] in _KIND_OF:
        return ParsedTag("norm", _KIND_OF[head[: -len("_norm")]], rest)
    if head in _KIND_OF:
        return ParsedTag("histogram", _KIND_OF[head], rest)
    if head == _NONFINITE:
        short, _, name = rest.partition("/")
        return ParsedTag("nonfinite", _KIND_OF[short], name) if short in _KIND_OF and name else None
    return _parse_old_tag(head, rest)


def _parse_old_tag(head: str, rest: str) -> ParsedTag | None:
    if head == _OLD_UPDATES and rest.endswith("/ratio"):
        return ParsedTag("ratio", "parameters", rest[: -len("/ratio")])
    if head not in KINDS:
        return None
    for statistic in ("norm", "nonfinite"):
        if rest.endswith(f"/{statistic}"):
            return ParsedTag(statistic, head, rest[: -len(statistic) - 1])
    return ParsedTag("histogram", head, rest)


def _is_bias(name: str) -> bool:
    """torch's `fc.bias`, Keras' `dense/bias`: the last part of the name."""
    return name.replace("/", ".").rsplit(".", 1)[-1] in ("bias", "beta")


def _weights_and_biases(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The names split into weights (kernels) and biases, each in the given order."""
    return [("weights", [n for n in names if not _is_bias(n)]), ("biases", [n for n in names if _is_bias(n)])]


def tensor_tags(tags: Iterable[str]) -> list[str]:
    """Exact regexes for Custom Scalars, one per tag, in the given order."""
    return [f"^{re.escape(tag)}$" for tag in tags]


def layout(names: dict[Kind, Sequence[str]], ratios: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout (SummaryWriter's `add_custom_scalars` form) for tensors
    `names` by kind and update ratios of `ratios`, each in model order: one category per
    kind, one multiline chart for the weights (kernels) and one for the biases, each line one
    tensor's exact tag, so every layer sits on one chart in model order."""
    categories: dict[str, dict[str, list[Any]]] = {}
    titles = {"gradients": "gradient norms", "parameters": "weight norms", "activations": "activation norms"}
    for kind in KINDS:
        listed = names.get(kind, ())
        if not listed:
            continue
        charts: dict[str, list[Any]] = {}
        for part, chosen in _weights_and_biases(listed):
            if chosen:
                charts[f"{_SHORT[kind]}_norm: {part}"] = ["Multiline", tensor_tags(norm_tag(kind, n) for n in chosen)]
        if kind == "gradients":
            charts[GLOBAL_NORM] = ["Multiline", [f"^{_GLOBAL}/"]]  # and the norm after clipping, where logged
        charts[f"nonfinite/{_SHORT[kind]}: NaN/Inf counts"] = ["Multiline", [f"^{_NONFINITE}/{_SHORT[kind]}/"]]
        categories[f"normlog: {titles[kind]}"] = charts
    if ratios:
        charts = {}
        for part, chosen in _weights_and_biases(ratios):
            if chosen:
                charts[f"{_RATIO}: {part}"] = ["Multiline", tensor_tags(ratio_tag(n) for n in chosen)]
        categories["normlog: update ratios"] = charts
    categories["normlog: health"] = {"health: tensors flagged per rule": ["Multiline", [f"^{_HEALTH}/[^/]+$"]]}
    return categories


# -- what a step records ---------------------------------------------------------------------


@dataclass
class Group:
    """One kind of tensor at one logged step, in model order. `norms` are L2 norms (NaN if
    a value is NaN, else inf if one is infinite), or None where only histograms are due;
    `nonfinite` counts NaN and ±Inf per tensor (None: none counted, every norm finite);
    `rows` are histogram rows (`normlog._rows`) of the finite values, or None. `ndims` gives
    each tensor's number of dimensions by name, where the adapter knows its shape (None: the
    health rules guess a 1-D bias or gain from its name)."""

    kind: Kind
    names: Sequence[str]
    norms: np.ndarray | None = None
    nonfinite: np.ndarray | None = None
    rows: np.ndarray | None = None
    ndims: Mapping[str, int] | None = None


@dataclass
class Updates:
    """One optimizer step's update norms ‖w_after - w_before‖ and weight norms ‖w_before‖, of
    the tensors the optimizer updates (owns): the health rules judge no other as stalled."""

    names: Sequence[str]
    update_norms: np.ndarray
    weight_norms: np.ndarray

    def ratios(self) -> dict[str, float]:
        """The update ratio of each tensor whose weight norm is not 0: a zero weight (a bias
        initialised to zeros) has no relative update, and writing inf would blank its chart."""
        return {
            name: float(update) / float(weight)
            for name, update, weight in zip(self.names, self.update_norms, self.weight_norms, strict=True)
            if weight != 0 and not math.isnan(weight)
        }


# The burst of histograms after a finding (`Recorder.histograms_wanted`): the rules whose
# new episodes start one, and how many step numbers it lasts by default. The findings
# benchmark (benchmarks/findings/RESULTS.md) finds exploding and nonfinite 0-4 logged steps
# after their cause, so 5 steps show the aftermath (the NaN spreading, the norms recovering
# or not) while the ring (`histograms_before_finding`) shows the steps before; an episode
# re-arms only after `Thresholds.rearm_steps` (20) clean steps, so bursts cost at most 5
# histogram steps per 25 logged steps of a run that keeps blowing up.
BURST_RULES = ("exploding", "nonfinite")
HISTOGRAMS_AFTER_FINDING = 5

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


@contextlib.contextmanager
def owned_run(logdir: Any, writer: Writer | None, name: str | None) -> Iterator[tuple[Writer, bool]]:
    """The Writer a watcher writes into, and whether the watcher owns it (and so closes it):
    one it makes at `logdir`, or at `name`'s own run under `logdir` or under the given
    `writer`'s directory; else the given `writer`. If building the watcher inside the block
    fails, a Writer made here is closed again, so a refused watcher leaves no open file."""
    from normlog.writer import Writer  # at call time: writer.py imports this module

    owns = writer is None or name is not None
    if writer is None:
        writer = Writer(run_directory(logdir, name))
    elif name is not None:
        writer = Writer(run_directory(writer.logdir, name))
    try:
        yield writer, owns
    except BaseException:
        if owns:
            writer.close()
        raise


class Recorder:
    """Writes what each logged step recorded, and runs the health rules on it. `writer=None`
    (a rank that does not write) records nothing. A second recorder on a Writer that one
    already writes into warns: both would write the same tags (pass `name=` to each).

    Besides each step's event it writes, once per run and again when new tensors appear,
    the Custom Scalars layout (`layout`), and at histogram steps (paced by `Pace`: at most a
    tenth of one core) and at `close` the norm-by-depth pictures (`normlog._overview`;
    skipped with one warning without matplotlib).

    The histograms around a finding: when a new `exploding` or `nonfinite` episode begins at
    step s (`BURST_RULES`), steps s+1 .. s+`histograms_after` are to carry histograms of
    every tensor, whatever the adapter's histogram cadence: the adapter asks
    `histograms_wanted(step)` before it reduces a step (`histograms_until` is the burst's
    last step, -1 before any). An adapter that writes a step after it started the next ones
    (torch on a GPU) learns of a burst late, and the first steps of it carry no histograms.
    `kept_histograms(s)`, where given, returns the histogram rows the adapter kept of the
    steps up to s that wrote none (its ring), as (step, groups) in step order; they are
    written at their own steps before step s's event. Within each tag steps only ever
    increase, so TensorBoard's reader, which drops a series' records at and after a step
    that arrives again (its preemption rule), keeps every one.
    """

    def __init__(
        self,
        writer: Writer | None,
        guard: Guard,
        bins: int,
        monitor: Monitor | None,
        health_via: Literal["warnings", "logging"] = "warnings",
        histograms_after: int = 0,
        kept_histograms: Callable[[int], Sequence[tuple[int, Sequence[Group]]]] | None = None,
    ) -> None:
        if not isinstance(histograms_after, int) or isinstance(histograms_after, bool):
            raise TypeError(f"histograms_after_finding must be an int (steps), got {histograms_after!r}")
        if histograms_after < 0:
            raise ValueError(f"histograms_after_finding must be an int >= 0 (0: no burst), got {histograms_after}")
        self.writer = writer
        self.histograms_after = histograms_after
        self.histograms_until = -1  # the last step of the current burst of histograms
        self._burst_from = 0
        self._kept_histograms = kept_histograms
        self.monitor = monitor
        self._guard = guard
        self._bins = bins
        self._health_via = health_via
        self._names: dict[Kind, dict[str, None]] = {}  # every tensor seen, by kind, in model order
        self._ratios: dict[str, None] = {}
        self._order: dict[str, int] = {}  # a tensor's place in the model, for the findings' tables
        self._grad_history = DepthHistory()
        self._ratio_history = DepthHistory()
        self._last_step: int | None = None
        self._drawn_at: int | None = None
        self._closed = False
        # The pictures are drawn off the training thread (matplotlib takes ~0.1-1 s a picture),
        # one picture step at a time: the next waits for the last, so memory stays bounded.
        self._drawing: threading.Thread | None = None  # started per picture step, gone when done
        self._pace = Pace()  # at most a tenth of one core: a picture step is skipped, never waited for
        self._drawing_failure: Exception | None = None
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
        """This recorder writes no more (its watcher was unwatched): the last pictures are
        drawn, unless the last logged step already has them. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None and self._last_step is not None and self._drawn_at != self._last_step:
            self._guard.safely(
                lambda: self._draw(self._last_step or 0, last=True), where=" drawing the norm-by-depth picture"
            )
        self.wait_for_drawing()
        self._raise_drawing_failure()
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
        norms to judge. A tensor with no finite value has no histogram (its NaN/Inf count is
        written); a weight of norm 0 has no update ratio."""
        if self.writer is None:
            return
        self._raise_drawing_failure()
        out = list(scalars)
        values = StepValues(step)
        judged = False
        new = self._learn(groups, updates)
        for group in groups:
            if group.norms is not None:
                judged = True
                out += self._norms(step, group, values)
            if group.ndims is not None and group.kind != "activations":
                values.ndims.update(group.ndims)
        histograms = self._histogram_rows(groups)
        if updates is not None:
            values.owned = set(updates.names)
            values.update_ratios = updates.ratios()
            out += [(ratio_tag(name), ratio) for name, ratio in values.update_ratios.items()]
            self._ratio_history.add(step, list(values.update_ratios), list(values.update_ratios.values()))
        for group in groups:
            if group.kind == "gradients" and group.norms is not None and len(group.names):
                self._grad_history.add(step, group.names, group.norms)
        if out or groups or updates is not None:
            self._last_step = step if self._last_step is None else max(step, self._last_step)
        if new:
            self.writer.add_custom_scalars(layout(self._names_by_kind(), list(self._ratios)), step)
        # the rules run before the step's event is written: the histograms kept of the steps
        # before a finding must precede this step's own in the file (see the class docstring)
        findings = self.monitor.observe(values) if judged and self.monitor is not None else []
        self._burst(step, findings)
        if out or histograms is not None:
            self.writer.add_record(step, out, rows=histograms)
        if findings:
            announce(findings, self.writer, self._health_via, self._order)
        # a burst's steps draw no pictures: each takes ~0.1-1 s, and the next waits for it
        if any(group.rows is not None for group in groups) and not self.histograms_wanted(step):
            self._draw(step)

    def histograms_wanted(self, step: int) -> bool:
        """Whether `step` is in a burst of histograms after an exploding or nonfinite finding
        (see the class docstring): the adapter then logs histograms of every tensor at it."""
        return self._burst_from <= step <= self.histograms_until

    def _burst(self, step: int, findings: Sequence[Finding]) -> None:
        """A new exploding or nonfinite episode at `step`: the burst of histograms after it
        starts (or lasts longer), and the histograms kept of the steps before it are written."""
        if not any(finding.rule in BURST_RULES for finding in findings):
            return
        if self.histograms_after:
            if step >= self.histograms_until:  # no burst going on: a new one
                self._burst_from = step + 1
            self.histograms_until = max(self.histograms_until, step + self.histograms_after)
        if self._kept_histograms is not None:
            # a failure here must not cost the step its own event: warned once (strict: raised)
            self._guard.safely(lambda: self._write_kept(step), where=f" writing the histograms kept before step {step}")

    def _write_kept(self, step: int) -> None:
        assert self._kept_histograms is not None and self.writer is not None
        for kept_step, kept_groups in self._kept_histograms(step):
            rows = self._histogram_rows(kept_groups)
            if rows is not None:
                self.writer.add_record(kept_step, rows=rows)

    def _histogram_rows(self, groups: Sequence[Group]) -> HistogramRows | None:
        """The histograms of `groups`' rows, one tag per tensor with a finite value."""
        tags: list[str] = []
        rows: list[np.ndarray] = []
        for group in groups:
            if group.rows is not None:
                kept = group.rows[:, _rows.FINITE] > 0
                tags += [histogram_tag(group.kind, name) for name, keep in zip(group.names, kept, strict=True) if keep]
                rows.append(group.rows[kept])
        return HistogramRows(tags, np.concatenate(rows), self._bins) if tags else None

    def _learn(self, groups: Sequence[Group], updates: Updates | None) -> bool:
        """Note the tensors of this step; whether any is new (the layout must be rewritten)."""
        new = False
        for group in groups:
            known = self._names.setdefault(group.kind, {})
            for name in group.names:
                if name not in known:
                    known[name] = None
                    new = True
                    self._order.setdefault(name, len(self._order))
        if updates is not None:
            for name in updates.names:
                if name not in self._ratios:
                    self._ratios[name] = None
                    new = True
                    self._order.setdefault(name, len(self._order))
        return new

    def _names_by_kind(self) -> dict[Kind, Sequence[str]]:
        return {kind: list(names) for kind, names in self._names.items()}

    def _draw(self, step: int, last: bool = False) -> None:
        """The norm-by-depth pictures of the run so far, at `step`: their data is taken here,
        and they are drawn and written by the drawing thread. A histogram step draws them when
        `Pace` says so (drawing takes at most a tenth of one core, and the training thread never
        waits for it); the `last` step's, at close, always."""
        assert self.writer is not None
        if not last and not self._pace.due():
            return
        self._drawn_at = step
        histories = [
            (self._grad_history, "grad_norm", "gradient norm"),
            (self._ratio_history, "update_ratio", "update ratio ‖Δw‖/‖w‖"),
        ]
        panels = [
            (history.panel(f"log10 {what} by depth (rows: tensors in model order; {len(history)} logged steps)"),
             statistic, what)
            for history, statistic, what in histories
            if len(history)
        ]  # fmt: skip
        if not panels:
            return
        if not matplotlib_available():
            self._guard.warn_once(
                "matplotlib", "normlog: the norm-by-depth images need matplotlib (pip install 'normlog[plot]'); skipped"
            )
            return
        self.wait_for_drawing()
        self._pace.start()
        self._drawing = threading.Thread(
            target=self._draw_panels, args=(self.writer, panels, step), name="normlog-pictures", daemon=True
        )
        _drawing_at_exit(self._drawing)
        self._drawing.start()

    def wait_for_drawing(self) -> None:
        """Return once the pictures being drawn are written."""
        if self._drawing is not None:
            self._drawing.join()
            self._drawing = None

    def _draw_panels(self, writer: Writer, panels: list[tuple[Panel, str, str]], step: int) -> None:
        """On the drawing thread. A failure warns once; with strict=True it is raised on the
        training thread at its next step (as the adapters' background writing does)."""
        try:
            for panel, statistic, what in panels:
                figure = draw_norm_by_depth([panel], label=f"log10 {what}")
                writer.add_figure(image_tag(statistic), figure, step)
                figure.clear()  # a figure holds reference cycles: let its memory go now, not at a later GC
            gc.collect()  # once per picture step (every `histogram_every`): a flat resident size over a long run
        except Exception as error:
            if self._guard.strict:
                self._drawing_failure = error
            else:
                self._guard.warn_once("drawing", f"normlog: drawing the norm-by-depth picture failed: {error!r}")
        finally:
            self._pace.done()

    def _raise_drawing_failure(self) -> None:
        failure, self._drawing_failure = self._drawing_failure, None
        if failure is not None:
            raise failure

    def _norms(self, step: int, group: Group, values: StepValues) -> list[tuple[str, float]]:
        assert group.norms is not None
        kind = group.kind
        norms = [float(n) for n in group.norms]
        out = [(norm_tag(kind, name), norm) for name, norm in zip(group.names, norms, strict=True)]
        if kind == "gradients":
            values.grad_norms = dict(zip(group.names, norms, strict=True))
            values.global_norm = math.sqrt(sum(n * n for n in norms))
            out.append((GLOBAL_NORM, values.global_norm))
        elif kind == "parameters":
            values.weight_norms = dict(zip(group.names, norms, strict=True))
        if group.nonfinite is not None:
            counts = values.grad_nonfinite if kind == "gradients" else values.weight_nonfinite
            for name, count in zip(group.names, group.nonfinite, strict=True):
                if count:
                    out.append((nonfinite_count_tag(kind, name), float(count)))
                    if kind != "activations":
                        counts[name] = float(count)
                    self._guard.warn_once(
                        f"nonfinite:{kind}/{name}",
                        f"normlog: {int(count)} NaN/Inf values in the {kind} of {name!r} at step {step}",
                    )
        return out


_DRAWING: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # picture threads started


def _drawing_at_exit(thread: threading.Thread) -> None:
    """Make interpreter exit wait for `thread` (a picture being drawn) before the Writers close:
    a daemon thread still inside matplotlib while the interpreter tears down can abort the
    process. The hook is registered at the first picture, after the Writers' own exit hooks,
    so it runs before them (atexit runs the last registered first)."""
    if not _DRAWING and not getattr(_drawing_at_exit, "registered", False):
        atexit.register(_finish_drawing)
        _drawing_at_exit.registered = True  # type: ignore[attr-defined]
    _DRAWING.add(thread)


def _finish_drawing() -> None:
    for thread in list(_DRAWING):
        if thread.is_alive():
            thread.join(timeout=60)


def announce(
    findings: list[Finding],
    writer: Writer,
    via: Literal["warnings", "logging"] = "warnings",
    order: Mapping[str, int] | None = None,
) -> None:
    """Tell the user (a HealthWarning, or a `normlog.health` logging record) and TensorBoard:
    per rule and step, one text under `health/<rule>` holding a table of every finding, the
    origin first (tensors in model `order`: for nonfinite, the first tensor whose gradient or
    weight turned NaN/Inf), and one scalar `health/<rule>`, the number of tensors flagged.
    TensorBoard keeps one text per (run, tag, step), so one text per finding would hide all
    but one of them."""
    order = order or {}
    by_rule: dict[tuple[str, int], list[Finding]] = {}
    for finding in findings:
        text = f"normlog [{finding.rule}] {finding.message}"
        if via == "logging":
            logging.getLogger("normlog.health").warning(text)
        else:
            warnings.warn(text, HealthWarning, stacklevel=5)
        by_rule.setdefault((finding.rule, finding.step), []).append(finding)
    scalars: dict[int, list[tuple[str, float]]] = {}
    for (rule, step), found in by_rule.items():
        # model order first; gradients before weights (a NaN gradient poisons the weight after it)
        found.sort(key=lambda f: (order.get(f.tensor, len(order)), f.kind != "gradients"))
        rows = [row for finding in found for row in (finding, *getattr(finding, "members", ()))]
        writer.add_text(finding_text_tag(rule), findings_table(rule, step, rows), step)
        scalars.setdefault(step, []).append((finding_scalar_tag(rule), float(len({f.tensor for f in rows}))))
    for step, values in scalars.items():
        writer.add_record(step, values)


def findings_table(rule: str, step: int, findings: Sequence[Finding]) -> str:
    """A Markdown table of one rule's findings at one step, in the given order (the first is
    the origin; an episode's `members`, the findings it explains, follow it). Names and
    messages go in code spans, which Markdown leaves as they are."""
    lines = [
        f"**{rule}** at step {step}: {len(findings)} finding{'s' if len(findings) != 1 else ''}, origin first",
        "",
        "| # | tensor | of | finding |",
        "|---|---|---|---|",
    ]
    for number, finding in enumerate(findings, 1):
        what = "gradient" if finding.kind == "gradients" else "weight"
        origin = " (origin)" if number == 1 and len(findings) > 1 else ""
        message = finding.message.replace("`", "'").replace("|", "/")
        lines.append(f"| {number}{origin} | `{finding.tensor}` | {what} | `{message}` |")
    return "\n".join(lines)
