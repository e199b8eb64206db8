"""normlog.torch.lightning.Callback in a real lightning.pytorch.Trainer, with gradient
accumulation and clipping: its numbers equal Lightning's own `grad_norm` at the same steps,
in the same run directory as the Trainer's TensorBoard logs."""

from __future__ import annotations

import warnings

import pytest

from helpers import read_events, requires, scalars

torch = requires("torch")
pl = requires("lightning.pytorch")
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch import nn  # noqa: E402

from normlog._step import (  # noqa: E402
    CLIPPED_GLOBAL_NORM,
    GLOBAL_NORM,
    norm_tag,
)
from normlog.torch.lightning import Callback  # noqa: E402

TOTAL = "grad_2.0_norm_total"


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.seen: dict[int, dict[str, float]] = {}  # global_step -> Lightning's grad_norm, before clipping

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self, norm_type=2)
        self.seen[self.trainer.global_step] = {name: float(value) for name, value in norms.items()}
        self.log_dict(norms)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_the_callback_logs_lightnings_grad_norm_at_lightnings_steps_in_its_run(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=generator), torch.randn(64, 1, generator=generator) * 5
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Regression()
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=logger,
        callbacks=[Callback()],
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and the like
        trainer.fit(module, data)
    assert sorted(module.seen) == list(range(8))  # 2 epochs of 8 batches, 2 per update
    assert any(seen[TOTAL] > 0.5 for seen in module.seen.values())  # clipping engaged
    events = read_events(logger.log_dir)  # one run: Lightning's logs and normlog's
    logged, lightnings_own = scalars(events, GLOBAL_NORM), scalars(events, TOTAL)
    assert sorted(logged) == sorted(module.seen)
    assert lightnings_own  # Lightning's own chart of the same numbers, on the same step axis
    for step, value in lightnings_own.items():
        assert logged[step] == pytest.approx(value, rel=1e-5)
    for step, seen in module.seen.items():
        assert logged[step] == pytest.approx(seen[TOTAL], rel=1e-5)
        layer = scalars(events, norm_tag("gradients", "net.0.weight"))[step]
        assert layer == pytest.approx(seen["grad_2.0_norm/net.0.weight"], rel=1e-5)
        assert scalars(events, CLIPPED_GLOBAL_NORM)[step] == pytest.approx(min(seen[TOTAL], 0.5), rel=1e-4)
    assert "train_loss" in events.Tags()["scalars"]


def test_the_example_writes_normlogs_charts_beside_train_loss(tmp_path) -> None:
    import runpy
    from pathlib import Path

    example = Path(__file__).parents[2] / "examples" / "torch" / "lightning_callback.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = runpy.run_path(str(example))["main"](str(tmp_path))
    events = read_events(run)
    assert sorted(scalars(events, GLOBAL_NORM)) == list(range(24))  # 3 epochs of 16 batches, 2 per update
    assert "train_loss" in events.Tags()["scalars"] and events.Tags()["histograms"]
