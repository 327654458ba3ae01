"""What every task is: a :class:`Task` (data, a model with fixed initial weights, minibatches, a loss, an evaluation),
the :class:`Metric` it reports and the :class:`Target` of "steps to target"."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Metric", "MissingDependency", "OptimizerFactory", "Target", "Task"]


Batch = Any
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class MissingDependency(ImportError):
    """Something a task needs is not there (scikit-learn, or the standard library's source files)."""


# --- metrics and targets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A number :meth:`Task.evaluate` reports: its key, a short label for tables, and which way is better."""

    key: str
    label: str
    higher_is_better: bool = False


@dataclass(frozen=True)
class Target:
    """ "Steps to target": the first evaluation at which ``metric`` reaches ``value`` (>= if higher is better)."""

    metric: str
    value: float
    higher_is_better: bool = False

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.value if self.higher_is_better else value <= self.value

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:g}"


# --- tasks ------------------------------------------------------------------------------------------------------


class Task(ABC):
    """A training problem: data, a model with fixed initial weights, minibatches, a loss and an evaluation.

    Subclasses set the class attributes and implement the abstract methods.

    Attributes:
        name: the command line's name of the task.
        description: one line, with the sizes that matter.
        metrics: what :meth:`evaluate` returns, in table order.
        target: the default target of "steps to target".
        default_epochs: how long ``gradstep compare`` trains when told nothing.
        eval_every: steps between evaluations (``None``: once per epoch).
    """

    name: str = ""
    description: str = ""
    metrics: tuple[Metric, ...] = ()
    target: Target | None = None
    default_epochs: int = 10
    default_batch_size: int = 64
    eval_every: int | None = None

    def __init__(self, seed: int = 0, batch_size: int | None = None) -> None:
        self.seed = seed
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh, randomly initialised model (called under a fixed seed by :meth:`init_model`)."""

    def init_model(self) -> nn.Module:
        """The model with the task's initial weights: identical on every call for a given seed.

        The global RNG is seeded inside a forked RNG state, so the caller's random stream is left untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build_model()

    @abstractmethod
    def batches(self, epoch: int) -> Iterator[Batch]:
        """The minibatches of one epoch: the same sequence for a given seed and epoch, whatever the optimizer."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The scalar training loss of one minibatch."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The task's :attr:`metrics` for the current model."""

    def steps_per_epoch(self) -> int:
        return sum(1 for _ in self.batches(0))

    def position(self, model: nn.Module) -> list[float] | None:
        """The point a 2-D task's model is at (its trajectory is recorded); ``None`` for other tasks."""
        return None

    def stream(self) -> Iterator[Batch]:
        """Minibatches for as long as they are asked for: epoch 0, then epoch 1, ..."""
        epoch = 0
        while True:
            yield from self.batches(epoch)
            epoch += 1
