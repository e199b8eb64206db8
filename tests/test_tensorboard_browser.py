"""TensorBoard's dashboards in a real headless browser (Debian's chromium, driven by
playwright): the Custom Scalars charts and the norm-by-depth picture render, by the DOM and by
a screenshot whose pixels are not blank.

A missing browser skips these tests, unless NORMLOG_REQUIRE names "chromium" (CI), where it
fails. `NORMLOG_SCREENSHOTS=<dir>` also writes the README's screenshots of the
vanishing-gradients example (see `screenshots`)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from helpers import chromium, requires
from normlog import _step
from tests.tensorboard_server import Server, tensorboard, watched_run

RUN = "run"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    if "chromium" not in os.environ.get("NORMLOG_REQUIRE", ""):
        requires("playwright")  # else a missing playwright fails the import below, as it must
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, browser) -> Iterator[Server]:
    requires("torch")
    requires("matplotlib")
    logdir = str(tmp_path_factory.mktemp("tensorboard"))
    watched_run(logdir)
    with tensorboard(logdir) as server:
        server.wait_for(lambda s: _step.GLOBAL_NORM in s.get("/data/plugin/scalars/tags").get(RUN, {}))
        yield server


def pixels(png: bytes) -> np.ndarray:
    from matplotlib import image

    return np.asarray(image.imread(io.BytesIO(png), format="png"))[..., :3]


def not_blank(png: bytes) -> bool:
    """Drawn: many colours, and a spread of brightness well beyond a blank card's."""
    rgb = (pixels(png) * 255).astype(np.uint8).reshape(-1, 3)
    return len(np.unique(rgb, axis=0)) > 50 and float(rgb.std()) > 20


def open_dashboard(browser: Any, server: Server, dashboard: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server.url}/#{dashboard}")
    return page


def test_custom_scalars_draws_a_chart_per_kind_with_every_tensor(browser, served) -> None:
    layout = served.get("/data/plugin/custom_scalars/layout")
    charts = {
        chart["title"]: chart["multiline"]["tag"] for category in layout["category"] for chart in category["chart"]
    }
    scalar_tags = served.get("/data/plugin/scalars/tags")[RUN]
    page = open_dashboard(browser, served, "custom_scalars")
    try:
        cards = page.locator("tf-custom-scalar-multi-line-chart-card")
        cards.first.wait_for(timeout=120_000)
        assert cards.count() == len(charts)
        for i in range(cards.count()):
            card = cards.nth(i)
            title = card.locator("tf-card-heading figcaption").inner_text().strip()
            expected = {tag for regex in charts[title] for tag in scalar_tags if re.match(regex, tag)}
            if not expected:
                continue  # a chart with nothing to draw yet (no NaN in the weights, say)
            card.locator("path.line").first.wait_for(state="attached", timeout=120_000)
            entries = card.locator("#matches-list .match-list-entry")
            shown = {entries.nth(j).text_content().split()[-2] for j in range(entries.count())}
            assert shown == expected, title  # "<tag> (<run>)" for each line of the chart
            assert card.locator("path.line").count() >= len(expected)
        card = cards.first
        card.scroll_into_view_if_needed()
        assert not_blank(card.screenshot())
    finally:
        page.close()


def test_the_images_dashboard_shows_the_norm_by_depth_picture(browser, served) -> None:
    page = open_dashboard(browser, served, "images")
    try:
        images = page.locator("tf-image-loader img")
        images.first.wait_for(timeout=120_000)
        images.nth(1).wait_for(timeout=120_000)
        assert images.count() == 2  # the gradient norms and the update ratios
        for i in range(images.count()):
            image = images.nth(i)
            page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=image.element_handle(), timeout=60_000)
            assert image.evaluate("e => e.naturalWidth") == 800
            assert not_blank(image.screenshot())
    finally:
        page.close()


def screenshots(logdir: str, target: str) -> None:
    """`custom_scalars.png` (the gradient-norm charts, on a log axis) and `norm_by_depth.png`
    (each run's gradient-norm picture at its last step) of the runs in `logdir`, into `target`."""
    from playwright.sync_api import sync_playwright

    os.makedirs(target, exist_ok=True)
    with tensorboard(logdir) as server, sync_playwright() as playwright:
        server.wait_for(lambda s: len(s.get("/data/plugin/images/tags")) >= 2)
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(f"{server.url}/#custom_scalars")
            cards = page.locator("tf-custom-scalar-multi-line-chart-card")
            cards.first.locator("path.line").first.wait_for(state="attached", timeout=120_000)
            smoothing = page.locator("input[type=number]").first  # the sidebar's smoothing: the trend
            smoothing.fill("0.95")
            smoothing.press("Enter")
            for i in range(2):  # the weights' and the biases' gradient norms
                cards.nth(i).locator("paper-icon-button[title='Toggle y-axis log scale']").click()
            page.wait_for_timeout(3000)  # the charts' transitions
            page.screenshot(path=os.path.join(target, "custom_scalars.png"))
            page.goto(f"{server.url}/#images")
            page.locator("tf-image-loader img").first.wait_for(timeout=120_000)
            page.locator("tf-tag-filterer input").fill(_step.image_tag("grad_norm"))
            page.get_by_text("Show actual image size").click()
            page.set_viewport_size({"width": 1400, "height": 1460})  # both runs' pictures, one above the other
            page.wait_for_timeout(3000)
            page.screenshot(path=os.path.join(target, "norm_by_depth.png"))
        finally:
            browser.close()


@pytest.mark.skipif(not os.environ.get("NORMLOG_SCREENSHOTS"), reason="set NORMLOG_SCREENSHOTS=<dir> to write them")
def test_write_the_readme_screenshots(tmp_path) -> None:
    """The README's pictures: examples/torch/vanishing_gradients.py's tanh and relu runs."""
    requires("torch")
    import subprocess
    import sys

    logdir = str(tmp_path / "vanishing_gradients")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "torch", "vanishing_gradients.py")
    subprocess.run([sys.executable, example, "--logdir", logdir], check=True, timeout=1800)
    screenshots(logdir, os.environ["NORMLOG_SCREENSHOTS"])
    for name in ("custom_scalars.png", "norm_by_depth.png"):
        with open(os.path.join(os.environ["NORMLOG_SCREENSHOTS"], name), "rb") as file:
            assert not_blank(file.read())
