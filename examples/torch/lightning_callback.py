"""normlog in a PyTorch Lightning run: one callback, with gradient accumulation and clipping.

    python examples/torch/lightning_callback.py [LOGDIR]   # then: tensorboard --logdir LOGDIR

normlog's charts (global/grad_norm before clipping, global/grad_norm_clipped after) land in
the TensorBoardLogger's run, beside train_loss, on the Trainer's global_step.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from torch import nn

import normlog.torch.lightning


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(logdir: str = "runs/lightning") -> str:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x.sum(1, keepdim=True).sin()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    logger = pl.loggers.TensorBoardLogger(logdir, name="regression")
    trainer = pl.Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=logger,
        callbacks=[normlog.torch.lightning.Callback(histogram_every=8)],  # the one line
        log_every_n_steps=1,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Regression(), data)
    return str(logger.log_dir)


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
