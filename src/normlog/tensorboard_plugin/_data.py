"""The dashboard's data: one run's normlog scalars as a tensor-by-step matrix, its findings,
and the map's columns downsampled for the browser.

Rules: numpy and normlog only (no TensorBoard, no framework), so it is tested on its own.
Tags are classified by `normlog._step.parse_tag` alone, never spelled here. The steps and
findings are built exactly as `normlog report` builds them from the same series (tags in the
order they were first logged, tensors in the order the model lists them), so the dashboard's
findings are `normlog report --json`'s.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from normlog._step import parse_tag
from normlog.health import Finding, StepValues, evaluate

__all__ = [
    "MAX_COLUMNS",
    "STATISTICS",
    "RunData",
    "classify",
    "downsample",
    "findings_in_order",
    "load_run",
    "module_of",
    "order_tags",
]

# What the map can colour, in the menu's order: (statistic of the parsed tag, kind).
# "grad_to_weight" is derived: ‖grad‖/‖weight‖ at the steps that logged both.
STATISTICS: dict[str, tuple[str, str] | None] = {
    "grad_norm": ("norm", "gradients"),
    "weight_norm": ("norm", "parameters"),
    "update_ratio": ("ratio", "parameters"),
    "grad_to_weight": None,
}
MAX_COLUMNS = 1000  # the most columns the map is sent; more steps are downsampled (see `downsample`)

# (statistic, kind) of a parsed tag -> the StepValues field it fills, as `normlog report` reads it
_FIELDS = {
    ("norm", "gradients"): "grad_norms",
    ("norm", "parameters"): "weight_norms",
    ("ratio", "parameters"): "update_ratios",
    ("nonfinite", "gradients"): "grad_nonfinite",
    ("nonfinite", "parameters"): "weight_nonfinite",
}
_GLOBAL = "global_norm"
_NORMS = ("grad_norms", "weight_norms")  # the fields whose tensors are the map's rows


def classify(tag: str) -> tuple[str, str] | None:
    """(StepValues field, tensor name) of a normlog scalar tag the dashboard reads, or None."""
    parsed = parse_tag(tag)
    if parsed is None:
        return None
    if parsed.statistic == _GLOBAL:
        return (_GLOBAL, "")
    field_name = _FIELDS.get((parsed.statistic, parsed.kind))
    return None if field_name is None else (field_name, parsed.name)


def module_of(tensor: str) -> str:
    """The module a tensor belongs to: its name up to the last '.' (torch) or '/' (Keras)."""
    cut = max(tensor.rfind("."), tensor.rfind("/"))
    return tensor[:cut] if cut > 0 else ""


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """`layers.10` after `layers.2`: digit runs compare as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def order_tags(tags: Sequence[str], chart_patterns: Sequence[str] | None) -> list[str]:
    """`tags` with their tensors in model order, for a data provider whose listing has lost the
    order they were logged in (TensorBoard's Rust data server lists tags sorted).

    The model order is read from `chart_patterns`, the regexes of the run's Custom Scalars
    layout in chart order (normlog writes one chart per statistic, each listing its tensors in
    model order): a tensor ranks where a pattern first matches one of its norm tags, and a
    module where its first tensor does. Tensors that no pattern names follow, in natural
    order of their names. The sort is stable, so tags of one tensor keep their listing order.
    """
    rank: dict[str, int] = {}
    compiled = []
    for pattern in chart_patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error:
            continue
    norm_tags = [(tag, target[1]) for tag in tags if (target := classify(tag)) and target[0] in _NORMS]
    for regex in compiled:
        for tag, tensor in norm_tags:
            if tensor not in rank and regex.search(tag):
                rank[tensor] = len(rank)
    unranked = sorted({tensor for _, tensor in norm_tags if tensor not in rank}, key=_natural_key)
    for tensor in unranked:
        rank[tensor] = len(rank)
    module_rank: dict[str, int] = {}
    for tensor in sorted(rank, key=rank.__getitem__):
        module_rank.setdefault(module_of(tensor), rank[tensor])

    def key(tag: str) -> tuple[int, int]:
        target = classify(tag)
        tensor = target[1] if target else ""
        if tensor not in rank:
            return (-1, -1)  # the global norm: no row
        return (module_rank[module_of(tensor)], rank[tensor])

    return sorted(tags, key=key)


