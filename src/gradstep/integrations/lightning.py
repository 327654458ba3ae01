"""PyTorch Lightning callbacks: schedule-free train/eval switching and EMA weights for validation.

gradstep's optimizers need nothing special in Lightning: ``configure_optimizers`` returns them (with any torch
scheduler), checkpoints save and restore their state, and ``Trainer(gradient_clip_val=...)`` clips their gradients.
Two things need the Trainer's events, and these callbacks supply them:

* :class:`ScheduleFreeCallback`: optimizers with ``train()``/``eval()`` methods (schedule-free ones, gradstep's or
  the ``schedulefree`` package's) must be in train mode to step and in eval mode to evaluate.
* :class:`EMACallback`: keeps a :class:`~gradstep.integrations.ema.EMA` of the module, updated after each optimizer
  step, swapped in for validation and testing, and saved in the checkpoint.

Importing this module imports Lightning: ``lightning.pytorch`` where the ``lightning`` package is installed, else
``pytorch_lightning``; pass the callbacks to a Trainer of that package.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]

from .ema import EMA

__all__ = ["EMACallback", "ScheduleFreeCallback"]


def _switch(trainer: Any, mode: str) -> None:
    for optimizer in trainer.optimizers:
        method = getattr(optimizer, mode, None)
        if callable(method):
            method()


class ScheduleFreeCallback(pl.Callback):
    """Call ``train()``/``eval()`` on every optimizer that has them, following the Trainer.

    Train mode for training (from ``on_train_start``, and again after each validation during ``fit``), eval mode for
    validation, testing and prediction, and at the end of training, so that the module is left holding the weights to
    evaluate and save for inference. Checkpoints written during ``fit`` are in train mode and resume exactly.
    Optimizers without the methods are left alone.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _switch(trainer, "train")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        _switch(trainer, "eval")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.training or trainer.state.fn == "fit":
            _switch(trainer, "train")

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        _switch(trainer, "eval")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        _switch(trainer, "eval")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        _switch(trainer, "eval")


class EMACallback(pl.Callback):
    """An exponential moving average of the module's weights, used for validation and testing.

    The average is updated after each optimizer step (once per ``trainer.global_step``, so gradient accumulation
    updates it once per step taken), swapped into the module for validation and testing (the trained weights come
    back, bit for bit, afterwards), and saved in and restored from Lightning checkpoints.

    Args:
        decay: the EMA decay; the other keyword arguments are those of :class:`~gradstep.integrations.ema.EMA`.
        swap_for_validation: evaluate the average in validation (and in the sanity check).
        swap_for_test: evaluate the average in ``trainer.test``.
        copy_at_end: write the average into the module when ``fit`` ends.
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        swap_for_validation: bool = True,
        swap_for_test: bool = True,
        copy_at_end: bool = False,
        **ema_options: Any,
    ) -> None:
        self.decay = decay
        self.ema_options = ema_options
        self.swap_for_validation = swap_for_validation
        self.swap_for_test = swap_for_test
        self.copy_at_end = copy_at_end
        self.ema: EMA | None = None
        self._updated_at_step = -1
        self._pending: dict[str, Any] | None = None
        self._swap: AbstractContextManager[Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.ema is None:
            self.ema = EMA(pl_module, decay=self.decay, **self.ema_options)
            self._updated_at_step = trainer.global_step
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None and trainer.global_step > self._updated_at_step:
            self.ema.update()
            self._updated_at_step = trainer.global_step

    def _enter(self) -> None:
        if self.ema is not None and self._swap is None:
            self._swap = self.ema.swapped()
            self._swap.__enter__()

    def _exit(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.swap_for_validation:
            self._enter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._exit()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        if self.swap_for_test:
            self._enter()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._exit()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._exit()  # never leave the average in the module by accident

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.copy_at_end and self.ema is not None:
            self.ema.copy_to()

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"ema": self.ema.state_dict(), "updated_at_step": self._updated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict  # restored before setup(): loaded once the average exists
        else:
            self._load(state_dict)

    def _load(self, state_dict: dict[str, Any]) -> None:
        assert self.ema is not None
        self.ema.load_state_dict(state_dict["ema"])
        self._updated_at_step = int(state_dict["updated_at_step"])
