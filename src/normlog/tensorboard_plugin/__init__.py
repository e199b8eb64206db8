"""The normlog tab in TensorBoard: every tensor by every step on one map, the findings on it,
one click to a tensor's curves and histogram.

Rules: imports TensorBoard (the `report` extra), never torch, Keras or TensorFlow. Runs are read
through TensorBoard's data provider only (`context.data_provider`), so the tab shows what the
other dashboards show, with the Rust data server or `--load_fast=false`. Tags are classified by
`normlog._step.parse_tag` (in `_data`), never spelled here. Every route answers JSON or a file of
the `static/` folder by its exact name; an unknown run, tensor or argument is a 4xx with a
message (TensorBoard's `errors`), never a file outside `static/`.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tensorboard import errors
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from normlog._step import parse_tag
from normlog.tensorboard_plugin import _data

__all__ = ["NormlogPlugin"]

PLUGIN_NAME = "normlog"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
_SCALARS = "scalars"  # the data class TensorBoard files every scalar summary under
_HISTOGRAMS = "histograms"
_CUSTOM_SCALARS = "custom_scalars"
_ALL = 1 << 30  # "downsample" to more points than TensorBoard keeps: every point it holds
_JSON = "application/json"
_CURVES = ("grad_norm", "weight_norm", "update_ratio")
_KINDS = ("gradients", "parameters", "activations")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _static_files() -> dict[str, str]:
    """name -> path of every file in `static/`: the only files the plugin ever serves."""
    return {name: os.path.join(_STATIC, name) for name in sorted(os.listdir(_STATIC))}


class NormlogPlugin(base_plugin.TBPlugin):  # type: ignore[misc]  # TensorBoard is untyped
    """The `normlog` tab: registered by the `tensorboard_plugins` entry point of the normlog
    distribution; active when a run holds normlog's gradient or weight norms."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        self._files = _static_files()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[tuple[Any, ...], _data.RunData]] = {}
        # The in-process reader (`--load_fast=false`) lists a run's tags in the order they were
        # first logged, which is the model's order; the Rust data server lists them sorted.
        from tensorboard.backend.event_processing import data_provider as multiplexer_provider

        self._keeps_order = isinstance(self._provider, multiplexer_provider.MultiplexerDataProvider)

    # -- what TensorBoard asks of a plugin ------------------------------------------------

    def get_plugin_apps(self) -> dict[str, WSGIApp]:
        return {
            "/index.js": _wsgi(self._serve_index),
            "/static/*": _wsgi(self._serve_static),
            "/runs": _wsgi(self._serve_runs),
            "/map": _wsgi(self._serve_map),
            "/findings": _wsgi(self._serve_findings),
            "/tensor": _wsgi(self._serve_tensor),
            "/histogram": _wsgi(self._serve_histogram),
        }

    def is_active(self) -> bool:
        if self._provider is None:
            return False
        from tensorboard import context

        listing = self._provider.list_scalars(context.RequestContext(), experiment_id="", plugin_name=_SCALARS)
        return any(_is_norm(tag) for tags in listing.values() for tag in tags)

    def data_plugin_names(self) -> tuple[str, ...]:
        # No summary carries this plugin's name; TensorBoard then asks `is_active`.
        return ()

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="normlog")

    # -- static files -------------------------------------------------------------------------

    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        return self._file(request, "index.js")

    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        # Only a name listed in static/ is served, looked up exactly: '..', '/', '%2e%2e' and
        # absolute paths name no file there.
        _, _, name = request.path.partition("/static/")
        return self._file(request, name)

    def _file(self, request: wrappers.Request, name: str) -> wrappers.Response:
        path = self._files.get(name)
        if path is None:
            raise errors.NotFoundError(f"no static file {name!r} in the normlog plugin")
        with open(path, "rb") as handle:
            content = handle.read()
        content_type = _CONTENT_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        return _respond(request, content, content_type)

    # -- data routes --------------------------------------------------------------------------

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_context(request)
        runs = []
        for run, tags in self._list(ctx, experiment).items():
            if any(_is_norm(tag) for tag in tags):
                data = self._run(ctx, experiment, run)
                runs.append({"run": run, "tensors": len(data.tensors), "steps": len(data.steps)})
        body = {"runs": runs, "statistics": list(_data.STATISTICS), "max_columns": _data.MAX_COLUMNS}
        return _respond(request, body, _JSON)

    def _serve_map(self, request: wrappers.Request) -> wrappers.Response:
        """The map of one run and statistic: rows = tensors, columns = (spans of) steps; the
        values little-endian float32, base64 (what a scalar summary holds), `present` one byte
        per cell (0: not logged there)."""
        ctx, experiment = _request_context(request)
        data = self._run(ctx, experiment, _argument(request, "run"))
        statistic = _argument(request, "statistic", default="grad_norm")
        if statistic not in _data.STATISTICS:
            raise errors.InvalidArgumentError(f"unknown statistic {statistic!r}; one of {list(_data.STATISTICS)}")
        columns = _integer(request, "columns", default=_data.MAX_COLUMNS, low=1, high=_data.MAX_COLUMNS)
        values, present = data.matrix(statistic)
        values, present, spans = _data.downsample(values, present, data.steps, columns)
        body = {
            "statistic": statistic,
            "tensors": data.tensors,
            "modules": [_data.module_of(tensor) for tensor in data.tensors],
            "spans": spans.tolist(),
            "shape": list(values.shape),
            "values": base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii"),
            "present": base64.b64encode(np.ascontiguousarray(present, dtype=np.uint8).tobytes()).decode("ascii"),
        }
        return _respond(request, body, _JSON)

    def _serve_findings(self, request: wrappers.Request) -> wrappers.Response:
        ctx, experiment = _request_context(request)
        data = self._run(ctx, experiment, _argument(request, "run"))
        rows = {tensor: row for row, tensor in enumerate(data.tensors)}
        findings = [
            {"finding": finding.as_dict(), "row": rows.get(finding.tensor), "origin": origin}
            for finding, origin in _data.findings_in_order(data.findings)
        ]
        return _respond(request, {"findings": findings}, _JSON)

    def _serve_tensor(self, request: wrappers.Request) -> wrappers.Response:
        """One tensor's curves ([step, value] pairs; NaN and ±Inf as TensorBoard spells them)
        and the steps its histograms were logged at, by kind."""
        ctx, experiment = _request_context(request)
        run = _argument(request, "run")
        data = self._run(ctx, experiment, run)
        tensor = _argument(request, "tensor")
        if tensor not in data.tensors:
            raise errors.NotFoundError(f"run {run!r} logged no tensor {tensor!r}")
        curves = {}
        for statistic in _CURVES:
            values, present = data.matrix(statistic)
            row = data.tensors.index(tensor)
            curves[statistic] = [
                [int(step), float(value)]
                for step, value, logged in zip(data.steps, values[row], present[row])
                if logged
            ]
        histograms = {
            kind: [int(step) for step in steps] for kind, steps in self._histogram_steps(ctx, experiment, run, tensor)
        }
        return _respond(request, {"tensor": tensor, "curves": curves, "histograms": histograms}, _JSON)

    def _serve_histogram(self, request: wrappers.Request) -> wrappers.Response:
        """The histogram of one tensor's gradients, weights or activations at the logged step
        nearest `step`: [left, right, count] buckets, as TensorBoard's histogram plugin reads it."""
        ctx, experiment = _request_context(request)
        run = _argument(request, "run")
        data = self._run(ctx, experiment, run)
        tensor = _argument(request, "tensor")
        if tensor not in data.tensors:
            raise errors.NotFoundError(f"run {run!r} logged no tensor {tensor!r}")
        kind = _argument(request, "kind", default="gradients")
        if kind not in _KINDS:
            raise errors.InvalidArgumentError(f"unknown kind {kind!r}; one of {list(_KINDS)}")
        step = _integer(request, "step", default=0, low=-(1 << 62), high=1 << 62)
        tag = self._histogram_tags(ctx, experiment, run, tensor).get(kind)
        if tag is None:
            raise errors.NotFoundError(f"run {run!r} logged no histogram of {tensor!r}'s {kind}")
        read = self._provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=_HISTOGRAMS,
            downsample=_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=[tag]),
        )
        datums = read.get(run, {}).get(tag, [])
        if not datums:
            raise errors.NotFoundError(f"run {run!r} holds no histogram under {tag!r}")
        nearest = min(datums, key=lambda datum: (abs(datum.step - step), datum.step))
        body = {"tag": tag, "step": int(nearest.step), "buckets": np.asarray(nearest.numpy, dtype=float).tolist()}
        return _respond(request, body, _JSON)

    # -- reading ------------------------------------------------------------------------------

    def _list(self, ctx: Any, experiment: str) -> dict[str, dict[str, Any]]:
        if self._provider is None:
            return {}
        listing: dict[str, dict[str, Any]] = self._provider.list_scalars(
            ctx, experiment_id=experiment, plugin_name=_SCALARS
        )
        return listing

    def _run(self, ctx: Any, experiment: str, run: str) -> _data.RunData:
        """The run, read once per change (a tag's last step or time moved) and then cached."""
        tags = {tag: series for tag, series in self._list(ctx, experiment).get(run, {}).items() if _data.classify(tag)}
        if not any(_is_norm(tag) for tag in tags):
            raise errors.NotFoundError(f"no normlog run {run!r}")
        fingerprint = tuple((tag, series.max_step, series.max_wall_time) for tag, series in tags.items())
        with self._lock:
            cached = self._cache.get((experiment, run))
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
        read = self._provider.read_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=_SCALARS,
            downsample=_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(tags)),
        ).get(run, {})
        ordered = list(tags)
        if not self._keeps_order:
            ordered = _data.order_tags(ordered, self._chart_patterns(ctx, experiment, run))
        data = _data.load_run((tag, [(d.step, d.value) for d in read.get(tag, ())]) for tag in ordered)
        with self._lock:
            self._cache[(experiment, run)] = (fingerprint, data)
        return data

    def _chart_patterns(self, ctx: Any, experiment: str, run: str) -> list[str] | None:
        """The regexes of the run's Custom Scalars layout, in chart order, or None."""
        from tensorboard.plugins.custom_scalar import layout_pb2

        read = self._provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=_CUSTOM_SCALARS,
            downsample=1,
            run_tag_filter=provider.RunTagFilter(runs=[run]),
        ).get(run, {})
        for datums in read.values():
            try:
                layout = layout_pb2.Layout.FromString(datums[-1].numpy.item())
            except Exception:  # not a layout: the order falls back to names
                continue
            return [
                pattern
                for category in layout.category
                for chart in category.chart
                for pattern in [*chart.multiline.tag, *(series.tag for series in chart.margin.series)]
            ]
        return None

    def _histogram_tags(self, ctx: Any, experiment: str, run: str, tensor: str) -> dict[str, str]:
        """kind -> the histogram tag of `tensor` in `run`."""
        listing = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=_HISTOGRAMS)
        found: dict[str, str] = {}
        for tag in listing.get(run, {}):
            parsed = parse_tag(tag)
            if parsed is not None and parsed.statistic == "histogram" and parsed.name == tensor:
                found.setdefault(parsed.kind, tag)
        return found

    def _histogram_steps(self, ctx: Any, experiment: str, run: str, tensor: str) -> list[tuple[str, list[int]]]:
        tags = self._histogram_tags(ctx, experiment, run, tensor)
        if not tags:
            return []
        read = self._provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=_HISTOGRAMS,
            downsample=_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(tags.values())),
        ).get(run, {})
        return [(kind, [datum.step for datum in read.get(tag, ())]) for kind, tag in tags.items()]


def _wsgi(handler: Callable[[wrappers.Request], wrappers.Response]) -> WSGIApp:
    """A route: TensorBoard's middleware turns an `errors.PublicError` raised here into a 4xx."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        response = handler(wrappers.Request(environ))
        return response(environ, start_response)

    return app


def _respond(request: wrappers.Request, body: Any, content_type: str) -> wrappers.Response:
    response: wrappers.Response = http_util.Respond(request, body, content_type)
    return response


def _is_norm(tag: str) -> bool:
    target = _data.classify(tag)
    return target is not None and target[0] in ("grad_norms", "weight_norms")


def _request_context(request: wrappers.Request) -> tuple[Any, str]:
    from tensorboard import plugin_util

    return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)


def _argument(request: wrappers.Request, name: str, default: str | None = None) -> str:
    value = request.args.get(name, default)
    if value is None:
        raise errors.InvalidArgumentError(f"missing argument {name!r}")
    return str(value)


def _integer(request: wrappers.Request, name: str, *, default: int, low: int, high: int) -> int:
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise errors.InvalidArgumentError(f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise errors.InvalidArgumentError(f"{name} must be between {low} and {high}, not {value}")
    return value
