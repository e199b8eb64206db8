"""The norm-by-depth picture (`normlog._overview`): its bounded, downsampled history against
every step kept in full, and the drawing shared by the TensorBoard images and `normlog plot`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import normlog
from helpers import requires
from normlog import _step
from normlog._overview import DepthHistory, Pace, draw_norm_by_depth
from normlog._watching import Guard
from tests.tensorboard_server import row_bands


def test_a_short_run_has_a_column_per_step_with_its_log10() -> None:
    history = DepthHistory(width=8)
    values = np.array([[1e-3, 10.0], [2e-3, 20.0], [4e-3, 40.0]])
    for step, row in enumerate(values):
        history.add(step * 10, ["a", "b"], row)
    panel = history.panel("t")
    assert panel.names == ["a", "b"] and panel.steps == [0, 10, 20]
    np.testing.assert_allclose(panel.log10, np.log10(values).T)
    assert not panel.nonfinite.any() and not panel.zero.any() and not panel.missing.any()


@pytest.mark.parametrize("steps", [16, 17, 100, 1000, 5001])
def test_a_long_run_keeps_at_most_twice_the_width_each_column_the_geometric_mean_of_its_steps(steps: int) -> None:
    width = 8
    rng = np.random.default_rng(steps)
    full = 10.0 ** rng.uniform(-6, 1, size=(steps, 3))
    history = DepthHistory(width=width)
    for step in range(steps):
        history.add(step, ["a", "b", "c"], full[step])
    panel = history.panel("t")
    assert len(panel.steps) <= 2 * width and len(history) == steps
    assert panel.steps[0] == 0
    ends = [*panel.steps[1:], steps]
    for column, (start, end) in enumerate(zip(panel.steps, ends, strict=True)):
        expected = np.log10(full[start:end]).mean(axis=0)  # every step kept, here, by the test
        np.testing.assert_allclose(panel.log10[:, column], expected, rtol=1e-9)
    # equal spans: each column covers the same number of steps, but the last one so far
    assert len({b - a for a, b in zip(panel.steps[:-1], ends[:-1], strict=True)}) <= 1


def test_nan_and_inf_stay_visible_once_merged_zeros_and_missing_steps_have_their_own_cells() -> None:
    history = DepthHistory(width=2)
    for step in range(16):  # 4 columns of 4 steps once merged
        values = {"w": 1.0, "dead": 0.0}
        if step == 5:
            values["w"] = math.nan
        if step >= 12:
            values["late"] = 2.0
        history.add(step, list(values), list(values.values()))
    panel = history.panel("t")
    assert panel.names == ["w", "dead", "late"] and panel.steps == [0, 4, 8, 12]
    assert panel.nonfinite[0].tolist() == [False, True, False, False]  # one NaN in four steps still shows
    assert panel.zero[1].all() and not panel.zero[0].any()
    assert panel.missing[2].tolist() == [True, True, True, False]
    assert panel.log10[2, 3] == pytest.approx(math.log10(2.0))


def test_the_picture_has_a_band_per_tensor_and_special_colours() -> None:
    requires("matplotlib")
    history = DepthHistory()
    names = [f"layers.{i}.weight" for i in range(7)]
    for step in range(40):
        norms = 10.0 ** -np.arange(7.0)
        if step > 30:
            norms[3] = math.inf
        history.add(step, names, norms)
    figure = draw_norm_by_depth([history.panel("t")])
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    png = buffer.getvalue()
    assert row_bands(png) == len(names)
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")[..., :3]
    red = np.all(np.abs(pixels - np.array([0.86, 0.08, 0.24])) < 0.02, axis=-1)
    assert red.sum() > 50  # the Inf cells of layers.3


def test_normlog_plot_draws_the_same_picture_from_the_logs(tmp_path) -> None:
    requires("matplotlib")
    requires("tensorboard")
    from normlog.report import main

    names = [f"block.{i}.weight" for i in range(5)]
    with normlog.Writer(tmp_path / "run") as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = _step.Recorder(writer, Guard(False), 5, None)
        for step in range(30):
            record.record(step, [_step.Group("gradients", names, 10.0 ** -np.arange(5.0) * (1 + step))])
        record.close()
    target = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path), "-o", str(target)]) == 0
    assert row_bands(target.read_bytes()) == len(names)


def test_pace_keeps_drawing_to_its_share_of_one_core() -> None:
    now = [0.0]
    pace = Pace(share=0.1, clock=lambda: now[0])
    assert pace.due()  # the first picture is always drawn
    pace.start()
    now[0] = 0.5
    assert not pace.due()  # one is being drawn: the training thread never waits for it
    pace.done()  # it took 0.5 s: the next is due 5 s after the last started
    now[0] = 4.9
    assert not pace.due()
    now[0] = 5.0
    assert pace.due()
    pace.start()
    now[0] = 5.1
    pace.done()  # a faster picture: due again 1 s after it started
    now[0] = 6.1
    assert pace.due()
    with pytest.raises(ValueError, match="fraction of one core"):
        Pace(share=0)
