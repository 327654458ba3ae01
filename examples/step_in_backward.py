"""Gradient release: each parameter is stepped during backward, as soon as its gradient is complete, and the
gradient freed at once; the result is the normal loop's, bit for bit.

Run: ``python examples/step_in_backward.py``.
"""

from __future__ import annotations

import torch
from torch import nn

import gradstep


def train(release: bool, steps: int = 20) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    opt = gradstep.AdamW(gradstep.param_groups(model, weight_decay=0.01), lr=3e-3, nonfinite="zero")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    handle = gradstep.step_in_backward(opt) if release else None
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # with release: every parameter is stepped in here, and no gradient is left over
        opt.step()  # with release: bookkeeping only (counts the step, runs step hooks); keep it for schedulers
        opt.zero_grad()
        sched.step()
    if handle is not None:
        handle.remove()  # back to the normal loop
    return model


def main() -> bool:
    normal, released = train(release=False), train(release=True)
    same = all(torch.equal(a, b) for a, b in zip(normal.state_dict().values(), released.state_dict().values()))
    print(f"stepping in backward gives the normal loop's weights bit for bit: {same}")
    return same


if __name__ == "__main__":
    main()
