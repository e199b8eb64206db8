"""TensorBoard's own server on loopback, for tests that read what a user would see: its HTTP
data API (`get`) and, in the browser tests, its dashboards. Always stopped on exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    def __init__(self, url: str, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.process = process

    def get(self, path: str, **query: Any) -> Any:
        """The decoded JSON (or the bytes, for an image) at `path`."""
        address = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(address, timeout=60) as response:
            body = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(body)
            return body

    def wait_for(self, ready: Callable[[Server], bool], timeout: float = 180) -> None:
        """Poll until `ready(self)`: TensorBoard reads the logdir in the background."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")[-3000:] if self.process.stderr else ""
                raise RuntimeError(f"tensorboard exited with {self.process.returncode}: {error}")
            try:
                if ready(self):
                    return
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("tensorboard did not serve the run in time")
            time.sleep(0.5)


@contextmanager
def tensorboard(logdir: str) -> Iterator[Server]:
    """`tensorboard --logdir <logdir>` on 127.0.0.1 and a free port, every image and text kept
    (`--samples_per_plugin`), stopped on exit whatever happens."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--samples_per_plugin=images=1000,tensors=1000",
        "--reload_interval=1",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        server.wait_for(lambda s: isinstance(s.get("/data/runs"), list))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def watched_run(logdir: str, steps: int = 20, nan_at: int = 12) -> dict[str, Any]:
    """A small torch MLP trained `steps` optimizer steps under `normlog.watch` (histograms
    and images every 5 steps, update ratios every step), into `<logdir>/run`. At `nan_at`
    the first layer's whole gradient and one value of the second's turn NaN in backward, so every
    weight turns NaN after it. Returns what torch itself saw, as the tests' reference: each
    step's gradients' NaN/Inf counts and whether any value was finite, by tensor."""
    import warnings

    import torch
    from torch import nn

    import normlog

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    names = [name for name, _ in model.named_parameters()]
    poisoned = False

    def poison_all(grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan")) if poisoned else grad

    def poison_one(grad: torch.Tensor) -> torch.Tensor:
        if poisoned:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    # in backward, as a real NaN would arrive (before the watcher's hooks see the gradient)
    model[0].weight.register_hook(poison_all)
    model[2].weight.register_hook(poison_one)
    nonfinite: dict[int, dict[str, int]] = {}
    any_finite: dict[int, dict[str, bool]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with normlog.watch(
            model, os.path.join(logdir, "run"), optimizer=optimizer, histogram_every=5, update_every=1
        ) as watcher:
            for step in range(steps):
                poisoned = step == nan_at
                loss = model(torch.randn(16, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                grads = dict(model.named_parameters())
                nonfinite[step] = {n: int((~torch.isfinite(grads[n].grad)).sum()) for n in names}
                any_finite[step] = {n: bool(torch.isfinite(grads[n].grad).any()) for n in names}
                optimizer.step()
            findings = watcher.findings
    told = [str(w.message) for w in caught if issubclass(w.category, normlog.health.HealthWarning)]
    warned = [(text.split("]", 1)[0][len("normlog [") :], text.split("] ", 1)[1]) for text in told]
    return {
        "names": names,
        "nonfinite": nonfinite,
        "any_finite": any_finite,
        "findings": findings,
        "warned": warned,
        "steps": steps,
    }


def row_bands(png: bytes, at: float = 0.6) -> int:
    """How many coloured bands a norm-by-depth picture has along the column `at` of its
    width, between the heat map's top and bottom frame lines (the dark rows spanning half
    the image): runs of at least 5 pixels that are neither near white (the lines between
    rows) nor near black, counted independently of the drawing. One panel per picture."""
    import io

    import numpy as np
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")[..., :3]
    frame = np.flatnonzero((pixels.max(axis=2) < 0.3).mean(axis=1) > 0.5)
    column = pixels[frame.min() + 1 : frame.max(), int(at * pixels.shape[1])]
    coloured = (column.min(axis=1) < 0.96) & (column.max(axis=1) > 0.15)
    bands, run = 0, 0
    for inside in [*coloured, False]:
        if inside:
            run += 1
        else:
            bands += run >= 5
            run = 0
    return bands
