"""The Keras examples that show watching beyond one model and one optimizer run and write what
they promise (read back with TensorBoard's reader)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import read_events, requires, scalars

requires("tensorflow")
requires("keras")

from normlog._step import GLOBAL_NORM, norm_tag  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "keras")


def test_gan_example_logs_both_optimizers_and_follows_the_recompile(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "gan.py"), "--logdir", str(tmp_path), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "steps logged: 32" in result.stdout  # 16 batches per epoch, the second fit continuing
    events = read_events(str(tmp_path))
    tags = set(events.Tags()["scalars"])
    generator = {t for t in tags if t.startswith(norm_tag("gradients", "generator/"))}
    discriminator = {t for t in tags if t.startswith(norm_tag("gradients", "discriminator/"))}
    assert len(generator) == 4 and len(discriminator) == 4
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(32))
    assert all(sorted(scalars(events, tag)) == list(range(32)) for tag in generator)
    assert all(sorted(scalars(events, tag)) == list(range(16)) for tag in discriminator)  # frozen after
