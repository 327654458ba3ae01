"""gradstep with Hugging Face Accelerate: ``accelerator.prepare`` and gradient accumulation.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which steps it only when the gradients are
synchronised (every ``gradient_accumulation_steps`` batches) and forwards ``param_groups``, ``state_dict`` and
``load_state_dict``. The gradstep optimizer itself is ``prepared.optimizer``: its non-finite policy applies to the
accumulated gradient, and ``set_hyper``, ``global_step`` and ``skipped_steps`` are there.

Run: ``python examples/accelerate_loop.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradstep


def model_and_data(seed: int = 0) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin() + 0.05 * torch.randn(128, 1, generator=g)
    return model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


@dataclass
class Result:
    model: nn.Module
    optimizer: gradstep.AdamW  # the gradstep optimizer inside the AcceleratedOptimizer
    losses: list[float] = field(default_factory=list)


def main(accumulation: int = 2, epochs: int = 1, state_dir: Path | None = None, resume: Path | None = None) -> Result:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, loader = model_and_data()
    optimizer = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.01), lr=1e-2, nonfinite="skip")
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=64)
    model, prepared, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if resume is not None:
        accelerator.load_state(str(resume))  # weights, gradstep state, scheduler, RNG
    result = Result(model, prepared.optimizer)
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):  # steps the optimizer every `accumulation` batches
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)  # divides the loss by `accumulation`
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                prepared.step()
                scheduler.step()
                prepared.zero_grad()
            result.losses.append(float(loss.detach()))
    if state_dir is not None:
        accelerator.save_state(str(state_dir))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = main(cli.accumulation, cli.epochs, state_dir=Path(tmp))
    first, last = sum(result.losses[:16]) / 16, sum(result.losses[-16:]) / 16
    print(f"loss {first:.4f} -> {last:.4f}; optimizer steps: {result.optimizer.global_step}")