class RunData:
    """One run, read: `tensors` in model order grouped by module (the map's rows) and `steps`
    (every logged step, the columns). `matrix` gives the map of one statistic; `findings`
    (computed on first use, as the health rules cost far more than the map) are what
    `health.evaluate` finds over the run's steps, built as `normlog report` builds them."""

    def __init__(self, tags: list[tuple[str, str, np.ndarray, np.ndarray]], order: dict[str, int]) -> None:
        self._tags = tags  # (StepValues field, tensor, steps, values), in the order read
        self._order = order  # first seen, first: the order the model lists its tensors
        modules: dict[str, int] = {}
        for tensor in order:
            modules.setdefault(module_of(tensor), len(modules))
        # Grouped by module, each group where its first tensor is, model order within it.
        self.tensors: list[str] = sorted(order, key=lambda t: modules[module_of(t)])
        every = [steps for _, _, steps, _ in tags]
        self.steps: np.ndarray = np.unique(np.concatenate(every)) if every else np.zeros(0, dtype=np.int64)
        self._findings: list[Finding] | None = None

    def matrix(self, statistic: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, present): rows = `tensors`, columns = `steps`; `present` is False where the
        statistic was not logged (the value there is 0 and means nothing)."""
        if statistic == "grad_to_weight":
            grad, grad_present = self.matrix("grad_norm")
            weight, weight_present = self.matrix("weight_norm")
            present = grad_present & weight_present
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(present, grad / np.where(present, weight, 1.0), 0.0)
            return ratio, present
        statistic_kind = STATISTICS[statistic]
        assert statistic_kind is not None
        wanted = _FIELDS[statistic_kind]
        rows = {tensor: row for row, tensor in enumerate(self.tensors)}
        values = np.zeros((len(self.tensors), len(self.steps)))
        present = np.zeros(values.shape, dtype=bool)
        for field_name, tensor, steps, points in self._tags:
            if field_name == wanted and tensor in rows:
                columns = np.searchsorted(self.steps, steps)
                values[rows[tensor], columns] = points
                present[rows[tensor], columns] = True
        return values, present

    @property
    def findings(self) -> list[Finding]:
        if self._findings is None:
            self._findings = evaluate(self.step_values())
        return self._findings

    def step_values(self) -> list[StepValues]:
        """The run's steps as `normlog report` reads them from the same series."""
        per_step: dict[int, StepValues] = {}
        for field_name, tensor, steps, points in self._tags:
            for step, value in zip(steps.tolist(), points.tolist()):
                values = per_step.get(step)
                if values is None:
                    values = per_step[step] = StepValues(step)
                if field_name == _GLOBAL:
                    values.global_norm = value
                else:
                    getattr(values, field_name)[tensor] = value
        ordered = [per_step[s] for s in sorted(per_step)]
        for values in ordered:  # the model's order, as the adapters logged them
            values.grad_norms = _in_order(values.grad_norms, self._order)
            values.weight_norms = _in_order(values.weight_norms, self._order)
        return ordered


def load_run(series: Iterable[tuple[str, Sequence[tuple[int, float]]]]) -> RunData:
    """A run from its scalar series `(tag, [(step, value), ...])`, in the order the tags were
    first logged; tags `parse_tag` does not know are ignored. Steps, tensor order and findings
    follow `normlog report`'s reading of a run."""
    tags: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    order: dict[str, int] = {}
    for tag, points in series:
        target = classify(tag)
        if target is None:
            continue
        field_name, tensor = target
        steps = np.fromiter((step for step, _ in points), dtype=np.int64, count=len(points))
        values = np.fromiter((value for _, value in points), dtype=np.float64, count=len(points))
        tags.append((field_name, tensor, steps, values))
        if field_name in _NORMS:
            order.setdefault(tensor, len(order))
    return RunData(tags, order)


