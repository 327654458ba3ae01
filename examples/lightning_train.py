"""gradstep in PyTorch Lightning: configure_optimizers, gradient clipping, EMA weights for validation, resume,
and a schedule-free optimizer switched between train and eval mode.

Run: ``python examples/lightning_train.py`` (CPU, a few seconds). A tiny regression model is trained for two epochs,
checkpointed, and resumed for two more; the EMA of its weights is what validation sees. Then gradstep's
schedule-free SGD trains with ScheduleFreeCallback, which puts it in eval mode for validation (the schedulefree
package's optimizers follow the same train()/eval() protocol).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradstep
from gradstep.integrations.lightning import EMACallback, ScheduleFreeCallback


def data(n: int = 64, seed: int = 0) -> DataLoader:
    w = torch.randn(6, 2, generator=torch.Generator().manual_seed(1234))  # one task; the seed picks the samples
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class Regressor(pl.LightningModule):
    def __init__(self, optimizer: str = "adamw", lr: float = 3e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 2))
        self.optimizer_name, self.lr = optimizer, lr
        self.validation_weights: list[torch.Tensor] = []  # what each validation step saw (for the tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.validation_weights.append(self.net[0].weight.detach().clone())
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        groups = gradstep.param_groups(self.net, weight_decay=0.05)  # no decay on biases and the LayerNorm
        if self.optimizer_name == "sgd_schedulefree":  # any optimizer with train()/eval(): see main()
            return gradstep.SGDScheduleFree(self.parameters(), lr=self.lr, warmup_steps=2)
        optimizer = gradstep.create(self.optimizer_name, groups, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=16)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(max_epochs: int, callbacks: list[pl.Callback] | None = None, **options: Any) -> pl.Trainer:
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    settings: dict[str, Any] = {"num_sanity_val_steps": 0, **quiet, **options}
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks or [], **settings)


def main(out: Path, epochs: int = 2) -> Regressor:
    # Train, with the gradients clipped to norm 1 by the Trainer and an EMA of the weights for validation ...
    model = Regressor()
    first = trainer(epochs, [EMACallback(decay=0.9)], gradient_clip_val=1.0)
    first.fit(model, data(), data(32, seed=1))
    checkpoint = out / "regressor.ckpt"
    first.save_checkpoint(checkpoint)  # weights, gradstep optimizer state, scheduler, EMA, loop progress
    # ... then resume in a fresh Trainer and module, exactly where it stopped.
    resumed = Regressor()
    second = trainer(2 * epochs, [EMACallback(decay=0.9)], gradient_clip_val=1.0)
    second.fit(resumed, data(), data(32, seed=1), ckpt_path=checkpoint)
    print(f"val_loss after {2 * epochs} epochs (EMA weights): {float(second.callback_metrics['val_loss']):.4f}")
    # A schedule-free optimizer must be in train mode to step and in eval mode to evaluate: the callback does it.
    schedule_free = Regressor("sgd_schedulefree", lr=0.05)
    third = trainer(epochs, [ScheduleFreeCallback()])
    third.fit(schedule_free, data(), data(32, seed=1))
    print(f"schedule-free val_loss after {epochs} epochs: {float(third.callback_metrics['val_loss']):.4f}")
    return resumed


__all__ = ["EMACallback", "Regressor", "ScheduleFreeCallback", "data", "main", "trainer"]

if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp), args.epochs)
