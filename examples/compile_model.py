"""A torch.compile'd model trained by a gradstep optimizer, and the optimizer's own fast path.

``torch.compile(model)`` returns a module that shares the model's parameters, so the optimizer is built on them as
usual. ``compiled=True`` additionally runs the optimizer's whole step for each parameter group as one compiled
function (see docs/fast-path.md); schedulers can change ``lr``, ``betas``, ``momentum`` and ``weight_decay`` every step
without a recompilation.

    python examples/compile_model.py                      # inductor: the first steps compile (tens of seconds)
    python examples/compile_model.py --compile-optimizer  # the optimizer's fast path too
    python examples/compile_model.py --backend eager      # dynamo only: quick, to check the graph capture
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import gradstep


class ConvNet(nn.Module):
    """A small CNN for 1x16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of noisy images: a bright bar in one of four orientations/positions."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 1, 16, 16, generator=gen)
    x[y == 0, :, 4:6, :] += 1.0  # horizontal bar, top
    x[y == 1, :, 10:12, :] += 1.0  # horizontal bar, bottom
    x[y == 2, :, :, 4:6] += 1.0  # vertical bar, left
    x[y == 3, :, :, 10:12] += 1.0  # vertical bar, right
    return x, y


def main(
    steps: int = 100,
    batch_size: int = 32,
    backend: str | None = "inductor",
    compile_optimizer: bool = False,
    seed: int = 0,
) -> list[float]:
    """Train for ``steps`` and return the losses; ``backend=None`` trains the model uncompiled."""
    torch.manual_seed(seed)
    x, y = make_data(1024, seed)
    model = ConvNet()
    forward = torch.compile(model, backend=backend) if backend is not None else model
    optimizer = gradstep.AdamW(
        gradstep.param_groups(model, weight_decay=0.01), lr=3e-3, compiled=compile_optimizer
    )  # the parameters of `model` itself: `forward` shares them
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--compile-optimizer", action="store_true", help="the optimizer's fast path (compiled=True)")
    args = parser.parse_args()
    start = time.perf_counter()
    losses = main(steps=args.steps, backend=args.backend, compile_optimizer=args.compile_optimizer)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f} s (compilation included)")
