"""The normlog tab's backend (normlog.tensorboard_plugin) through TensorBoard's own WSGI app and
werkzeug's test client, on runs written by a watched torch model: the map's values are what
TensorBoard's scalars plugin serves, the findings are `normlog report --json`'s, the histogram
is the histograms plugin's, and bad requests get a 4xx with a message."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pytest

from helpers import requires

requires("tensorboard")
requires("werkzeug")

from normlog import report  # noqa: E402
from normlog._step import parse_tag  # noqa: E402
from normlog.tensorboard_plugin import NormlogPlugin, _data  # noqa: E402

NAN_RUN = "nan"  # a NaN is put into NAN_TENSOR's weight before step NAN_STEP's forward pass
NAN_TENSOR = "layers.1.weight"
NAN_STEP = 20
STEPS = 30
# statistic of the map -> (parse_tag statistic, kind) of the tag the scalars plugin serves it under
STATISTIC_TAGS = {
    "grad_norm": ("norm", "gradients"),
    "weight_norm": ("norm", "parameters"),
    "update_ratio": ("ratio", "parameters"),
}


def watched_nan_run(logdir: str, name: str = NAN_RUN, depth: int = 3) -> list[str]:
    """A watched MLP trained STEPS steps into `<logdir>/<name>`, a NaN written into
    NAN_TENSOR's weight before step NAN_STEP; returns the tensors in model order."""
    torch = requires("torch")
    import normlog

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4 if i == 0 else 8, 8) for i in range(depth))
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x: Any) -> Any:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    with normlog.watch(model, os.path.join(logdir, name), optimizer=optimizer, histogram_every=5, update_every=2):
        for step in range(STEPS):
            if step == NAN_STEP:
                with torch.no_grad():
                    dict(model.named_parameters())[NAN_TENSOR][1, 2] = float("nan")
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return [name for name, _ in model.named_parameters()]


class Client:
    """TensorBoard's WSGI app (scalars, histograms and normlog plugins) over one logdir."""

    def __init__(self, logdir: str, provider: Any = None) -> None:
        from tensorboard.backend import application
        from tensorboard.backend.event_processing import data_provider
        from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.histogram import histograms_plugin
        from tensorboard.plugins.scalar import scalars_plugin
        from werkzeug import test, wrappers

        events = multiplexer.EventMultiplexer()
        events.AddRunsFromDirectory(logdir)
        events.Reload()
        self.provider = provider or data_provider.MultiplexerDataProvider(events, logdir)
        flags = argparse.Namespace(
            generic_data="true", path_prefix="", window_title="", logdir=logdir, samples_per_plugin={}
        )
        plugins = [scalars_plugin.ScalarsPlugin, histograms_plugin.HistogramsPlugin, NormlogPlugin]
        loaders = [base_plugin.BasicLoader(plugin) for plugin in plugins]
        app = application.TensorBoardWSGIApp(flags, loaders, self.provider, None, events)
        self.client = test.Client(app, wrappers.Response)

    def get(self, path: str, **query: Any) -> Any:
        return self.client.get(path, query_string=query)

    def json(self, path: str, **query: Any) -> Any:
        response = self.get(path, **query)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.headers["Content-Type"] == "application/json"
        return json.loads(response.get_data(as_text=True))


def number(value: Any) -> float:
    """A value as TensorBoard's JSON spells it ("NaN", "Infinity", "-Infinity" for those)."""
    return float(value)


