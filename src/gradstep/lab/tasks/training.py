"""Training one optimizer on a task: :func:`train` and the :class:`History` it records."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.nonfinite import NonFiniteError
from ...routing import model_scope
from .base import Batch, OptimizerFactory, Target, Task

__all__ = ["History", "train"]


@dataclass
class History:
    """What :func:`train` recorded for one optimizer.

    Attributes:
        label: what the optimizer was called (the command line's spec).
        task: the task's name.
        steps_requested: steps asked for.
        steps: steps taken (fewer if training diverged).
        step_loss: the minibatch loss before each step taken.
        eval_steps: the step after which each evaluation was made (0: the initial model).
        curves: metric -> one value per evaluation.
        trajectory: for 2-D tasks, the point before the first step and after each step.
        higher_is_better: the metrics whose best value is the highest (accuracies).
        target: the "steps to target" condition; ``steps_to_target`` the first evaluation step meeting it.
        wall_time: seconds spent in the training steps (forward, backward, optimizer step; evaluation excluded).
        eval_time: seconds spent evaluating.
        diverged: why training stopped early (a non-finite loss or gradient), else ``None``.
        lr: the learning rate used, where the caller recorded it.
    """

    label: str
    task: str
    steps_requested: int
    steps: int = 0
    step_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    trajectory: list[list[float]] = field(default_factory=list)
    higher_is_better: tuple[str, ...] = ()
    target: Target | None = None
    steps_to_target: int | None = None
    wall_time: float = 0.0
    eval_time: float = 0.0
    diverged: str | None = None
    lr: float | None = None

    def final(self, metric: str) -> float | None:
        values = self.curves.get(metric)
        return values[-1] if values else None

    def best(self, metric: str) -> float | None:
        """The lowest value of the metric, or the highest for accuracies; non-finite values are ignored."""
        values = [v for v in self.curves.get(metric, []) if math.isfinite(v)]
        if not values:
            return None
        return max(values) if metric in self.higher_is_better else min(values)

    def summary(self) -> dict[str, float | None]:
        """``final_<metric>`` and ``best_<metric>`` of every metric recorded."""
        out: dict[str, float | None] = {}
        for metric in self.curves:
            out[f"final_{metric}"] = self.final(metric)
            out[f"best_{metric}"] = self.best(metric)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``None``, which JSON can hold)."""
        return {
            "label": self.label,
            "task": self.task,
            "lr": _clean(self.lr),
            "steps_requested": self.steps_requested,
            "steps": self.steps,
            "wall_time": self.wall_time,
            "eval_time": self.eval_time,
            "diverged": self.diverged,
            "target": None if self.target is None else {"metric": self.target.metric, "value": self.target.value},
            "steps_to_target": self.steps_to_target,
            **{k: _clean(v) for k, v in self.summary().items()},
            "curves": {"step": list(self.eval_steps), **{k: [_clean(v) for v in vs] for k, vs in self.curves.items()}},
            "step_loss": [_clean(v) for v in self.step_loss],
            **({"trajectory": [[_clean(v) for v in xy] for xy in self.trajectory]} if self.trajectory else {}),
        }


def _clean(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _closure(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, losses: list[float]):
    """The closure of one step; it appends each loss it computes to ``losses``."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        return loss

    return closure


def _take_step(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch
) -> tuple[float, str | None]:
    """One ``optimizer.step(closure)``: the minibatch loss before the step, and why training must stop (or None)."""
    losses: list[float] = []
    try:
        optimizer.step(_closure(task, model, optimizer, batch, losses))
    except NonFiniteError as exc:
        return (losses[0] if losses else math.nan), str(exc)
    # The loss of the closure's first call: the batch's loss before the step, whatever step() returns.
    value = losses[0] if losses else math.nan
    if not math.isfinite(value):
        return value, f"the training loss is {value}"
    return value, None


def train(
    task: Task,
    make_optimizer: OptimizerFactory,
    steps: int | None = None,
    *,
    epochs: int | None = None,
    label: str = "",
    eval_every: int | None = None,
    target: Target | None = None,
    on_step: Callable[[float], None] | None = None,
) -> History:
    """Train ``task``'s model from its initial weights with the optimizer ``make_optimizer(model.parameters())``.

    Args:
        steps: optimizer steps (or give ``epochs``, which counts ``task.steps_per_epoch()`` steps each).
        eval_every: steps between evaluations (default: the task's, else once per epoch); the initial model and
            the last step are always evaluated.
        target: the "steps to target" condition (default: the task's).
        on_step: called with the minibatch loss after every step (progress bars).

    Every step goes through ``optimizer.step(closure)``, so optimizers that need a closure work too. Training stops
    early, with ``History.diverged`` set, at the first non-finite minibatch loss or on gradstep's
    :class:`~gradstep.NonFiniteError`.
    """
    if steps is None:
        if epochs is None:
            raise ValueError("give steps or epochs")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        steps = epochs * task.steps_per_epoch()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    every = eval_every or task.eval_every or task.steps_per_epoch()
    if every < 1:
        raise ValueError(f"eval_every must be >= 1, got {every}")
    history = History(
        label=label,
        task=task.name,
        steps_requested=steps,
        higher_is_better=tuple(m.key for m in task.metrics if m.higher_is_better),
        target=target if target is not None else task.target,
    )
    model = task.init_model()
    with model_scope(model):  # partition presets (muon_adamw) route the parameters by the model's names and modules
        optimizer = make_optimizer(model.parameters())

    def evaluate() -> None:
        start = time.perf_counter()
        model.eval()
        metrics = task.evaluate(model)
        model.train()
        history.eval_time += time.perf_counter() - start
        history.eval_steps.append(history.steps)
        for name, value in metrics.items():
            history.curves.setdefault(name, []).append(value)
        t = history.target
        if t is not None and history.steps_to_target is None and t.met(metrics.get(t.metric, math.nan)):
            history.steps_to_target = history.steps

    def record_position() -> None:
        point = task.position(model)
        if point is not None:
            history.trajectory.append(point)

    record_position()
    evaluate()
    batches = task.stream()
    model.train()
    while history.steps < steps:
        batch = next(batches)
        start = time.perf_counter()
        value, stop = _take_step(task, model, optimizer, batch)
        history.wall_time += time.perf_counter() - start
        if stop is not None:
            # Not counted as a step: gradstep refused it, or its loss says the model is already lost.
            history.diverged = f"step {history.steps + 1}: {stop}"
            break
        history.steps += 1
        history.step_loss.append(value)
        if on_step is not None:
            on_step(value)
        record_position()
        if history.steps % every == 0 or history.steps == steps:
            evaluate()
    return history