def _in_order(norms: dict[str, float], order: dict[str, int]) -> dict[str, float]:
    """`norms` in `order`, dropping names not in it; in O(n) when already in order."""
    places = [order.get(name, -1) for name in norms]
    if -1 not in places and all(a < b for a, b in itertools.pairwise(places)):
        return norms
    return {name: norms[name] for name in sorted((n for n in norms if n in order), key=order.__getitem__)}


def downsample(
    values: np.ndarray, present: np.ndarray, steps: np.ndarray, columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most `columns` columns of a (tensors x steps) map, each a run of consecutive steps.

    Every NaN and ±Inf survives: a bucket holding one shows it (NaN before +Inf before -Inf).
    Otherwise a bucket shows, per row, its most extreme value, the one whose log10 lies
    farthest from that row's median log10 over the run, so a spike or a dip of one step
    keeps its colour. Buckets are as equal in steps as they can be.

    Returns:
        (values, present, spans): the new map, and for each column the first and last step it
        covers (`spans[c] == [step, step]` where nothing was merged).
    """
    count = len(steps)
    if count <= columns:
        return values, present, np.stack([steps, steps], axis=1)
    starts = (np.arange(columns) * count) // columns
    ends = np.append(starts[1:], count)
    finite = present & np.isfinite(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(finite, np.log10(np.abs(values)), np.nan)
    with warnings.catch_warnings():  # a row with no finite, non-zero value has no median
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(np.where(np.isfinite(logs), logs, np.nan), axis=1, keepdims=True)
    median = np.where(np.isfinite(median), median, 0.0)
    with np.errstate(invalid="ignore"):  # log10(0) is -inf: as far from the median as it gets
        distance = np.where(finite, np.abs(logs - median), -1.0)
    rank = np.where(~present, -3.0, np.where(finite, distance, -2.0))
    rows = np.arange(values.shape[0])
    out_values = np.zeros((values.shape[0], columns))
    out_present = np.zeros((values.shape[0], columns), dtype=bool)
    for column, (start, end) in enumerate(zip(starts, ends)):
        block = values[:, start:end]
        block_present = present[:, start:end]
        nonfinite = block_present & ~np.isfinite(block)
        chosen = block[rows, np.argmax(rank[:, start:end], axis=1)]
        for special in (-math.inf, math.inf, math.nan):  # the last written wins: NaN first
            hit = (nonfinite & (np.isnan(block) if math.isnan(special) else block == special)).any(axis=1)
            chosen = np.where(hit, special, chosen)
        out_values[:, column] = chosen
        out_present[:, column] = block_present.any(axis=1)
    spans = np.stack([steps[starts], steps[ends - 1]], axis=1)
    return out_values, out_present, spans


def findings_in_order(findings: Sequence[Finding]) -> list[tuple[Finding, bool]]:
    """The findings by step, each `nonfinite` episode's origin first at its step, with a flag
    marking that origin. The origin is the finding `Finding.as_dict()` marks so (an `origin`
    field) where it does; otherwise the first non-finite weight in model order, since a
    non-finite weight makes every gradient computed from it non-finite, else the first
    non-finite gradient in model order."""
    origins: set[int] = set()
    by_step: dict[int, list[int]] = {}
    for index, finding in enumerate(findings):
        if finding.rule == "nonfinite":
            by_step.setdefault(finding.step, []).append(index)
    for indexes in by_step.values():
        marked = [i for i in indexes if _marked_origin(findings[i])]
        if marked:
            origins.update(marked)
            continue
        weights = [i for i in indexes if findings[i].kind == "parameters"]
        origins.add((weights or indexes)[0])
    order = sorted(range(len(findings)), key=lambda i: (findings[i].step, i not in origins, i))
    return [(findings[i], i in origins) for i in order]


def _marked_origin(finding: Finding) -> bool:
    origin = finding.as_dict().get("origin")
    if isinstance(origin, bool):
        return origin
    return isinstance(origin, str) and origin == finding.tensor
