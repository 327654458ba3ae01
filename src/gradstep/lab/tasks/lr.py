"""Learning rates: the short sweep of ``compare --lr auto`` (:func:`sweep_lr`) and the LR range test of ``lr-find``
(:func:`lr_range_test`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...routing import model_scope
from .base import Task
from .training import _clean, _take_step, train

__all__ = ["LRFactory", "LRFinderResult", "SweepResult", "lr_range_test", "sweep_lr"]


LRFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@dataclass
class SweepResult:
    """The short runs of :func:`sweep_lr`: each lr tried, its score (lower is better; ``inf``: diverged)."""

    label: str
    lrs: list[float]
    scores: list[float]
    best_lr: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "steps": self.steps,
            "best_lr": self.best_lr,
            "lrs": list(self.lrs),
            "scores": [_clean(s) for s in self.scores],
        }


def sweep_lr(
    task: Task,
    make_optimizer: LRFactory,
    center: float,
    steps: int,
    *,
    label: str = "",
    points: int = 7,
    factor: float = math.sqrt(10),
    max_extra: int = 4,
    on_step: Callable[[float], None] | None = None,
) -> SweepResult:
    """Pick a learning rate by short runs: ``points`` lrs spaced by ``factor`` around ``center``, ``steps`` each.

    A run's score is its mean minibatch loss over the last quarter of its steps (training data only: the test set
    plays no part in the choice); a run that diverges scores ``inf``. While the best lr is at an edge of the grid, the
    grid grows by one lr on that side, at most ``max_extra`` times. Ties go to the smaller lr.
    """
    if center <= 0 or not math.isfinite(center):
        raise ValueError(f"the sweep needs a positive center lr, got {center}")
    if points < 1 or steps < 1:
        raise ValueError("points and steps must be >= 1")
    half = points // 2
    tried: dict[int, float] = {}

    def lr_at(k: int) -> float:
        # Three significant digits: the chosen lr is one a person can type, and the same on every machine.
        return float(f"{center * factor**k:.3g}")

    def score(k: int) -> float:
        if k not in tried:
            lr = lr_at(k)
            history = train(task, lambda ps: make_optimizer(ps, lr), steps, eval_every=steps, on_step=on_step)
            tail = history.step_loss[-max(1, steps // 4) :]
            ok = history.diverged is None and tail and all(math.isfinite(v) for v in tail)
            tried[k] = sum(tail) / len(tail) if ok else math.inf
        return tried[k]

    for k in range(-half, points - half):
        score(k)
    for _ in range(max_extra):
        best = min(sorted(tried), key=lambda k: tried[k])
        if best == min(tried) or not math.isfinite(tried[best]):  # every run diverged: go lower
            score(min(tried) - 1)
        elif best == max(tried):
            score(best + 1)
        else:
            break
    ks = sorted(tried)
    best = min(ks, key=lambda k: tried[k])
    return SweepResult(
        label=label,
        lrs=[lr_at(k) for k in ks],
        scores=[tried[k] for k in ks],
        best_lr=lr_at(best),
        steps=steps,
    )


@dataclass
class LRFinderResult:
    """The LR range test: the lr and minibatch loss of every step, the smoothed loss and the suggestions.

    Attributes:
        suggested_lr: the lr of the lowest smoothed loss divided by 10 (the usual rule of thumb).
        min_loss_lr: the lr at the lowest smoothed loss.
        steepest_lr: the lr where the smoothed loss falls fastest (per unit of log lr), before its minimum.
        stopped: why the test ended before ``end_lr`` (the loss blew up), else ``None``.
    """

    label: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float | None
    min_loss_lr: float | None
    steepest_lr: float | None
    start_lr: float
    end_lr: float
    steps: int
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "steps": self.steps,
            "suggested_lr": self.suggested_lr,
            "min_loss_lr": self.min_loss_lr,
            "steepest_lr": self.steepest_lr,
            "stopped": self.stopped,
            "lrs": list(self.lrs),
            "losses": [_clean(v) for v in self.losses],
            "smoothed": [_clean(v) for v in self.smoothed],
        }


def lr_range_test(
    task: Task,
    make_optimizer: LRFactory,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    *,
    label: str = "",
    smoothing: float = 0.9,
    diverge: float = 4.0,
    on_step: Callable[[float], None] | None = None,
) -> LRFinderResult:
    """The learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks"; fastai's
    ``lr_find``): one run whose lr grows exponentially from ``start_lr`` to ``end_lr`` over ``steps`` steps.

    The minibatch losses are smoothed by a bias-corrected exponential moving average (``smoothing``). fastai's 0.98
    averages over about 50 steps, half of a 100-step test, so its minimum lags the loss by several times in lr; 0.9
    averages over about 10. The test stops once the smoothed loss exceeds ``diverge`` times its minimum, or at a
    non-finite loss. Every group's ``lr`` is set before each step.
    """
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    model = task.init_model()
    with model_scope(model):  # as in train()
        optimizer = make_optimizer(model.parameters(), start_lr)
    ratio = math.log(end_lr / start_lr)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg = 0.0
    stopped = None
    batches = task.stream()
    model.train()
    for i in range(steps):
        lr = start_lr * math.exp(ratio * i / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        value, stop = _take_step(task, model, optimizer, next(batches))
        if not math.isfinite(value):
            stopped = f"the loss became {value} at lr {lr:.3g}"
            break
        lrs.append(lr)
        losses.append(value)
        avg = smoothing * avg + (1 - smoothing) * value
        smoothed.append(avg / (1 - smoothing ** (i + 1)))
        if on_step is not None:
            on_step(value)
        if stop is not None:
            stopped = f"{stop} at lr {lr:.3g}"
            break
        if i > 0 and smoothed[-1] > diverge * min(smoothed):
            stopped = f"the smoothed loss passed {diverge:g}x its minimum at lr {lr:.3g}"
            break
    suggested = min_lr = steepest = None
    if len(smoothed) >= 3:
        low = min(range(len(smoothed)), key=smoothed.__getitem__)
        min_lr = lrs[low]
        suggested = min_lr / 10
        # The steepest fall of the smoothed curve per unit of log lr, over the points before its minimum.
        slopes = [
            (smoothed[j + 1] - smoothed[j]) / (math.log(lrs[j + 1]) - math.log(lrs[j])) for j in range(max(low, 1))
        ]
        if slopes and low > 0:
            j = min(range(len(slopes)), key=slopes.__getitem__)
            steepest = lrs[j]
    return LRFinderResult(
        label=label,
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggested_lr=suggested,
        min_loss_lr=min_lr,
        steepest_lr=steepest,
        start_lr=start_lr,
        end_lr=end_lr,
        steps=steps,
        stopped=stopped,
    )
