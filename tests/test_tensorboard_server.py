"""What a user sees in TensorBoard, read through TensorBoard's own server and HTTP data API on
a run made by a watched torch model: the Custom Scalars layout, the norm-by-depth images,
the findings' texts, the per-rule counts and the histograms. References come from torch."""

from __future__ import annotations

import html
import re

import pytest

from helpers import requires
from normlog import _step
from tests.tensorboard_server import row_bands, tensorboard, watched_run

RUN = "run"
HISTOGRAM_STEPS = [0, 5, 10, 15]  # histogram_every=5 over 20 steps


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    requires("torch")
    requires("matplotlib")
    logdir = str(tmp_path_factory.mktemp("tensorboard"))
    reference = watched_run(logdir)
    with tensorboard(logdir) as server:
        server.wait_for(lambda s: _step.GLOBAL_NORM in s.get("/data/plugin/scalars/tags").get(RUN, {}))
        yield server, reference


def _is_bias(name: str) -> bool:
    return name.endswith(".bias")


def every_finding(findings: list) -> list:
    """The findings and, where the health rules group them, each episode's members."""
    return [row for finding in findings for row in (finding, *getattr(finding, "members", ()))]


def test_the_layout_puts_every_tensor_on_one_chart_per_kind_in_model_order(served) -> None:
    server, reference = served
    names = reference["names"]
    layout = server.get("/data/plugin/custom_scalars/layout")
    scalar_tags = set(server.get("/data/plugin/scalars/tags")[RUN])
    charts = {chart["title"]: chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]}

    def matched(regexes: list[str]) -> list[str]:
        # in the chart's order: each regex's matches, as the plugin's re.match finds them
        return [tag for regex in regexes for tag in sorted(scalar_tags) if re.match(regex, tag)]

    weights, biases = [n for n in names if not _is_bias(n)], [n for n in names if _is_bias(n)]
    expected = {
        "grad_norm: weights": [_step.norm_tag("gradients", n) for n in weights],
        "grad_norm: biases": [_step.norm_tag("gradients", n) for n in biases],
        "weight_norm: weights": [_step.norm_tag("parameters", n) for n in weights],
        "weight_norm: biases": [_step.norm_tag("parameters", n) for n in biases],
        "update_ratio: weights": [_step.ratio_tag(n) for n in weights],
        "update_ratio: biases": [_step.ratio_tag(n) for n in biases],
    }
    # the global norm, and the clipped one where the watcher logs it
    assert _step.GLOBAL_NORM in matched(charts[_step.GLOBAL_NORM])
    assert matched(charts[_step.GLOBAL_NORM]) == sorted(t for t in scalar_tags if t.startswith("global/"))
    for title, tags in expected.items():
        assert matched(charts[title]) == tags, title  # every tensor, nothing else, in model order
    assert all(tag in scalar_tags for tags in expected.values() for tag in tags)
    counts = matched(charts["nonfinite/grad: NaN/Inf counts"])
    assert counts == sorted(_step.nonfinite_count_tag("gradients", n) for n in names)
    assert matched(charts["health: tensors flagged per rule"]) == [_step.finding_scalar_tag("nonfinite")]
    # every scalar the step record wrote is on some chart
    assert {tag for regexes in charts.values() for tag in matched(regexes)} == scalar_tags


def test_the_norm_by_depth_images_at_histogram_steps_and_the_last_with_a_row_per_tensor(served) -> None:
    server, reference = served
    for statistic in ("grad_norm", "update_ratio"):
        images = server.get("/data/plugin/images/images", run=RUN, tag=_step.image_tag(statistic), sample=0)
        steps = [image["step"] for image in images]
        # the first histogram step and the last step always; between, as Pace allows
        assert steps[0] == HISTOGRAM_STEPS[0] and steps[-1] == reference["steps"] - 1
        assert set(steps[1:-1]) <= set(HISTOGRAM_STEPS), steps
        last = server.get(f"/data/plugin/images/individualImage?{images[-1]['query']}")
        assert last.startswith(b"\x89PNG")
        assert row_bands(last) == len(reference["names"])


def test_every_finding_of_a_step_is_in_its_text_origin_first(served) -> None:
    server, reference = served
    findings = reference["findings"]
    assert findings, "the NaN must give findings"
    top = findings
    texts: dict[tuple[str, int], str] = {}
    for rule in {f.rule for f in findings}:
        for text in server.get("/data/plugin/text/text", run=RUN, tag=f"{_step.finding_text_tag(rule)}/text_summary"):
            texts[(rule, text["step"])] = html.unescape(re.sub(r"<[^>]+>", " ", text["text"]))
    assert set(texts) == {(f.rule, f.step) for f in top}  # one text per (rule, step)
    for finding in top:  # each episode's origin in the text of its first step
        assert f"{finding.tensor} " in texts[(finding.rule, finding.step)]
    # every finding as the user was told it at that step (the warnings), in a text of its rule
    assert reference["warned"]
    for rule, message in reference["warned"]:
        assert any(message in text for (r, _), text in texts.items() if r == rule), message
    # the origin first: the episode's own (health decides which tensor a NaN came from), one
    # that torch saw turn non-finite there; with no episode naming one, the first in model order
    first = min(s for s, counts in reference["nonfinite"].items() if any(counts.values()))
    flagged = [n for n in reference["names"] if reference["nonfinite"][first][n]]
    episodes = [f for f in top if f.rule == "nonfinite" and f.step == first]
    origin = episodes[0].tensor if len(episodes) == 1 else flagged[0]
    rows = re.findall(r"\d+(?: \(origin\))?\s+(\S+)\s+(?:gradient|weight)", texts[("nonfinite", first)])
    assert rows[0] == origin and origin in flagged and "1 (origin)" in texts[("nonfinite", first)]
    assert set(reference["names"]) >= set(rows) >= set(flagged)


def test_one_count_per_rule_instead_of_a_chart_per_tensor(served) -> None:
    server, reference = served
    scalar_tags = set(server.get("/data/plugin/scalars/tags")[RUN])
    assert {t for t in scalar_tags if t.startswith("health/")} == {_step.finding_scalar_tag("nonfinite")}
    points = server.get("/data/plugin/scalars/scalars", run=RUN, tag=_step.finding_scalar_tag("nonfinite"))
    counts = {step: value for _, step, value in points}
    # at the first NaN: as many tensors as torch saw turn non-finite
    first = min(s for s, found in reference["nonfinite"].items() if any(found.values()))
    assert counts[first] == sum(1 for count in reference["nonfinite"][first].values() if count)
    assert set(counts) == {f.step for f in reference["findings"] if f.rule == "nonfinite"}


def test_no_histogram_for_a_tensor_with_no_finite_value(served) -> None:
    server, reference = served
    histogram_tags = server.get("/data/plugin/histograms/tags")[RUN]
    for name in reference["names"]:
        tag = _step.histogram_tag("gradients", name)
        steps = [point[1] for point in server.get("/data/plugin/histograms/histograms", run=RUN, tag=tag)]
        assert steps == [s for s in HISTOGRAM_STEPS if reference["any_finite"][s][name]], name
        assert tag in histogram_tags
        counts = server.get("/data/plugin/scalars/scalars", run=RUN, tag=_step.nonfinite_count_tag("gradients", name))
        by_step = {step: value for _, step, value in counts}
        assert all(by_step[s] == reference["nonfinite"][s][name] for s in by_step)
        assert {s for s in reference["nonfinite"] if reference["nonfinite"][s][name]} <= set(by_step)
    # the all-NaN step really happened: at step 15 every gradient is NaN
    assert not any(reference["any_finite"][15].values())
