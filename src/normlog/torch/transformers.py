"""Hugging Face `transformers.Trainer`: `normlog.torch.transformers.watch(trainer)` before `trainer.train()`.

Rules: imports transformers, so only a user who asks for this module loads it (`import
normlog` and `normlog.torch` never do). It only watches and unwatches; what a step is and
what it records is `normlog.torch.watch`'s. Steps are numbered as the Trainer logs its own
`grad_norm`: by `state.global_step` after the update, so both share one step axis and, with
TensorBoard reporting on, one run directory.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import transformers

from normlog.torch._watcher import Watcher
from normlog.torch._watcher import watch as watch_model

__all__ = ["Callback", "watch"]


class Callback(transformers.TrainerCallback):
    """Watch the Trainer's model from the start of training to its end.

    Each optimizer update is one step, numbered by the Trainer's `global_step` after that
    update (the step at which the Trainer logs the update's `grad_norm`, so the first is 1):
    with `gradient_accumulation_steps`, the accumulated gradients; with `max_grad_norm`,
    before clipping, so `global/grad_norm` equals the Trainer's `grad_norm`. The logs go to
    the Trainer's TensorBoard directory when `watch(trainer)` made the callback (else to
    `$TENSORBOARD_LOGGING_DIR`, `args.logging_dir` where the version has it, or
    `<output_dir>/normlog`; or to `logdir`).

    Args:
        logdir: where to write instead.
        trainer: the Trainer, to find its TensorBoard directory and GradScaler (`watch` passes it).
        **options: `normlog.torch.watch`'s options (`every`, `histogram_every`, `log`, ...).
    """

    def __init__(self, logdir: str | None = None, trainer: transformers.Trainer | None = None, **options: Any) -> None:
        self.logdir = logdir
        self.options = options
        self.watcher: Watcher | None = None
        self._trainer = None if trainer is None else weakref.ref(trainer)

    def run_directory(self, args: transformers.TrainingArguments) -> str:
        """Where the Trainer's TensorBoard callback writes, where it can be found."""
        if self.logdir is not None:
            return self.logdir
        trainer = None if self._trainer is None else self._trainer()
        if trainer is not None:
            for callback in trainer.callback_handler.callbacks:
                logging_dir = getattr(callback, "logging_dir", None)
                if type(callback).__name__ == "TensorBoardCallback" and logging_dir:
                    return str(logging_dir)
        found = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
        return str(found) if found else os.path.join(str(args.output_dir), "normlog")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        options = dict(self.options)
        trainer = None if self._trainer is None else self._trainer()
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            options.setdefault("scaler", scaler)
        self.watcher = watch_model(model, self.run_directory(args), step=state.global_step + 1, **options)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.step = state.global_step + 1  # the number the Trainer logs this update at

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.unwatch()
            self.watcher = None


def watch(trainer: transformers.Trainer, logdir: str | None = None, **options: Any) -> Callback:
    """Add a normlog `Callback` to `trainer`, writing into its TensorBoard run.

    Args:
        trainer: a `transformers.Trainer`, before `train()`.
        logdir: where to write instead of the Trainer's TensorBoard directory.
        **options: `normlog.torch.watch`'s options.

    Returns:
        The callback; its `watcher` is the `normlog.torch.Watcher` while training runs.

    Example:
        >>> normlog.torch.transformers.watch(trainer); trainer.train()  # doctest: +SKIP
    """
    callback = Callback(logdir, trainer, **options)
    trainer.add_callback(callback)
    return callback
