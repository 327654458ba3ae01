"""A plain training loop: gradstep.AdamW with parameter groups, a one-cycle LR schedule, torch.amp autocast and a
GradScaler, gradient clipping and a checkpoint.

Autocast runs the forward pass in bfloat16 on CPU (float16 on CUDA); the parameters and the optimizer state stay in
float32. ``GradScaler`` is what float16 needs (its small range underflows small gradients); with bfloat16 it is not
needed, but the loop is the same, so it is shown here. When a scaled gradient overflows, the scaler skips the
optimizer's step and halves its scale; ``--overflow-at N`` injects such an overflow at step N to show it.

    python examples/train_amp_scheduler.py --steps 300
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass, field

import torch
from torch import nn

import gradstep


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic 10-class problem: labels from a fixed random two-layer teacher network."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    teacher_1, teacher_2 = torch.randn(32, 64, generator=gen), torch.randn(64, 10, generator=gen)
    y = (torch.tanh(x @ teacher_1) @ teacher_2).argmax(dim=1)
    return x, y


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps at which the scaler skipped optimizer.step()
    steps_taken: int = 0  # optimizer.global_step: the steps gradstep actually took
    output_dtype: torch.dtype = torch.float32  # the model's output dtype under autocast
    accuracy: float = 0.0
    checkpoint: bytes = b""


def main(
    steps: int = 300,
    batch_size: int = 64,
    max_lr: float = 1e-2,
    device: str = "cpu",
    overflow_at: int | None = None,
    seed: int = 0,
) -> Result:
    torch.manual_seed(seed)
    x, y = make_data(2048, seed)
    x, y = x.to(device), y.to(device)
    model = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10)).to(device)

    # No weight decay on biases and normalisation weights; the optimizer is a plain torch.optim.Optimizer.
    optimizer = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.05), lr=max_lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps)
    amp_dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    scaler = torch.amp.GradScaler(device.split(":")[0])

    result = Result()
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype):
            logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
        scaler.scale(loss).backward()
        if step == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow looks like to the scaler
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        scale_before = scaler.get_scale()
        result.lrs.append(optimizer.param_groups[0]["lr"])  # the lr this step uses
        scaler.step(optimizer)  # skips optimizer.step() if a gradient is inf/NaN
        scaler.update()
        if scaler.get_scale() < scale_before:
            result.skipped.append(step)
        scheduler.step()
        result.losses.append(loss.item())
        result.scales.append(scaler.get_scale())
    result.steps_taken = optimizer.global_step
    result.output_dtype = logits.dtype

    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype):
        result.accuracy = (model(x).argmax(dim=1) == y).float().mean().item()

    # Everything needed to resume, loadable with weights_only=True.
    buffer = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    torch.save(state, buffer)
    result.checkpoint = buffer.getvalue()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overflow-at", type=int, default=None, help="inject an inf gradient at this step")
    args = parser.parse_args()
    out = main(steps=args.steps, device=args.device, overflow_at=args.overflow_at)
    print(f"loss {out.losses[0]:.3f} -> {out.losses[-1]:.3f}, accuracy {out.accuracy:.3f}, last lr {out.lrs[-1]:.2e}")
    print(f"steps skipped by the GradScaler: {out.skipped}, final scale {out.scales[-1]:g}")
