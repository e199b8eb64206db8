"""The norm-by-depth picture: one row per tensor in model order, one column per logged step.

Rules: numpy only at import; matplotlib is imported when a picture is drawn (`normlog[plot]`),
never by `import normlog`. `DepthHistory` keeps a bounded, downsampled history (at most
`2 * width` columns, whatever the run's length); `draw_norm_by_depth` is the one drawing
function, shared by the Recorder's TensorBoard images and `normlog plot`. `Pace` keeps the
pictures' drawing to a bounded share of one core, however often histograms are logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any

import numpy as np

__all__ = ["NONFINITE_COLOR", "ZERO_COLOR", "DepthHistory", "Pace", "Panel", "draw_norm_by_depth"]

# Special cells, apart from viridis' blue-green-yellow scale: NaN/Inf in red (the question
# "where did the NaN appear" is answered by the leftmost red cell), an exact 0 in black
# (a dead layer) and a step where the tensor was not logged in light grey.
NONFINITE_COLOR = (0.86, 0.08, 0.24, 1.0)
ZERO_COLOR = (0.0, 0.0, 0.0, 1.0)
MISSING_COLOR = (0.92, 0.92, 0.92, 1.0)
SEPARATED = 80  # up to this many rows, white lines part them (beyond, they would hide the rows)
WIDTH = 120  # columns kept: at 8 inches and 100 dpi, ~5 pixels a column
# 800 pixels wide: TensorBoard's cards show ~400, so labels and colours still read at half size
FIGURE_WIDTH = 8.0


class Pace:
    """Whether a picture is due: drawing takes ~0.1-1.5 s of CPU (more with more tensors), so
    at `histogram_every=1` drawing at every step cost more than training (MobileNetV2 on CPU:
    1.5 s a step). A picture is due when none is being drawn and, since the last one started,
    at least `1 / share` times its drawing time has passed: drawing then takes at most `share`
    of one core, whatever the histogram cadence. The first is always due."""

    def __init__(self, share: float = 0.1, clock: Callable[[], float] | None = None) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"Pace: share is the fraction of one core pictures may take, in (0, 1]; got {share!r}")
        self.share = share
        self._clock = clock if clock is not None else monotonic
        self._started: float | None = None
        self._took = 0.0
        self._drawing = False

    def due(self) -> bool:
        if self._drawing:
            return False
        return self._started is None or self._clock() - self._started >= self._took / self.share

    def start(self) -> None:
        """A picture starts being drawn (call on the thread that decides)."""
        self._started = self._clock()
        self._drawing = True

    def done(self) -> None:
        """The picture is written (call on the drawing thread)."""
        if self._started is not None:
            self._took = self._clock() - self._started
        self._drawing = False


@dataclass
class Panel:
    """One picture's data: `log10` (rows x columns, NaN where not a positive finite value),
    and masks of the NaN/Inf, zero and missing cells; `steps[j]` is column j's first step."""

    title: str
    names: list[str]
    steps: list[int]
    log10: np.ndarray
    nonfinite: np.ndarray
    zero: np.ndarray
    missing: np.ndarray


