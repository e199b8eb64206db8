"""The normlog tab in a real headless browser (Debian's chromium driven by playwright) against a
real `tensorboard` process on 127.0.0.1: the tab appears, the map has one row per tensor in
model order, a NaN put into one weight at a known step is a NaN cell at that row and column and
the first finding in the list, clicking a row draws its curves, nothing is logged as an error
in the browser's console.

A missing browser or playwright skips these tests, unless NORMLOG_REQUIRE names "chromium",
where it fails. `NORMLOG_SCREENSHOTS=<dir>` also writes `<dir>/normlog_dashboard.png`, the
README's screenshot of the vanishing-gradients example (tanh above relu); its logs are made by
the example with `--epochs 3`, or read from `NORMLOG_VANISHING_LOGDIR` where that is set."""

from __future__ import annotations

import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from helpers import chromium, requires
from tests.test_tensorboard_plugin import NAN_RUN, NAN_STEP, NAN_TENSOR, watched_nan_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN_RGB = (232, 17, 45)  # index.js: NaN's own colour


def playwright_module() -> Any:
    """playwright's sync API, or a skip (a failure when NORMLOG_REQUIRE names chromium)."""
    required = {name.strip() for name in os.environ.get("NORMLOG_REQUIRE", "").split(",") if name.strip()}
    if "chromium" in required:  # CI must drive the browser, not skip it
        return importlib.import_module("playwright.sync_api")
    return pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TensorBoard:
    """`tensorboard --logdir <logdir>` on 127.0.0.1 and a free port (its default reader: the
    Rust data server where installed), always terminated."""

    def __init__(self, logdir: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen(
            [*command, f"--port={self.port}", "--reload_interval=1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def wait_for_runs(self, runs: set[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/data/plugin/normlog/runs", timeout=30) as response:
                    if runs <= {entry["run"] for entry in json.loads(response.read())["runs"]}:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("tensorboard did not serve the runs in time")
            time.sleep(1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    sync_api = playwright_module()
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def nan_server(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TensorBoard, list[str]]]:
    logdir = str(tmp_path_factory.mktemp("browser"))
    tensors = watched_nan_run(logdir)
    server = TensorBoard(logdir)
    try:
        server.wait_for_runs({NAN_RUN})
        yield server, tensors
    finally:
        server.stop()


class Page:
    """One browser page on the normlog tab, with every console error and page error kept."""

    def __init__(self, browser: Any, url: str, height: int = 1000) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": height})
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(f"{url}/#normlog")
        self.frame = self.page.frame_locator("iframe")
        self.frame.locator(".nl-row").first.wait_for(timeout=120_000)

    def wait_idle(self) -> None:
        self.frame.locator(".nl-status").filter(has_text="loading").wait_for(state="detached", timeout=60_000)

    def choose(self, selector: str, value: str) -> None:
        self.frame.locator(selector).select_option(value)
        self.page.wait_for_timeout(300)
        self.frame.locator(".nl-cells").first.wait_for()

    def cell(self, run: str, row: int, step: int) -> tuple[float, float, tuple[int, ...]]:
        """The page coordinates of a cell's centre and the colour drawn there."""
        section = self.frame.locator(f'.nl-map[data-run="{run}"]')
        spans = section.get_attribute("data-spans")
        assert spans is not None
        column = next(i for i, (first, last) in enumerate(json.loads(spans)) if first <= step <= last)
        cells = section.locator(".nl-cells")
        width = int(cells.get_attribute("data-cell-width") or 0)
        height = int(cells.get_attribute("data-cell-height") or 0)
        x, y = column * width + width // 2, row * height + height // 2
        rgb = cells.evaluate(f"(c) => Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3))")
        box = cells.bounding_box()
        return box["x"] + x, box["y"] + y, tuple(rgb)


def test_the_tab_shows_the_nan_where_it_was_put(browser: Any, nan_server: tuple[TensorBoard, list[str]]) -> None:
    server, tensors = nan_server
    view = Page(browser, server.url)
    try:
        assert view.page.locator("text=normlog").first.is_visible()  # the tab in TensorBoard's bar
        view.choose(".nl-statistic", "weight_norm")
        rows = view.frame.locator(f'.nl-map[data-run="{NAN_RUN}"] .nl-row')
        assert rows.count() == len(tensors)
        assert [rows.nth(i).get_attribute("data-tensor") for i in range(rows.count())] == tensors
        row = tensors.index(NAN_TENSOR)
        x, y, rgb = view.cell(NAN_RUN, row, NAN_STEP)
        assert rgb == NAN_RGB
        assert view.cell(NAN_RUN, row, NAN_STEP - 1)[2] != NAN_RGB  # finite the step before
        assert view.cell(NAN_RUN, 0, NAN_STEP)[2] != NAN_RGB  # the first layer's weight is still finite
        view.page.mouse.move(x, y)
        tooltip = view.frame.locator(".nl-tooltip")
        tooltip.wait_for(state="visible")
        assert tooltip.inner_text() == f"{NAN_TENSOR} · step {NAN_STEP} · weight norm ‖w‖ NaN"

        first = view.frame.locator(".nl-finding").first
        assert first.get_attribute("data-rule") == "nonfinite"
        assert first.get_attribute("data-tensor") == NAN_TENSOR
        assert first.get_attribute("data-step") == str(NAN_STEP)
        assert NAN_TENSOR in first.inner_text() and "origin" in first.inner_text()
        first.click()  # scrolls the map to the cell and opens the tensor
        view.frame.locator(".nl-detail h3", has_text=NAN_TENSOR).wait_for()

        rows.nth(0).click()
        view.frame.locator(".nl-detail h3", has_text=tensors[0]).wait_for()
        curve = view.frame.locator('path.nl-curve[data-statistic="grad_norm"]')
        curve.wait_for()
        assert (curve.get_attribute("d") or "").count("L") >= NAN_STEP - 2  # a line through the finite steps
        view.frame.locator("rect.nl-bar").first.wait_for()
        assert view.errors == []
    finally:
        view.page.close()


def test_two_runs_one_above_the_other_on_one_scale(browser: Any, tmp_path: Any) -> None:
    """The vanishing-gradients example, tanh above relu: the README's screenshot."""
    requires("torch")
    logdir = os.environ.get("NORMLOG_VANISHING_LOGDIR")
    if not logdir:
        logdir = str(tmp_path / "vanishing_gradients")
        example = os.path.join(ROOT, "examples", "torch", "vanishing_gradients.py")
        subprocess.run([sys.executable, example, "--logdir", logdir, "--epochs", "3"], check=True, timeout=900)
    server = TensorBoard(logdir)
    try:
        server.wait_for_runs({"tanh", "relu"})
        view = Page(browser, server.url, height=1500)  # tall enough for the map, the list and one tensor
        try:
            view.choose(".nl-run", "tanh")
            view.choose(".nl-compare", "relu")
            maps = view.frame.locator(".nl-map")
            maps.nth(1).wait_for()
            assert [maps.nth(i).get_attribute("data-run") for i in range(maps.count())] == ["tanh", "relu"]
            assert view.frame.locator(".nl-scale-bar").count() == 1  # one colour scale for both
            view.frame.locator('.nl-map[data-run="tanh"] .nl-row').first.click()
            view.frame.locator('path.nl-curve[data-statistic="grad_norm"]').wait_for()
            view.frame.locator("rect.nl-bar").first.wait_for()
            view.page.wait_for_timeout(500)
            png = view.page.screenshot(full_page=True)
            assert view.errors == []
        finally:
            view.page.close()
    finally:
        server.stop()
    requires("PIL")  # pillow, which matplotlib (normlog[plot]) installs
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    folder = os.environ.get("NORMLOG_SCREENSHOTS")
    if folder:
        with open(os.path.join(folder, "normlog_dashboard.png"), "wb") as file:
            file.write(png)
