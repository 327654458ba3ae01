"""Small benchmark tasks for comparing optimizers (``gradstep compare``).

A :class:`Task` owns its data, builds its model with the same initial weights on every call, yields the same
minibatches in the same order for every optimizer, and evaluates a model. :func:`train` runs one optimizer on a task
and returns a :class:`History` (per-epoch curves and wall time), so differences between two histories come from the
optimizers alone.

Example::

    >>> import gradstep
    >>> from gradstep.tasks import DigitsMLP, train
    >>> task = DigitsMLP(seed=0)                                     # doctest: +SKIP
    >>> history = train(task, lambda ps: gradstep.create("adamw", ps), epochs=10)  # doctest: +SKIP
    >>> history.final("test_accuracy")                               # doctest: +SKIP
    0.97...

Only :class:`DigitsMLP` exists so far; it needs scikit-learn (``pip install 'gradstep[cli]'``) for the bundled
digits data set, imported when the task is built so that ``import gradstep.tasks`` needs torch alone.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .core.nonfinite import NonFiniteError

__all__ = ["TASKS", "DigitsMLP", "History", "MissingDependency", "Task", "load_digits", "train"]

Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class MissingDependency(ImportError):
    """An optional dependency of a task (scikit-learn) is not installed."""


@dataclass(frozen=True)
class Split:
    """A train/test split as float32 features and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download), split and standardised.

    The split is stratified and fixed by ``split_seed`` (not by the training seed), so every run of a comparison is
    scored on the same test images. Features are standardised with the training set's mean and deviation only.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise MissingDependency(
            "the digits task needs scikit-learn: pip install 'gradstep[cli]' (or scikit-learn)"
        ) from None
    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    scaler = StandardScaler().fit(x_train)
    return Split(
        torch.tensor(scaler.transform(x_train), dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(scaler.transform(x_test), dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64),
    )


class Task(ABC):
    """A training problem: data, a model with fixed initial weights, minibatches, a loss and an evaluation.

    Subclasses set ``name`` and ``description`` and implement the abstract methods. ``evaluate`` returns the
    metrics recorded after every epoch; the keys ``train_loss``, ``test_loss`` and ``test_accuracy`` are the ones
    ``gradstep compare`` prints (a task without a test set or an accuracy simply leaves them out).
    """

    name: str = ""
    description: str = ""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

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
        """Metrics of the current model (``train_loss``, ``test_loss``, ``test_accuracy`` where they apply)."""

    def steps_per_epoch(self) -> int:
        return sum(1 for _ in self.batches(0))


class DigitsMLP(Task):
    """A 64-128-10 MLP (ReLU) on scikit-learn's digits, cross-entropy loss, shuffled minibatches.

    Args:
        seed: fixes the initial weights and the order of the minibatches.
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        hidden: width of the hidden layer.
        data: a :class:`Split` to use instead of :func:`load_digits` (several tasks can share one).
    """

    name = "digits"
    description = "MLP 64-128-10 on scikit-learn's 8x8 digits (1347 train / 450 test images)"

    def __init__(self, seed: int = 0, batch_size: int = 64, hidden: int = 128, data: Split | None = None) -> None:
        super().__init__(seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.batch_size = batch_size
        self.hidden = hidden
        self.data = data if data is not None else load_digits()

    def build_model(self) -> nn.Module:
        n_in = self.data.x_train.shape[1]
        n_out = int(self.data.y_train.max()) + 1
        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_out))

    def batches(self, epoch: int) -> Iterator[Batch]:
        # A generator of its own per (seed, epoch): the order depends on nothing an optimizer could change.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.y_train), generator=gen)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.data.x_train[idx], self.data.y_train[idx]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        d = self.data
        logits_test = model(d.x_test)
        return {
            # The whole training set after the epoch, not the mean over the epoch's batches (which mixes models).
            "train_loss": nn.functional.cross_entropy(model(d.x_train), d.y_train).item(),
            "test_loss": nn.functional.cross_entropy(logits_test, d.y_test).item(),
            "test_accuracy": (logits_test.argmax(dim=1) == d.y_test).float().mean().item(),
        }


TASKS: dict[str, Callable[..., Task]] = {DigitsMLP.name: DigitsMLP}
"""The tasks ``gradstep compare --task`` knows, by name; each is built as ``TASKS[name](seed=..., batch_size=...)``."""


@dataclass
class History:
    """What :func:`train` recorded for one optimizer.

    Attributes:
        label: what the optimizer was called (the command line's spec).
        task: the task's name.
        epochs: epochs requested.
        curves: metric name -> one value per completed epoch (shorter than ``epochs`` if training diverged).
        steps: optimizer steps taken.
        wall_time: seconds spent training and evaluating.
        diverged: why training stopped early (a non-finite loss or gradient), else ``None``.
    """

    label: str
    task: str
    epochs: int
    curves: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    wall_time: float = 0.0
    diverged: str | None = None

    def final(self, metric: str) -> float | None:
        values = self.curves.get(metric)
        return values[-1] if values else None

    def best(self, metric: str) -> float | None:
        """The lowest value of a loss, the highest of anything else (accuracies); non-finite values are ignored."""
        values = [v for v in self.curves.get(metric, []) if math.isfinite(v)]
        if not values:
            return None
        return min(values) if "loss" in metric else max(values)

    def summary(self) -> dict[str, float | None]:
        return {
            "final_train_loss": self.final("train_loss"),
            "best_test_loss": self.best("test_loss"),
            "final_test_accuracy": self.final("test_accuracy"),
            "best_test_accuracy": self.best("test_accuracy"),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become ``None``, which JSON can hold)."""

        def clean(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "label": self.label,
            "task": self.task,
            "epochs": self.epochs,
            "steps": self.steps,
            "wall_time": self.wall_time,
            "diverged": self.diverged,
            **{k: clean(v) for k, v in self.summary().items()},
            "curves": {k: [clean(v) for v in vs] for k, vs in self.curves.items()},
        }


def _closure(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, losses: list[float]
) -> Callable[[], Any]:
    """The closure of one step; it appends each loss it computes to ``losses``."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        return loss

    return closure


def train(
    task: Task,
    make_optimizer: OptimizerFactory,
    epochs: int,
    *,
    label: str = "",
    on_step: Callable[[float], None] | None = None,
) -> History:
    """Train ``task``'s model from its initial weights with the optimizer ``make_optimizer(model.parameters())``.

    Every step goes through ``optimizer.step(closure)``, so optimizers that need a closure work too. Training stops
    early, with ``History.diverged`` set, at the first non-finite minibatch loss or on gradstep's
    :class:`~gradstep.NonFiniteError`. ``on_step(loss)`` is called after every step (progress bars).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model = task.init_model()
    optimizer = make_optimizer(model.parameters())
    history = History(label=label, task=task.name, epochs=epochs)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in task.batches(epoch):
            losses: list[float] = []
            try:
                optimizer.step(_closure(task, model, optimizer, batch, losses))
            except NonFiniteError as exc:
                history.diverged = f"epoch {epoch + 1}, step {history.steps + 1}: {exc}"
                break
            history.steps += 1
            # The loss of the closure's first call: the batch's loss before the step, whatever step() returns.
            value = losses[0] if losses else math.nan
            if on_step is not None:
                on_step(value)
            if not math.isfinite(value):
                history.diverged = f"epoch {epoch + 1}, step {history.steps}: the training loss is {value}"
                break
        if history.diverged is not None:
            break
        model.eval()
        for name, value in task.evaluate(model).items():
            history.curves.setdefault(name, []).append(value)
    history.wall_time = time.perf_counter() - start
    return history
