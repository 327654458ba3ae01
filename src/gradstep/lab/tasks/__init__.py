"""Small, offline benchmark tasks for comparing optimizers (``gradstep compare`` and ``gradstep lr-find``).

One module per task family (:mod:`~gradstep.lab.tasks.digits`, :mod:`~gradstep.lab.tasks.char_lm`,
:mod:`~gradstep.lab.tasks.functions`), the shared :mod:`~gradstep.lab.tasks.base`, :mod:`~gradstep.lab.tasks.training`
and :mod:`~gradstep.lab.tasks.lr`. A :class:`Task` owns its data, builds its model with the same initial weights on
every call, yields the same minibatches in the same order for every optimizer, and evaluates a model. :func:`train`
runs one optimizer on a task for a number of steps and returns a :class:`History` (per-step minibatch losses, metrics
at evaluation points, the trajectory of a 2-D task, wall time), so differences between two histories come from the
optimizers alone. :func:`sweep_lr` is the short learning-rate sweep of ``compare --lr auto``; :func:`lr_range_test` is
the LR range test of ``lr-find``.

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
    >>> from gradstep.lab.tasks import Rosenbrock, train
    >>> task = Rosenbrock()
    >>> history = train(task, lambda ps: gradstep.create("adam", ps, lr=0.05), steps=300)
    >>> history.best("loss") < task.evaluate(task.init_model())["loss"]
    True
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Batch, Metric, MissingDependency, OptimizerFactory, Target, Task
from .char_lm import STDLIB_FILES, VOCAB, CharLM, encode_text, load_stdlib_text
from .digits import DigitsCNN, DigitsMLP, Split, load_digits
from .functions import Function2D, Rastrigin, Rosenbrock
from .lr import LRFactory, LRFinderResult, SweepResult, lr_range_test, sweep_lr
from .training import History, train

__all__ = [
    "ALIASES",
    "STDLIB_FILES",
    "TASKS",
    "VOCAB",
    "Batch",
    "LRFactory",
    "OptimizerFactory",
    "CharLM",
    "DigitsCNN",
    "DigitsMLP",
    "Function2D",
    "History",
    "LRFinderResult",
    "Metric",
    "MissingDependency",
    "Rastrigin",
    "Rosenbrock",
    "Split",
    "SweepResult",
    "Target",
    "Task",
    "encode_text",
    "load_digits",
    "load_stdlib_text",
    "lr_range_test",
    "make_task",
    "sweep_lr",
    "train",
]

TASKS: dict[str, Callable[..., Task]] = {t.name: t for t in (DigitsMLP, DigitsCNN, CharLM, Rosenbrock, Rastrigin)}
"""The tasks the command line knows, by name; each is built as ``TASKS[name](seed=..., batch_size=...)``."""

ALIASES = {"digits": "digits-mlp"}


def make_task(name: str, seed: int = 0, batch_size: int | None = None) -> Task:
    """Build the task ``name`` (or an alias, e.g. ``digits``); an unknown name raises ``KeyError``."""
    cls = TASKS[ALIASES.get(name, name)]
    return cls(seed=seed, batch_size=batch_size)
