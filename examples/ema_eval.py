"""An EMA of the weights, updated after every optimizer step and swapped in for evaluation.

Run: ``python examples/ema_eval.py``. A small classifier is trained with noisy steps; its EMA (with timm's warm-up)
usually evaluates better than the last weights, and the trained weights come back unchanged after the swap.
"""

from __future__ import annotations

import io

import torch
from torch import nn

import gradstep


def main(steps: int = 200) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, :3].sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = gradstep.SGD(model.parameters(), lr=1.0)  # large, noisy steps
    ema = gradstep.EMA(model, decay=0.99, use_warmup=True, warmup_power=3 / 4)
    ema.attach(opt)  # ema.update() after every optimizer step
    for _ in range(steps):
        batch = torch.randint(0, 512, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()

    def test_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y))

    last = test_loss()
    with ema.swapped():  # the averaged weights, for evaluation only
        averaged = test_loss()
    assert test_loss() == last  # the trained weights are back, bit for bit
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)  # checkpoint it beside the model and the optimizer
    buffer.seek(0)
    ema.load_state_dict(torch.load(buffer, weights_only=True))  # tensors and numbers only
    print(f"loss with the last weights {last:.4f}, with the EMA {averaged:.4f} ({ema.num_updates} updates)")
    return last, averaged


if __name__ == "__main__":
    main()
