"""What a PyTorch step records is the step record's (`normlog._step`), the same as Keras': the
zero-weight update ratio the two adapters' own copies disagreed on."""

from __future__ import annotations

import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")

import normlog  # noqa: E402
from normlog._step import ratio_tag  # noqa: E402


def test_a_zero_weight_writes_no_update_ratio_and_the_others_equal_torch(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(model.bias)  # as many biases start: no relative update (it was +inf)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = normlog.watch(model, tmp_path, optimizer=optimizer, update_every=1)
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).square().sum().backward()
    optimizer.step()
    watcher.unwatch()
    events = read_events(str(tmp_path))
    assert ratio_tag("bias") not in events.Tags()["scalars"]
    expected = ((model.weight.detach() - before).norm() / before.norm()).item()
    assert scalars(events, ratio_tag("weight"))[0] == pytest.approx(expected, rel=1e-5)