class DepthHistory:
    """A statistic (a gradient norm, an update ratio) per tensor and logged step, downsampled
    to at most `2 * width` columns: each column covers `stride` logged steps, and when the
    columns are full, neighbours merge and the stride doubles. A merged cell is NaN/Inf if any
    of its steps was, else the geometric mean of its positive values, else 0 if it saw a 0."""

    def __init__(self, width: int = WIDTH) -> None:
        self.width = width
        self.names: list[str] = []
        self._rows: dict[str, int] = {}
        self._cache: dict[tuple[str, ...], np.ndarray] = {}
        self.stride = 1
        # per column: the first step, and per (row, column) sums: log10 of positive finite
        # values, how many there were, zeros and NaN/Inf seen
        self._steps: list[int] = []
        self._filled: list[int] = []  # logged steps in each column so far
        self._cells = np.zeros((4, 0, 0))

    def __len__(self) -> int:
        return sum(self._filled)

    def add(self, step: int, names: Sequence[str], values: Sequence[float] | np.ndarray) -> None:
        """One logged step's `values` of tensors `names`; new names become new rows at the end."""
        rows = self._row_numbers(names)
        values = np.asarray(values, dtype=np.float64)
        if not self._steps or self._filled[-1] >= self.stride:
            if len(self._steps) == 2 * self.width:
                self._halve()
            if not self._steps or self._filled[-1] >= self.stride:
                self._steps.append(step)
                self._filled.append(0)
        self._grow()
        column = len(self._steps) - 1
        self._filled[column] += 1
        finite = np.isfinite(values)
        positive = finite & (values > 0)
        self._cells[0, rows[positive], column] += np.log10(values[positive])
        self._cells[1, rows[positive], column] += 1
        self._cells[2, rows[finite & (values == 0)], column] += 1
        self._cells[3, rows[~finite], column] += 1

    def _row_numbers(self, names: Sequence[str]) -> np.ndarray:
        """Each name's row, cached by the names' tuple: a step logs the same tensors as the last."""
        key = tuple(names)
        rows = self._cache.get(key)
        if rows is None:
            for name in key:
                if name not in self._rows:
                    self._rows[name] = len(self.names)
                    self.names.append(name)
            if len(self._cache) > 16:  # the tensors with a gradient can change from step to step
                self._cache.clear()
            rows = self._cache[key] = np.array([self._rows[name] for name in key], dtype=np.intp)
        return rows

    def _grow(self) -> None:
        rows, columns = len(self.names), len(self._steps)
        if self._cells.shape[1] < rows or self._cells.shape[2] < columns:
            grown = np.zeros((4, max(rows, self._cells.shape[1]), max(2 * self.width, self._cells.shape[2])))
            grown[:, : self._cells.shape[1], : self._cells.shape[2]] = self._cells
            self._cells = grown

    def _halve(self) -> None:
        """Merge neighbouring columns: the history keeps its size, each column twice the steps."""
        columns = len(self._steps)
        merged = self._cells[:, :, 0:columns:2] + self._cells[:, :, 1:columns:2]
        self._cells[:, :, : columns // 2] = merged
        self._cells[:, :, columns // 2 :] = 0
        self._steps = self._steps[0::2]
        self._filled = [a + b for a, b in zip(self._filled[0::2], self._filled[1::2], strict=True)]
        self.stride *= 2

    def panel(self, title: str) -> Panel:
        """The history so far, ready to draw."""
        rows, columns = len(self.names), len(self._steps)
        total, count, zeros, bad = self._cells[:, :rows, :columns]
        with np.errstate(invalid="ignore", divide="ignore"):
            log10 = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        nonfinite = bad > 0
        zero = ~nonfinite & (count == 0) & (zeros > 0)
        missing = (count + zeros + bad) == 0
        return Panel(title, list(self.names), list(self._steps), log10, nonfinite, zero, missing)


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def matplotlib_available() -> bool:
    return _figure_class() is not None


def draw_norm_by_depth(panels: Sequence[Panel], label: str = "log10") -> Any:
    """One heat map per panel, stacked: rows are tensors (first layer at the top), columns
    logged steps, colour log10 of the value on one scale per panel; NaN/Inf red, 0 black,
    not logged light grey. Returns a matplotlib Figure (no pyplot, so no GUI backend).

    Raises:
        ImportError: matplotlib is not installed (`pip install 'normlog[plot]'`).
    """
    figure_class = _figure_class()
    if figure_class is None:
        raise ImportError("the norm-by-depth picture needs matplotlib: pip install 'normlog[plot]'")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    heights = [max(2.0, 0.17 * len(p.names) + 1.2) for p in panels]
    longest = max((len(name) for p in panels for name in p.names), default=8)
    figure = figure_class(figsize=(FIGURE_WIDTH, sum(heights)), dpi=100)
    left = min(0.45, 0.02 + 0.7 * longest / (FIGURE_WIDTH * 9))  # ~0.7 inch per 9 characters at 8 points
    axes_list = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    figure.subplots_adjust(left=left, right=0.9, top=1 - 0.5 / sum(heights), bottom=0.45 / sum(heights), hspace=0.55)
    colormap = colormaps["viridis"]
    for axes, panel in zip(axes_list, panels, strict=True):
        finite = panel.log10[np.isfinite(panel.log10)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        scale = Normalize(low, high)
        rgba = colormap(scale(np.nan_to_num(panel.log10, nan=low)))
        rgba[panel.zero] = ZERO_COLOR
        rgba[panel.missing] = MISSING_COLOR
        rgba[panel.nonfinite] = NONFINITE_COLOR
        if not panel.names:
            rgba = np.ones((1, 1, 4))
        axes.imshow(rgba, aspect="auto", interpolation="nearest")
        if 1 < len(panel.names) <= SEPARATED:  # white lines between rows: each tensor its own band
            axes.hlines(np.arange(len(panel.names) - 1) + 0.5, -0.5, len(panel.steps) - 0.5, colors="white", lw=1.5)
        axes.set_title(panel.title, fontsize=10, loc="left")
        every = max(1, math.ceil(len(panel.names) / 40))  # at most ~40 labels, readable at 8 points
        axes.set_yticks(range(0, len(panel.names), every))
        axes.set_yticklabels(panel.names[::every], fontsize=8)
        columns = len(panel.steps)
        ticks = sorted({round(i * (columns - 1) / 6) for i in range(7)}) if columns else []
        axes.set_xticks(ticks)
        axes.set_xticklabels([str(panel.steps[i]) for i in ticks], fontsize=7)
        axes.set_xlabel("step", fontsize=8, labelpad=1)
        bar = figure.colorbar(ScalarMappable(scale, colormap), ax=axes, pad=0.01, fraction=0.03)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    legend = [Patch(color=NONFINITE_COLOR, label="NaN/Inf"), Patch(color=ZERO_COLOR, label="0")]
    legend.append(Patch(color=MISSING_COLOR, label="not logged"))
    figure.legend(handles=legend, loc="upper right", ncol=3, fontsize=7, frameon=False)
    return figure
