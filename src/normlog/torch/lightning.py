"""PyTorch Lightning: `Trainer(callbacks=[normlog.torch.lightning.Callback()])`.

Rules: imports Lightning, so only a user who asks for this module loads it (`import normlog`
and `normlog.torch` never do). It only watches and unwatches; what a step is and what it
records is `normlog.torch.watch`'s. The step axis is the Trainer's `global_step`, and the
run directory its TensorBoard logger's, so normlog's charts share a run with `train_loss`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from normlog.torch._watcher import Watcher, watch

__all__ = ["Callback"]


class Callback(pl.Callback):
    """Watch the LightningModule from fit start to fit end.

    Each optimizer update is one step, numbered by `trainer.global_step`: with
    `accumulate_grad_batches`, the accumulated gradients; with `gradient_clip_val`, before
    clipping (what `lightning.pytorch.utilities.grad_norm` gives in `on_before_optimizer_step`).
    The logs go to the Trainer's TensorBoardLogger's `log_dir` (else to
    `<default_root_dir>/normlog`, or to `logdir`). A GradScaler of the precision plugin
    ("16-mixed") is passed as `scaler=`.

    Args:
        logdir: where to write instead of the logger's directory.
        **options: `normlog.torch.watch`'s options (`every`, `histogram_every`, `log`, ...).

    Example:
        >>> trainer = lightning.pytorch.Trainer(callbacks=[normlog.torch.lightning.Callback()])  # doctest: +SKIP
    """

    def __init__(self, logdir: str | None = None, **options: Any) -> None:
        super().__init__()
        self.logdir = logdir
        self.options = options
        self.watcher: Watcher | None = None

    def run_directory(self, trainer: pl.Trainer) -> str:
        """The TensorBoard logger's run directory (its `log_dir`), where the Trainer has one."""
        if self.logdir is not None:
            return self.logdir
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.TensorBoardLogger):
                return str(logger.log_dir)
        return os.path.join(trainer.default_root_dir, "normlog")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = dict(self.options)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        self.watcher = watch(pl_module, self.run_directory(trainer), step=trainer.global_step, **options)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.watcher is not None:
            self.watcher.step = trainer.global_step  # the next update's number, as Lightning counts

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.watcher is not None:
            self.watcher.unwatch()
            self.watcher = None
