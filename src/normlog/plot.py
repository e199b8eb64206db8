"""`normlog plot`'s drawing: every tensor's gradient norm per run, from runs read back by `report`.

Rules: matplotlib is imported only when a figure is drawn (`normlog[plot]`), never by
`import normlog` or `normlog report`.
"""

from __future__ import annotations

import statistics
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlog.report import Run

__all__ = ["plot_gradient_norms"]


def _rolling_median(values: list[float], window: int) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def plot_gradient_norms(runs: list[Run]) -> Any:
    """One panel per run: each tensor's gradient norm over the logged steps, log y axis,
    smoothed by a rolling median and coloured by the tensor's place in the model (dark: first
    layers, light: last), so vanishing shows as bands ordered by depth."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("normlog plot needs matplotlib: pip install 'normlog[plot]'") from error
    figure, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), squeeze=False)
    colormap = plt.get_cmap("viridis")
    for axis, run in zip(axes[:, 0], runs):
        window = max(1, len(run.steps) // 50)
        for position, name in enumerate(run.tensors):
            points = [(s.step, s.grad_norms[name]) for s in run.steps if s.grad_norms.get(name, 0) > 0]
            if points:
                steps, norms = zip(*points)
                color = colormap(position / max(1, len(run.tensors) - 1))
                axis.plot(steps, _rolling_median(list(norms), window), color=color, label=name, linewidth=1)
        axis.set_yscale("log")
        axis.set_title(f"{run.name}: gradient norm per tensor (rolling median of {window})")
        axis.set_xlabel("step")
        if len(run.tensors) <= 12:
            axis.legend(fontsize="x-small", ncol=2)
        elif run.tensors:
            scale = plt.cm.ScalarMappable(cmap=colormap)
            bar = figure.colorbar(scale, ax=axis, ticks=[0, 1], pad=0.01)
            bar.ax.set_yticklabels([run.tensors[0], run.tensors[-1]], fontsize="x-small")
    figure.tight_layout()
    return figure
