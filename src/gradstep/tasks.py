"""Small, offline benchmark tasks for comparing optimizers (``gradstep compare`` and ``gradstep lr-find``).

A :class:`Task` owns its data, builds its model with the same initial weights on every call, yields the same
minibatches in the same order for every optimizer, and evaluates a model. :func:`train` runs one optimizer on a task
for a number of steps and returns a :class:`History` (per-step minibatch losses, metrics at evaluation points, the
trajectory of a 2-D task, wall time), so differences between two histories come from the optimizers alone.
:func:`sweep_lr` is the short learning-rate sweep of ``compare --lr auto``; :func:`lr_range_test` is the LR range
test of ``lr-find``.

The tasks (:data:`TASKS`), none of which downloads anything:

=============  ==============================================================================================
task           what is trained
=============  ==============================================================================================
digits-mlp     an MLP 64-128-10 on scikit-learn's bundled 8x8 digits (needs scikit-learn)
digits-cnn     a small CNN (two 3x3 convolutions, max-pool, linear) on the same digits
char-lm        a character-level GRU language model on the Python standard library's own source files
rosenbrock     the 2-D Rosenbrock function from (-2, 2); its minimum is at (1, 1)
rastrigin      the 2-D Rastrigin function from (-2, 3.5); many local minima, the global one at (0, 0)
=============  ==============================================================================================

Example::

    >>> import gradstep
    >>> from gradstep.tasks import Rosenbrock, train
    >>> task = Rosenbrock()
    >>> history = train(task, lambda ps: gradstep.create("adam", ps, lr=0.05), steps=300)
    >>> history.best("loss") < task.evaluate(task.init_model())["loss"]
    True
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .core.nonfinite import NonFiniteError

__all__ = [
    "TASKS",
    "CharLM",
    "DigitsCNN",
    "DigitsMLP",
    "History",
    "LRFinderResult",
    "Metric",
    "MissingDependency",
    "Rastrigin",
    "Rosenbrock",
    "SweepResult",
    "Target",
    "Task",
    "load_digits",
    "load_stdlib_text",
    "lr_range_test",
    "make_task",
    "sweep_lr",
    "train",
]

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


# digits


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
            "the digits tasks need scikit-learn: pip install 'gradstep[cli]' (or scikit-learn)"
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


_CLASSIFICATION_METRICS = (
    Metric("train_loss", "train loss"),
    Metric("test_loss", "test loss"),
    Metric("test_accuracy", "test acc", higher_is_better=True),
)


class _DigitsTask(Task):
    """Shared by the digits tasks: shuffled minibatches, cross-entropy, loss and accuracy on the whole split."""

    metrics = _CLASSIFICATION_METRICS
    target = Target("test_accuracy", 0.95, higher_is_better=True)

    def __init__(self, seed: int = 0, batch_size: int | None = None, data: Split | None = None) -> None:
        super().__init__(seed, batch_size)
        self.data = data if data is not None else load_digits()

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
            # The whole training set, not the mean over recent batches (which mixes models).
            "train_loss": nn.functional.cross_entropy(model(d.x_train), d.y_train).item(),
            "test_loss": nn.functional.cross_entropy(logits_test, d.y_test).item(),
            "test_accuracy": (logits_test.argmax(dim=1) == d.y_test).float().mean().item(),
        }


class DigitsMLP(_DigitsTask):
    """A 64-128-10 MLP (ReLU) on scikit-learn's digits, cross-entropy loss, shuffled minibatches.

    Args:
        seed: fixes the initial weights and the order of the minibatches.
        batch_size: minibatch size (the last batch of an epoch may be smaller).
        hidden: width of the hidden layer.
        data: a :class:`Split` to use instead of :func:`load_digits` (several tasks can share one).
    """

    name = "digits-mlp"
    description = "MLP 64-128-10 on scikit-learn's 8x8 digits (1347 train / 450 test images)"

    def __init__(
        self, seed: int = 0, batch_size: int | None = None, hidden: int = 128, data: Split | None = None
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        super().__init__(seed, batch_size, data)
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        n_in = self.data.x_train.shape[1]
        n_out = int(self.data.y_train.max()) + 1
        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_out))


class DigitsCNN(_DigitsTask):
    """A small CNN on the digits as 1x8x8 images: conv 3x3 (16) - ReLU - conv 3x3 (32) - ReLU - max-pool 2 - linear.

    Same data, minibatches and metrics as :class:`DigitsMLP`; about 21k parameters in six tensors.
    """

    name = "digits-cnn"
    description = "CNN conv16-conv32-pool-linear on scikit-learn's 8x8 digits (1347 train / 450 test images)"

    def build_model(self) -> nn.Module:
        n_out = int(self.data.y_train.max()) + 1
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, n_out),
        )


# character-level language model

STDLIB_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "shlex.py",
    "glob.py",
    "queue.py",
    "sched.py",
    "difflib.py",
    "calendar.py",
    "argparse.py",
    "dataclasses.py",
)
"""Standard library modules (plain ``.py`` files since Python 3.0 and still in 3.14) the text is read from, in
order; if they fall short, the remaining top-level ``.py`` files follow in sorted order."""

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
"""Newline and printable ASCII; any other character (tabs, non-ASCII) is one extra symbol, so 97 in all."""


def load_stdlib_text(chars: int = 65536, root: str | None = None) -> str:
    """The first ``chars`` characters of the standard library files :data:`STDLIB_FILES` (``root``: the directory
    of ``os.py`` unless given), concatenated. The same text on every machine with the same Python version."""
    root = root if root is not None else os.path.dirname(os.__file__)
    names = [n for n in STDLIB_FILES if os.path.isfile(os.path.join(root, n))]
    try:
        others = sorted(n for n in os.listdir(root) if n.endswith(".py") and n not in names)
    except OSError:
        others = []
    parts: list[str] = []
    total = 0
    for name in names + others:
        if total >= chars:
            break
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
    text = "".join(parts)[:chars]
    if len(text) < chars:
        raise MissingDependency(
            f"the char-lm task reads the Python standard library's .py files; only {len(text)} of {chars} characters "
            f"were found in {root}"
        )
    return text


def encode_text(text: str) -> Tensor:
    """Characters as indices into :data:`VOCAB` (anything else: ``len(VOCAB)``)."""
    index = {c: i for i, c in enumerate(VOCAB)}
    other = len(VOCAB)
    return torch.tensor([index.get(c, other) for c in text], dtype=torch.int64)


class _CharGRU(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


class CharLM(Task):
    """A character-level language model (embedding 32, GRU 128, linear) on Python standard library source text.

    The text is :func:`load_stdlib_text` (``chars`` characters); its last ``test_fraction`` is the test text. An
    epoch is every ``seq_len``-character window of the training text once, from an offset drawn per epoch, in a
    shuffled order; the loss is the mean cross-entropy of the next character (nats per character). The training loss
    is measured on the first 8,192 characters of the training text, the test loss and next-character accuracy on the
    whole test text.
    """

    name = "char-lm"
    description = "character-level GRU LM (embed 32, hidden 128) on 64k characters of the Python standard library"
    metrics = (
        Metric("train_loss", "train loss"),
        Metric("test_loss", "test loss"),
        Metric("test_accuracy", "test acc", higher_is_better=True),
    )
    target = Target("test_loss", 2.0)
    default_epochs = 6
    default_batch_size = 32

    def __init__(
        self,
        seed: int = 0,
        batch_size: int | None = None,
        seq_len: int = 64,
        chars: int = 65536,
        hidden: int = 128,
        embed: int = 32,
        test_fraction: float = 0.125,
        text: str | None = None,
    ) -> None:
        super().__init__(seed, batch_size)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.hidden, self.embed = seq_len, hidden, embed
        tokens = encode_text(text if text is not None else load_stdlib_text(chars))
        n_test = int(len(tokens) * test_fraction)
        self.train_tokens, self.test_tokens = tokens[: len(tokens) - n_test], tokens[len(tokens) - n_test :]
        # Windows start at offset, offset + seq_len, ...: this many fit whatever the offset (< seq_len) is.
        self.windows = len(self.train_tokens) // seq_len - 1
        if self.windows < 1 or len(self.test_tokens) < seq_len + 1:
            raise ValueError(f"the text is too short for seq_len {seq_len}")

    def build_model(self) -> nn.Module:
        return _CharGRU(len(VOCAB) + 1, self.embed, self.hidden)

    def _windows(self, tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = tokens[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(self.seq_len, (), generator=gen))
        starts = offset + self.seq_len * torch.randperm(self.windows, generator=gen)
        for i in range(0, len(starts), self.batch_size):
            yield self._windows(self.train_tokens, starts[i : i + self.batch_size])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _score(self, model: nn.Module, tokens: Tensor) -> tuple[float, float]:
        starts = torch.arange(0, len(tokens) - self.seq_len, self.seq_len)
        x, y = self._windows(tokens, starts)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        return loss, (logits.argmax(-1) == y).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        train_loss, _ = self._score(model, self.train_tokens[:8192])
        test_loss, test_accuracy = self._score(model, self.test_tokens)
        return {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_accuracy}


# 2-D functions


class _Point(nn.Module):
    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(start, dtype=torch.float64))


class Function2D(Task):
    """Minimising a function of two variables from a fixed start (full-batch: every step sees the same function).

    The "model" is one float64 parameter, the point ``(x, y)``; :meth:`position` is recorded after every step, so
    the trajectory can be drawn over the contour plot (:func:`gradstep.plots.plot_trajectories`). An epoch is
    ``steps_per_epoch`` steps; the seed and the batch size change nothing.
    """

    start: tuple[float, float] = (0.0, 0.0)
    minimum: tuple[float, float] = (0.0, 0.0)
    extent: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0)
    """``(x_min, x_max, y_min, y_max)`` of the contour plot."""
    log_contours: bool = True
    metrics = (Metric("loss", "f(x, y)"), Metric("distance", "distance to min"))
    default_epochs = 5
    eval_every = 1
    _steps_per_epoch = 100

    @staticmethod
    @abstractmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        """The function, elementwise on tensors (also on the contour plot's grid)."""

    def build_model(self) -> nn.Module:
        return _Point(self.start)

    def batches(self, epoch: int) -> Iterator[Batch]:
        for _ in range(self._steps_per_epoch):
            yield None

    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        xy = model.get_parameter("xy")
        return self.function(xy[0], xy[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        xy = model.get_parameter("xy")
        distance = math.hypot(xy[0].item() - self.minimum[0], xy[1].item() - self.minimum[1])
        return {"loss": self.function(xy[0], xy[1]).item(), "distance": distance}

    def position(self, model: nn.Module) -> list[float] | None:
        return [float(v) for v in model.get_parameter("xy").detach()]


class Rosenbrock(Function2D):
    """Rosenbrock's banana: ``(1 - x)^2 + 100 (y - x^2)^2`` from (-2, 2); the minimum 0 is at (1, 1), at the end of
    a long curved valley (Rosenbrock, 1960). 500 steps by default."""

    name = "rosenbrock"
    description = "2-D Rosenbrock function (1-x)^2 + 100(y-x^2)^2 from (-2, 2); minimum 0 at (1, 1)"
    start = (-2.0, 2.0)
    minimum = (1.0, 1.0)
    extent = (-2.5, 2.5, -1.0, 4.0)
    target = Target("loss", 1e-3)

    @staticmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2


class Rastrigin(Function2D):
    """Rastrigin's function: ``20 + x^2 + y^2 - 10 (cos 2 pi x + cos 2 pi y)`` from (-2, 3.5); a local minimum
    near every integer point, the global one (0) at the origin (Rastrigin, 1974). 500 steps by default."""

    name = "rastrigin"
    description = "2-D Rastrigin function 20 + sum(x^2 - 10 cos 2 pi x) from (-2, 3.5); minimum 0 at (0, 0)"
    start = (-2.0, 3.5)
    minimum = (0.0, 0.0)
    extent = (-4.5, 4.5, -4.5, 4.5)
    log_contours = False
    target = Target("loss", 1e-2)

    @staticmethod
    def function(x: Tensor, y: Tensor) -> Tensor:
        return 20 + x**2 + y**2 - 10 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))


TASKS: dict[str, Callable[..., Task]] = {t.name: t for t in (DigitsMLP, DigitsCNN, CharLM, Rosenbrock, Rastrigin)}
"""The tasks the command line knows, by name; each is built as ``TASKS[name](seed=..., batch_size=...)``."""

ALIASES = {"digits": "digits-mlp"}


def make_task(name: str, seed: int = 0, batch_size: int | None = None) -> Task:
    """Build the task ``name`` (or an alias, e.g. ``digits``); an unknown name raises ``KeyError``."""
    cls = TASKS[ALIASES.get(name, name)]
    return cls(seed=seed, batch_size=batch_size)


# --- training ---------------------------------------------------------------------------------------------------


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


# --- learning rates ---------------------------------------------------------------------------------------------

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
