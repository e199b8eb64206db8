"""The step record (`normlog._step`), with no framework: what one logged step writes, read back
with TensorBoard's reader, and the tag scheme that `normlog report` parses."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

import normlog
from helpers import read_events, requires, scalars
from normlog import _overview, _rows, _step
from normlog._watching import Guard
from normlog.health import Monitor

NAMES = ["layer0.weight", "layer0.bias", "out.weight"]


def recorder(writer: normlog.Writer, health: bool = True, bins: int = 5) -> _step.Recorder:
    return _step.Recorder(writer, Guard(strict=True), bins, Monitor() if health else None)


def test_a_step_writes_norms_global_norm_nonfinite_counts_histograms_and_update_ratios(tmp_path) -> None:
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(4, 3)), rng.normal(size=3), np.array([1.0, np.nan, np.inf, 2.0])]
    weights = [rng.normal(size=(4, 3)), np.zeros(3), rng.normal(size=4)]
    rows = np.stack([_rows.core_row(g, 5) for g in grads])
    grad_norms = np.array([normlog.l2_norm(g) for g in grads])
    weight_norms = np.array([normlog.l2_norm(w) for w in weights])
    updates = np.array([0.1, 0.2, 0.3])
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder(writer, health=False).record(
            7,
            [
                _step.Group("gradients", NAMES, grad_norms, _rows.nonfinite(rows), rows),
                _step.Group("parameters", NAMES, weight_norms, np.zeros(3)),
            ],
            _step.Updates(NAMES, updates, weight_norms),
            scalars=[(_step.LOSS_SCALE, 1024.0)],
        )
    events = read_events(str(tmp_path))
    for name, grad, weight in zip(NAMES, grads, weights, strict=True):
        got = scalars(events, _step.norm_tag("gradients", name))[7]
        assert (math.isnan(got) and np.isnan(grad).any()) or got == pytest.approx(np.linalg.norm(grad), rel=1e-6)
        assert scalars(events, _step.norm_tag("parameters", name))[7] == pytest.approx(np.linalg.norm(weight), rel=1e-6)
    assert math.isnan(scalars(events, _step.GLOBAL_NORM)[7])  # a NaN gradient makes the global norm NaN, as torch's
    assert scalars(events, _step.nonfinite_count_tag("gradients", "out.weight"))[7] == 2
    assert scalars(events, _step.LOSS_SCALE)[7] == 1024.0
    # update ratios: ‖Δw‖/‖w‖, and none for the zero bias (inf would blank its chart)
    assert scalars(events, _step.ratio_tag("layer0.weight"))[7] == pytest.approx(0.1 / weight_norms[0], rel=1e-6)
    assert _step.ratio_tag("layer0.bias") not in events.Tags()["scalars"]
    # histograms: the core's, read back bucket for bucket
    for name, grad in zip(NAMES, grads, strict=True):
        (event,) = events.Histograms(_step.histogram_tag("gradients", name))
        expected = normlog.histogram(grad, 5)
        assert event.step == 7
        assert event.histogram_value.num == expected.num and event.histogram_value.max == expected.max
    assert [str(w.message) for w in caught if "NaN/Inf" in str(w.message)] == [
        "normlog: 2 NaN/Inf values in the gradients of 'out.weight' at step 7"
    ]


def test_the_health_rules_see_what_the_step_wrote(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = recorder(writer)
        for step in range(3):
            counts = np.array([0.0, 0.0, 3.0 if step == 2 else 0.0])
            norms = np.array([1.0, 1.0, math.nan if step == 2 else 1.0])
            record.record(step, [_step.Group("gradients", NAMES, norms, counts)])
    assert record.monitor is not None
    assert [(f.rule, f.tensor, f.step) for f in record.monitor.findings] == [("nonfinite", "out.weight", 2)]
    texts = read_events(str(tmp_path)).Tensors(_step.finding_text_tag("nonfinite") + "/text_summary")
    assert len(texts) == 1


def test_histograms_alone_and_a_writer_none_write_no_norms_and_judge_nothing(tmp_path) -> None:
    rows = np.stack([_rows.core_row(np.arange(5.0) + i, 4) for i in range(3)])
    with normlog.Writer(tmp_path) as writer:
        record = recorder(writer, bins=4)
        record.record(3, [_step.Group("parameters", NAMES, rows=rows)])
        _step.Recorder(None, Guard(False), 4, Monitor()).record(3, [_step.Group("gradients", NAMES, np.ones(3))])
    events = read_events(str(tmp_path))
    assert events.Tags()["scalars"] == []
    assert sorted(events.Tags()["histograms"]) == sorted(_step.histogram_tag("parameters", n) for n in NAMES)
    assert record.monitor is not None and record.monitor.findings == []


def test_a_second_recorder_on_one_writer_warns_until_the_first_is_closed(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer:
        first = recorder(writer)
        with pytest.warns(RuntimeWarning, match="name="):
            second = recorder(writer)
        first.close()
        second.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            recorder(writer)


def test_a_named_watcher_writes_its_own_run() -> None:
    assert _step.run_directory("runs/gan", None) == "runs/gan"
    assert _step.run_directory("runs/gan", "generator").replace("\\", "/") == "runs/gan/generator"
    for bad in ("", "..", "a/b", 3):
        with pytest.raises(ValueError, match="name"):
            _step.run_directory("runs", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tag", "parsed"),
    [
        # this scheme
        ("global/grad_norm", ("global_norm", "", "")),
        ("grad_norm/layers.0.weight", ("norm", "gradients", "layers.0.weight")),
        ("weight_norm/dense/kernel", ("norm", "parameters", "dense/kernel")),
        ("act_norm/fc", ("norm", "activations", "fc")),
        ("nonfinite/grad/dense/kernel", ("nonfinite", "gradients", "dense/kernel")),
        ("nonfinite/weight/fc.bias", ("nonfinite", "parameters", "fc.bias")),
        ("update_ratio/dense/kernel", ("ratio", "parameters", "dense/kernel")),
        ("grad/dense/kernel", ("histogram", "gradients", "dense/kernel")),
        ("weight/fc.weight", ("histogram", "parameters", "fc.weight")),
        # the scheme before it (logs written by the previous version)
        ("gradients/global_norm", ("global_norm", "", "")),
        ("gradients/layers.0.weight/norm", ("norm", "gradients", "layers.0.weight")),
        ("parameters/dense/kernel/norm", ("norm", "parameters", "dense/kernel")),
        ("gradients/dense/kernel/nonfinite", ("nonfinite", "gradients", "dense/kernel")),
        ("updates/dense/kernel/ratio", ("ratio", "parameters", "dense/kernel")),
        ("gradients/dense/kernel", ("histogram", "gradients", "dense/kernel")),
        ("activations/fc/norm", ("norm", "activations", "fc")),
        # anything else
        ("loss", None),
        ("health/nonfinite", None),
        ("health/nonfinite/x", None),
        ("normlog/grad_norm_by_depth", None),
        ("nonfinite/other/x", None),
        ("gradients", None),
        ("grad_norm", None),
    ],
)
def test_parse_tag_reads_back_every_tag_the_step_writes(tag: str, parsed: tuple[str, str, str] | None) -> None:
    got = _step.parse_tag(tag)
    assert (got if got is None else (got.statistic, got.kind, got.name)) == parsed


def test_every_tag_maker_round_trips_through_parse_tag() -> None:
    for kind in ("gradients", "parameters", "activations"):
        for name in ("w", "encoder/layer.0/attn.weight"):
            made = ((_step.norm_tag(kind, name), "norm"), (_step.histogram_tag(kind, name), "histogram"))
            for tag, statistic in made:
                parsed = _step.parse_tag(tag)
                assert parsed is not None and (parsed.statistic, parsed.kind, parsed.name) == (statistic, kind, name)
            parsed = _step.parse_tag(_step.nonfinite_count_tag(kind, name))
            assert parsed is not None and (parsed.statistic, parsed.kind, parsed.name) == ("nonfinite", kind, name)
    parsed = _step.parse_tag(_step.ratio_tag("w"))
    assert parsed is not None and (parsed.statistic, parsed.name) == ("ratio", "w")
    assert _step.parse_tag(_step.GLOBAL_NORM) == _step.ParsedTag("global_norm", "", "")


def test_rows_merge_like_the_core_merges_parts_of_one_tensor() -> None:
    rng = np.random.default_rng(3)
    whole = np.concatenate([rng.normal(size=50), [np.nan, np.inf], rng.normal(size=30) * 5, []])
    parts = [whole[:20], whole[20:60], whole[60:], whole[:0]]
    finite = whole[np.isfinite(whole)]
    span = (float(finite.min()), float(finite.max()))
    part_rows = []
    for part in parts:
        hist = normlog.histogram(part, 6, range=span)
        part_rows.append(_rows.from_histogram(hist, 6))
    merged = _rows.histograms(_rows.merge(np.stack(part_rows))[None], 6)[0]
    # as Histogram.merge: the counts, bounds and edges exactly; sums up to their rounding
    expected = normlog.histogram(whole, 6).merge()
    assert merged == normlog.histogram(parts[0], 6, range=span).merge(
        *(normlog.histogram(part, 6, range=span) for part in parts[1:])
    )
    np.testing.assert_array_equal(merged.edges, expected.edges)
    np.testing.assert_array_equal(merged.counts, expected.counts)
    assert merged.sum == pytest.approx(expected.sum, rel=1e-12)


# -- what TensorBoard shows at a glance ------------------------------------------------------------


def test_a_tensor_with_no_finite_value_writes_no_histogram_but_its_count(tmp_path) -> None:
    grads = [np.full((2, 3), np.nan), np.array([np.inf, -np.inf]), np.array([1.0, np.nan])]
    names = ["a.weight", "a.bias", "b.weight"]
    rows = np.stack([_rows.core_row(g, 5) for g in grads])
    norms = np.array([normlog.l2_norm(g) for g in grads])
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorder(writer, health=False).record(4, [_step.Group("gradients", names, norms, _rows.nonfinite(rows), rows)])
    events = read_events(str(tmp_path))
    # torch's count of NaN/Inf, and a histogram only where a value is finite
    assert events.Tags()["histograms"] == [_step.histogram_tag("gradients", "b.weight")]
    for name, grad in zip(names, grads, strict=True):
        assert scalars(events, _step.nonfinite_count_tag("gradients", name))[4] == np.count_nonzero(~np.isfinite(grad))


def test_findings_of_a_step_are_one_table_per_rule_origin_first_and_one_count(tmp_path) -> None:
    names = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "head.weight"]
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = recorder(writer)
        record.record(0, [_step.Group("gradients", names, np.ones(4), np.zeros(4))])
        grads = np.array([1.0, math.nan, math.nan, math.inf])
        weights = np.array([math.nan, 1.0, 1.0, 1.0])
        record.record(
            1,
            [
                _step.Group("gradients", names, grads, np.array([0.0, 2, 5, 1])),
                _step.Group("parameters", names, weights, np.array([3.0, 0, 0, 0])),
            ],
        )
    assert record.monitor is not None
    # every finding, and every finding an episode holds as its members (health's grouping)
    every = [row for f in record.monitor.findings for row in (f, *getattr(f, "members", ()))]
    assert {f.tensor for f in every} == set(names)
    assert [str(w.message) for w in caught if "normlog [nonfinite]" in str(w.message)]
    events = read_events(str(tmp_path))
    (text,) = events.Tensors(_step.finding_text_tag("nonfinite") + "/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    # the origin first: enc.0, the first tensor in model order that turned NaN (its weight)
    assert rows[0].split("`")[1] == "enc.0.weight" and "(origin)" in rows[0] and "weight" in rows[0].split("|")[3]
    assert sorted(row.split("`")[1] for row in rows) == sorted(f.tensor for f in every)
    for finding in every:
        assert finding.message in table
    assert scalars(events, _step.finding_scalar_tag("nonfinite")) == {1: 4.0}
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("health/nonfinite/")]


def test_the_custom_scalars_layout_is_written_once_and_again_when_tensors_appear(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer:
        record = recorder(writer, health=False)
        for step in range(3):
            record.record(step, [_step.Group("gradients", NAMES[:2], np.ones(2))])
        record.record(3, [_step.Group("gradients", NAMES, np.ones(3))], _step.Updates(NAMES, np.ones(3), np.ones(3)))
        record.record(4, [_step.Group("gradients", NAMES, np.ones(3))])
    events = read_events(str(tmp_path))
    layouts = events.Tensors("custom_scalars__config__")
    assert [event.step for event in layouts] == [0, 3]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(layouts[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    tags = events.Tags()["scalars"]

    def matched(regexes: list[str]) -> list[str]:
        return [tag for regex in regexes for tag in tags if re.match(regex, tag)]

    assert matched(charts["grad_norm: weights"]) == [
        _step.norm_tag("gradients", n) for n in ("layer0.weight", "out.weight")
    ]
    assert matched(charts["grad_norm: biases"]) == [_step.norm_tag("gradients", "layer0.bias")]
    assert matched(charts["update_ratio: weights"]) == [_step.ratio_tag("layer0.weight"), _step.ratio_tag("out.weight")]
    assert matched(charts[_step.GLOBAL_NORM]) == [_step.GLOBAL_NORM]


def test_the_pictures_at_each_histogram_step_and_at_close(tmp_path, monkeypatch) -> None:
    requires("matplotlib")
    from tests.tensorboard_server import row_bands

    # a clock under the test's control: an hour passes between steps, so Pace finds every
    # histogram step due once the last picture is written
    now = [0.0]
    monkeypatch.setattr(_overview, "monotonic", lambda: now[0])
    rows = np.stack([_rows.core_row(np.arange(4.0) + i, 5) for i in range(3)])
    with normlog.Writer(tmp_path) as writer:
        record = recorder(writer, health=False)
        for step in range(12):
            group = _step.Group("gradients", NAMES, 10.0 ** -np.arange(3.0), rows=rows if step % 5 == 0 else None)
            record.record(step, [group], _step.Updates(NAMES, np.ones(3), np.ones(3)))
            record.wait_for_drawing()
            now[0] += 3600.0
        record.close()
        record.close()  # a second close draws nothing more
    events = read_events(str(tmp_path))
    for statistic in ("grad_norm", "update_ratio"):
        images = events.Images(_step.image_tag(statistic))
        assert [image.step for image in images] == [0, 5, 10, 11]
        assert images[-1].width == 800
        assert row_bands(images[-1].encoded_image_string) == len(NAMES)


def test_pictures_take_a_bounded_share_of_a_core_and_the_last_step_is_always_drawn(tmp_path, monkeypatch) -> None:
    """With histograms every step, a clock that moves 0.5 s a step and a picture that takes
    0.5 s of it, Pace (a tenth of one core) draws every 9th step; close draws the last."""
    requires("matplotlib")
    now = [0.0]
    monkeypatch.setattr(_overview, "monotonic", lambda: now[0])
    real = _overview.draw_norm_by_depth

    def slow(*args: object, **kwargs: object) -> object:
        now[0] += 0.5
        return real(*args, **kwargs)

    monkeypatch.setattr(_step, "draw_norm_by_depth", slow)
    rows = np.stack([_rows.core_row(np.arange(4.0) + i, 5) for i in range(3)])
    with normlog.Writer(tmp_path) as writer:
        record = recorder(writer, health=False)
        for step in range(50):
            record.record(step, [_step.Group("gradients", NAMES, 10.0 ** -np.arange(3.0), rows=rows)])
            record.wait_for_drawing()
            now[0] += 0.5
        record.close()
    steps = [image.step for image in read_events(str(tmp_path)).Images(_step.image_tag("grad_norm"))]
    assert steps[0] == 0 and steps[-1] == 49
    # each picture takes 0.5 s: the next is due 5 s after it started, 9 steps and a picture
    # later (the steps' 4.5 s and its own 0.5 s); close draws step 49
    assert steps == [0, 9, 18, 27, 36, 45, 49]


def test_without_matplotlib_the_pictures_are_skipped_with_one_warning(tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rows = np.stack([_rows.core_row(np.arange(4.0), 5) for _ in range(3)])
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = recorder(writer, health=False)
        for step in range(3):
            record.record(step, [_step.Group("gradients", NAMES, np.ones(3), rows=rows)])
        record.close()
    assert [str(w.message) for w in caught if "matplotlib" in str(w.message)] == [
        "normlog: the norm-by-depth images need matplotlib (pip install 'normlog[plot]'); skipped"
    ]
    events = read_events(str(tmp_path))
    assert events.Tags()["images"] == [] and len(events.Tags()["histograms"]) == 3


def test_report_reads_the_old_and_the_new_scheme_alike(tmp_path) -> None:
    # the same norms, once as the previous version wrote them and once as the Recorder does
    from normlog.report import load_runs

    grads = {"layer0.weight": [1.0, 0.5, 2.0], "layer0.bias": [0.1, 0.2, 0.3]}
    weights = {"layer0.weight": [3.0, 3.1, 3.2], "layer0.bias": [0.0, 0.01, 0.02]}
    with normlog.Writer(tmp_path / "old") as writer:
        for step in range(3):
            for name in grads:  # the previous version's tags, spelled out as it wrote them
                writer.add_scalar("gradients/" + name + "/norm", grads[name][step], step)
                writer.add_scalar("parameters/" + name + "/norm", weights[name][step], step)
                writer.add_scalar("updates/" + name + "/ratio", 0.01, step)
            writer.add_scalar("gradients/global_norm", math.hypot(*(g[step] for g in grads.values())), step)
    with normlog.Writer(tmp_path / "new") as writer:
        record = recorder(writer, health=False)
        names = list(grads)
        for step in range(3):
            record.record(
                step,
                [
                    _step.Group("gradients", names, np.array([grads[n][step] for n in names])),
                    _step.Group("parameters", names, np.array([weights[n][step] for n in names])),
                ],
                _step.Updates(
                    names,
                    np.array([weights[n][step] * 0.01 for n in names]),
                    np.array([weights[n][step] for n in names]),
                ),
            )
    runs, problems = load_runs(str(tmp_path))
    assert problems == [] and [run.name for run in runs] == ["new", "old"]
    new, old = runs
    assert new.tensors == old.tensors == names
    for got_new, got_old in zip(new.steps, old.steps, strict=True):
        assert got_new.grad_norms == pytest.approx(got_old.grad_norms)
        assert got_new.weight_norms == pytest.approx(got_old.weight_norms)
        assert got_new.global_norm == pytest.approx(got_old.global_norm)
    assert new.steps[1].update_ratios == pytest.approx({"layer0.weight": 0.01, "layer0.bias": 0.01})
    assert "layer0.bias" not in new.steps[0].update_ratios  # a zero weight has no ratio


def test_a_nonfinite_finding_starts_a_burst_and_the_kept_histograms_come_first(tmp_path) -> None:
    rows = np.stack([_rows.core_row(np.arange(4.0) * (k + 1), 5) for k in range(3)])
    asked: list[int] = []

    def kept(step: int) -> list[tuple[int, list[_step.Group]]]:
        asked.append(step)
        return [(s, [_step.Group("gradients", NAMES, rows=rows)]) for s in (step - 1, step)]

    wanted = {}
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = _step.Recorder(writer, Guard(strict=True), 5, Monitor(), histograms_after=3, kept_histograms=kept)
        assert record.histograms_until == -1 and not record.histograms_wanted(0)
        for step in range(7):
            norms = np.array([1.0, 1.0, math.nan if step == 2 else 1.0])
            counts = np.array([0.0, 0.0, 3.0 if step == 2 else 0.0])
            record.record(step, [_step.Group("gradients", NAMES, norms, counts)])
            wanted[step] = [t for t in range(10) if record.histograms_wanted(t)]
    assert wanted[1] == [] and wanted[2] == [3, 4, 5] and wanted[6] == [3, 4, 5]
    assert record.histograms_until == 5
    assert asked == [2]  # once, at the finding's step
    # in the file: the kept histograms (steps 1 and 2) before step 2's own event
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = [str(p) for p in tmp_path.iterdir() if p.name.startswith("events.out")]
    order = [
        (event.step, value.tag)
        for event in EventFileLoader(path).Load()
        for value in event.summary.value
        if value.tag in (_step.histogram_tag("gradients", "out.weight"), _step.norm_tag("gradients", "out.weight"))
    ]
    histogram, norm = _step.histogram_tag("gradients", "out.weight"), _step.norm_tag("gradients", "out.weight")
    assert order == [(0, norm), (1, norm), (1, histogram), (2, histogram), (2, norm), *((s, norm) for s in range(3, 7))]


def test_without_a_burst_the_recorder_wants_no_histograms_and_refuses_a_bad_length(tmp_path) -> None:
    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = _step.Recorder(writer, Guard(strict=True), 5, Monitor(), histograms_after=0)
        for step in range(4):
            norms = np.array([1.0, 1.0, math.nan if step == 2 else 1.0])
            record.record(step, [_step.Group("gradients", NAMES, norms, np.isnan(norms).astype(float))])
        assert record.monitor is not None and [f.rule for f in record.monitor.findings] == ["nonfinite"]
        assert record.histograms_until == -1 and not any(record.histograms_wanted(t) for t in range(6))
        with pytest.raises(ValueError, match="histograms_after_finding must be an int >= 0"):
            _step.Recorder(None, Guard(strict=True), 5, None, histograms_after=-1)


def test_shapes_and_the_updated_tensors_reach_the_health_rules(tmp_path) -> None:
    seen = []

    class Watching(Monitor):
        def observe(self, values):  # type: ignore[no-untyped-def]
            seen.append((values.owned, dict(values.ndims)))
            return super().observe(values)

    ndims = {"layer0.weight": 2, "layer0.bias": 1, "out.weight": 2}
    with normlog.Writer(tmp_path) as writer:
        record = _step.Recorder(writer, Guard(strict=True), 5, Watching())
        ones = np.ones(3)
        record.record(0, [_step.Group("gradients", NAMES, ones, ndims=ndims)])
        record.record(1, [_step.Group("gradients", NAMES, ones)], _step.Updates(NAMES[:2], ones[:2], ones[:2]))
    assert seen == [(None, ndims), ({"layer0.weight", "layer0.bias"}, {})]
    assert record.monitor is not None and record.monitor.state_dict()["ndims"] == ndims  # kept once given


def test_a_failure_writing_the_kept_histograms_warns_once_and_the_step_is_still_written(tmp_path) -> None:
    def kept(step: int) -> list[tuple[int, list[_step.Group]]]:
        raise RuntimeError("the device went away")

    with normlog.Writer(tmp_path) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = _step.Recorder(writer, Guard(strict=False), 5, Monitor(), histograms_after=2, kept_histograms=kept)
        for step in range(3):
            norms = np.array([1.0, 1.0, math.nan if step == 2 else 1.0])
            record.record(step, [_step.Group("gradients", NAMES, norms, np.isnan(norms).astype(float))])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("writing the histograms kept before step 2" in m and "the device went away" in m for m in messages)
    assert sorted(scalars(read_events(str(tmp_path)), _step.norm_tag("gradients", "out.weight"))) == [0, 1, 2]
    assert record.histograms_until == 4  # the burst after it still began