def decoded(body: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rows, columns = body["shape"]
    values = np.frombuffer(base64.b64decode(body["values"]), dtype="<f4").reshape(rows, columns)
    present = np.frombuffer(base64.b64decode(body["present"]), dtype=np.uint8).reshape(rows, columns)
    return values, present.astype(bool)


def scalars_plugin_series(client: Client, run: str, tensor: str, statistic: str) -> dict[int, float]:
    """What TensorBoard's own scalars plugin serves for this tensor's statistic: step -> value."""
    wanted = STATISTIC_TAGS[statistic]
    tags = client.json("/data/plugin/scalars/tags")[run]
    (tag,) = [t for t in tags if (p := parse_tag(t)) and (p.statistic, p.kind, p.name) == (*wanted, tensor)]
    return {step: number(value) for _, step, value in client.json("/data/plugin/scalars/scalars", run=run, tag=tag)}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    path = str(tmp_path_factory.mktemp("plugin"))
    tensors = watched_nan_run(path)
    watched_nan_run(path, name="deeper", depth=11)  # layers.10 after layers.9: model order, not names'
    return path, tensors


@pytest.fixture(scope="module")
def client(logdir: tuple[str, list[str]]) -> Client:
    return Client(logdir[0])


def test_the_tab_is_listed_and_loads_its_es_module(client: Client) -> None:
    listing = client.json("/data/plugins_listing")["normlog"]
    assert listing["enabled"] is True and listing["tab_name"] == "normlog"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/normlog/index.js"}
    module = client.get("/data/plugin/normlog/index.js")
    assert module.status_code == 200 and module.headers["Content-Type"].startswith("text/javascript")
    assert b"export async function render" in module.get_data()
    style = client.get("/data/plugin/normlog/static/style.css")
    assert style.status_code == 200 and style.headers["Content-Type"].startswith("text/css")


def test_the_tab_is_inactive_without_normlog_runs(tmp_path: Any) -> None:
    from normlog import Writer

    with Writer(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert Client(str(tmp_path)).json("/data/plugins_listing")["normlog"]["enabled"] is False


def test_rows_are_the_tensors_in_model_order(client: Client, logdir: tuple[str, list[str]]) -> None:
    _, tensors = logdir
    runs = {entry["run"]: entry for entry in client.json("/data/plugin/normlog/runs")["runs"]}
    assert runs[NAN_RUN] == {"run": NAN_RUN, "tensors": len(tensors), "steps": STEPS}
    body = client.json("/data/plugin/normlog/map", run=NAN_RUN)
    assert body["tensors"] == tensors
    assert body["modules"] == [name.rsplit(".", 1)[0] for name in tensors]
    deeper = client.json("/data/plugin/normlog/map", run="deeper")["tensors"]
    assert deeper[18:22] == ["layers.9.weight", "layers.9.bias", "layers.10.weight", "layers.10.bias"]


@pytest.mark.parametrize("statistic", [*STATISTIC_TAGS, "grad_to_weight"])
def test_map_values_are_the_scalars_plugins(client: Client, logdir: tuple[str, list[str]], statistic: str) -> None:
    _, tensors = logdir
    body = client.json("/data/plugin/normlog/map", run=NAN_RUN, statistic=statistic)
    values, present = decoded(body)
    assert body["spans"] == [[step, step] for step in range(STEPS)]
    column = {step: i for i, step in enumerate(range(STEPS))}
    for row, tensor in enumerate(tensors):
        if statistic == "grad_to_weight":
            grads = scalars_plugin_series(client, NAN_RUN, tensor, "grad_norm")
            weights = scalars_plugin_series(client, NAN_RUN, tensor, "weight_norm")
            with np.errstate(invalid="ignore", divide="ignore"):
                expected = {s: float(np.float64(grads[s]) / np.float64(weights[s])) for s in grads if s in weights}
        else:
            expected = scalars_plugin_series(client, NAN_RUN, tensor, statistic)
        assert expected, (tensor, statistic)
        assert {step for step in range(STEPS) if present[row, column[step]]} == set(expected)
        for step, value in expected.items():
            assert same(float(values[row, column[step]]), float(np.float32(value))), (tensor, step)
    if statistic in ("grad_norm", "weight_norm"):  # the injected NaN, where it was put
        assert math.isnan(values[tensors.index(NAN_TENSOR), column[NAN_STEP]])
        assert not np.isnan(values[:, : column[NAN_STEP]]).any()


def test_columns_are_downsampled_keeping_nan_and_extremes(client: Client, logdir: tuple[str, list[str]]) -> None:
    _, tensors = logdir
    body = client.json("/data/plugin/normlog/map", run=NAN_RUN, statistic="grad_norm", columns=7)
    values, present = decoded(body)
    spans = body["spans"]
    assert len(spans) == 7 and spans[0][0] == 0 and spans[-1][1] == STEPS - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(spans))  # contiguous, every step once
    for row, tensor in enumerate(tensors):
        series = scalars_plugin_series(client, NAN_RUN, tensor, "grad_norm")
        logs = [math.log10(v) for v in series.values() if math.isfinite(v) and v > 0]
        median = float(np.median(logs))
        for column, (first, last) in enumerate(spans):
            bucket = [series[s] for s in range(first, last + 1)]
            if any(math.isnan(v) for v in bucket):
                assert math.isnan(values[row, column])
            else:
                extreme = max(bucket, key=lambda v: abs(math.log10(v) - median))
                assert values[row, column] == np.float32(extreme)
            assert present[row, column]


def test_findings_are_normlog_reports(client: Client, logdir: tuple[str, list[str]]) -> None:
    path, tensors = logdir
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report.main(["report", path, "--json"])
    expected = json.loads(printed.getvalue())["runs"]
    for run in (NAN_RUN, "deeper"):
        entries = client.json("/data/plugin/normlog/findings", run=run)["findings"]
        got = [entry["finding"] for entry in entries]
        assert Counter(json.dumps(f, sort_keys=True) for f in got) == Counter(
            json.dumps(f, sort_keys=True) for f in expected[run]["findings"]
        )
        assert [f["step"] for f in got] == sorted(f["step"] for f in got)
    entries = client.json("/data/plugin/normlog/findings", run=NAN_RUN)["findings"]
    first = entries[0]
    assert first["finding"]["rule"] == "nonfinite" and first["finding"]["step"] == NAN_STEP
    assert first["finding"]["tensor"] == NAN_TENSOR and first["origin"] is True
    assert first["row"] == tensors.index(NAN_TENSOR)
    assert sum(entry["origin"] for entry in entries if entry["finding"]["step"] == NAN_STEP) == 1


def test_model_order_without_the_listing_order(logdir: tuple[str, list[str]]) -> None:
    # TensorBoard's Rust data server lists tags sorted; the plugin then takes the model's
    # order from the Custom Scalars layout normlog writes, and its findings stay report's.
    path, _ = logdir
    plain = Client(path)

    class Sorted:
        """The same data, every listing in sorted order, and not the in-process reader."""

        def __getattr__(self, name: str) -> Any:
            method = getattr(plain.provider, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                result = method(*args, **kwargs)
                if name.startswith(("list_", "read_")) and isinstance(result, dict):
                    return {run: dict(sorted(tags.items())) for run, tags in result.items()}
                return result

            return call

    client = Client(path, provider=Sorted())
    for run in (NAN_RUN, "deeper"):
        expected = plain.json("/data/plugin/normlog/map", run=run)["tensors"]
        assert client.json("/data/plugin/normlog/map", run=run)["tensors"] == expected
        assert client.json("/data/plugin/normlog/findings", run=run) == plain.json(
            "/data/plugin/normlog/findings", run=run
        )


def test_tensor_curves_and_histogram(client: Client) -> None:
    body = client.json("/data/plugin/normlog/tensor", run=NAN_RUN, tensor=NAN_TENSOR)
    for statistic in STATISTIC_TAGS:
        expected = scalars_plugin_series(client, NAN_RUN, NAN_TENSOR, statistic)
        got = {step: number(value) for step, value in body["curves"][statistic]}
        assert got.keys() == expected.keys() and all(same(got[s], expected[s]) for s in got)
    assert body["histograms"]["gradients"][:3] == [0, 5, 10]
    histogram = client.json("/data/plugin/normlog/histogram", run=NAN_RUN, tensor=NAN_TENSOR, kind="parameters", step=7)
    assert histogram["step"] == 5  # the logged step nearest 7
    from_tensorboard = client.json("/data/plugin/histograms/histograms", run=NAN_RUN, tag=histogram["tag"])
    (buckets,) = [b for _, step, b in from_tensorboard if step == 5]
    assert histogram["buckets"] == buckets
    parsed = parse_tag(histogram["tag"])
    assert parsed is not None
    assert (parsed.statistic, parsed.kind, parsed.name) == ("histogram", "parameters", NAN_TENSOR)


@pytest.mark.parametrize(
    ("path", "query", "status", "message"),
    [
        ("/data/plugin/normlog/map", {"run": "nope"}, 404, "no normlog run 'nope'"),
        ("/data/plugin/normlog/map", {}, 400, "missing argument 'run'"),
        ("/data/plugin/normlog/map", {"run": NAN_RUN, "statistic": "loss"}, 400, "unknown statistic 'loss'"),
        ("/data/plugin/normlog/map", {"run": NAN_RUN, "columns": "0"}, 400, "columns must be between"),
        ("/data/plugin/normlog/map", {"run": NAN_RUN, "columns": "many"}, 400, "columns must be an integer"),
        ("/data/plugin/normlog/findings", {"run": "nope"}, 404, "no normlog run"),
        ("/data/plugin/normlog/tensor", {"run": NAN_RUN, "tensor": "nope"}, 404, "logged no tensor 'nope'"),
        ("/data/plugin/normlog/histogram", {"run": NAN_RUN, "tensor": NAN_TENSOR, "kind": "x"}, 400, "unknown kind"),
        ("/data/plugin/normlog/histogram", {"run": NAN_RUN, "tensor": NAN_TENSOR, "step": "x"}, 400, "integer"),
        ("/data/plugin/normlog/static/../__init__.py", {}, 404, ""),
        ("/data/plugin/normlog/static/..%2f__init__.py", {}, 404, "no static file"),
        ("/data/plugin/normlog/static/%2e%2e/_data.py", {}, 404, ""),
        ("/data/plugin/normlog/static/%2e%2e%2f%2e%2e%2f..%2fpyproject.toml", {}, 404, ""),
        ("/data/plugin/normlog/static//etc/passwd", {}, 404, ""),
        ("/data/plugin/normlog/static/", {}, 404, ""),
        ("/data/plugin/normlog/static/index.js/..", {}, 404, ""),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    client: Client, path: str, query: dict[str, str], status: int, message: str
) -> None:
    response = client.get(path, **query)
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert message in text
    assert "import" not in text and "[project]" not in text and "root:" not in text


def test_downsample_keeps_every_nonfinite_value() -> None:
    # the framework-free core of the map's columns, against values picked by hand
    steps = np.arange(10)
    values = np.array([[1.0, 10.0, 1.0, 1.0, np.inf, 1.0, 1.0, np.nan, 1.0, 1.0], [1.0] * 9 + [0.001]])
    present = np.ones_like(values, dtype=bool)
    present[1, 0] = False
    got, got_present, spans = _data.downsample(values, present, steps, 3)
    assert spans.tolist() == [[0, 2], [3, 5], [6, 9]]
    assert got[0].tolist()[:2] == [10.0, math.inf] and math.isnan(got[0, 2])
    assert got[1].tolist() == [1.0, 1.0, 0.001] and got_present.all()
    same_shape = _data.downsample(values, present, steps, 10)
    assert same_shape[0] is values and same_shape[2].tolist() == [[s, s] for s in steps]
