"""`normlog plot`'s drawing: the norm-by-depth picture of each run read back by `report`.

Rules: the drawing is `normlog._overview.draw_norm_by_depth`, the same function that draws
the TensorBoard images online, fed through the same `DepthHistory`; matplotlib is imported
only when a figure is drawn (`normlog[plot]`), never by `import normlog` or `normlog report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from normlog._overview import DepthHistory, Panel, draw_norm_by_depth

if TYPE_CHECKING:
    from normlog.report import Run

__all__ = ["panels", "plot_gradient_norms"]


def panels(run: Run) -> list[Panel]:
    """A run's gradient norms by depth, and its update ratios where it has any."""
    grads, ratios = DepthHistory(), DepthHistory()
    for values in run.steps:
        if values.grad_norms:
            grads.add(values.step, list(values.grad_norms), list(values.grad_norms.values()))
        if values.update_ratios:
            ratios.add(values.step, list(values.update_ratios), list(values.update_ratios.values()))
    found = [grads.panel(f"{run.name}: log10 gradient norm by depth ({len(grads)} logged steps)")]
    if len(ratios):
        found.append(ratios.panel(f"{run.name}: log10 update ratio by depth ({len(ratios)} logged updates)"))
    return found


def plot_gradient_norms(runs: list[Run]) -> Any:
    """One heat map per run (and one of its update ratios, if logged): a row per tensor in
    model order (first layers at the top), a column per logged step, colour log10 of the
    norm, NaN/Inf red, 0 black; vanishing shows as rows darkening towards the top."""
    try:
        return draw_norm_by_depth([panel for run in runs for panel in panels(run)])
    except ImportError as error:
        raise SystemExit("normlog plot needs matplotlib: pip install 'normlog[plot]'") from error
