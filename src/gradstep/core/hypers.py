"""Hyperparameter declarations: name, default, validation.

Every transform declares the hyperparameters it reads as :class:`Hyper` objects. An optimizer's ``defaults`` is the
union of its transforms' declarations (plus the core's own options), and every value that reaches a param group, at
construction, through ``add_param_group`` or through ``set_hyper``, goes through the declaration's check. A bad
value raises ``ValueError`` naming the argument and the value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Hyper",
    "REQUIRED",
    "beta_pair",
    "beta_triple",
    "boolean",
    "momentum_factor",
    "non_negative",
    "non_negative_int",
    "non_negative_or_inf",
    "one_of",
    "optional_positive",
    "optional_bool",
    "positive",
    "spread",
    "unit_interval",
]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()
"""Default of a hyperparameter that has no default (fastai's ``lr``): every group must give it."""

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter read by a transform.

    Attributes:
        name: the ``param_groups`` key (torch's name where torch has one).
        default: the value used when neither the constructor nor the group gives one.
        check: returns ``None`` when a value is valid, else what a valid value looks like.
        doc: one line for ``gradstep list`` and the docs.
        scalar: whether a ``slice`` or a list given for it is spread over the groups (fastai's discriminative
            learning rates). Tuple-valued hyperparameters such as ``betas`` are not scalar.
    """

    name: str
    default: Any
    check: Check
    doc: str = ""
    scalar: bool = True

    def validate(self, value: Any) -> Any:
        if value is REQUIRED:
            return value
        problem = self.check(value)
        if problem is not None:
            raise ValueError(f"Invalid {self.name}: {value!r} ({problem})")
        return value


def _real(value: Any) -> float | None:
    """A real number (numpy scalars included) or a one-element real tensor of any shape, as a float; else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and (value.is_floating_point() or _is_int(value)):
        # Construction-time check of a tensor hyperparameter (torch takes any one-element tensor); never in step().
        return float(value.detach().cpu().item())
    return None


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def non_negative(value: Any) -> str | None:
    x = _real(value)
    if x is None or not math.isfinite(x) or x < 0:
        return "must be a finite real number >= 0"
    return None


def non_negative_or_inf(value: Any) -> str | None:
    """Check for a real number >= 0 where +inf means "no bound" (a cap, a clip range's upper end)."""
    x = _real(value)
    if x is None or math.isnan(x) or x < 0:
        return "must be a real number >= 0 (inf: no bound)"
    return None


def positive(value: Any) -> str | None:
    x = _real(value)
    if x is None or math.isnan(x) or x <= 0:
        return "must be a real number > 0"
    return None


def non_negative_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be an int >= 0"
    return None


def unit_interval(value: Any) -> str | None:
    x = _real(value)
    if x is None or math.isnan(x) or not 0.0 <= x < 1.0:
        return "must be in [0, 1)"
    return None


def momentum_factor(value: Any) -> str | None:
    """Check for a momentum factor: a real number in [0, 1] (beyond 1 the buffer grows without bound)."""
    x = _real(value)
    if x is None or math.isnan(x) or not 0.0 <= x <= 1.0:
        return "must be a real number in [0, 1]"
    return None


def unit_interval_closed(value: Any) -> str | None:
    x = _real(value)
    if x is None or math.isnan(x) or not 0.0 <= x <= 1.0:
        return "must be in [0, 1]"
    return None


def beta_pair(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (beta1, beta2)"
    for i, beta in enumerate(value):
        if unit_interval(beta) is not None:
            return f"betas[{i}] must be in [0, 1)"
    return None


def beta_triple(value: Any) -> str | None:
    """Check for a ``betas`` triple (beta1, beta2, beta3), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return "must be a triple (beta1, beta2, beta3)"
    for i, beta in enumerate(value):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            return f"betas[{i}] must be in [0, 1)"
    return None


def optional_positive(value: Any) -> str | None:
    """Check for ``None`` or a real number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        return "must be None or a real number > 0"
    return None


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def optional_bool(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "must be None, True or False"


@dataclass(frozen=True)
class _OneOf:
    """The check of :func:`one_of`: a class, not a closure, so that optimizers holding it can be pickled."""

    choices: tuple[Any, ...]

    def __call__(self, value: Any) -> str | None:
        ok = any(value is c or (type(value) is type(c) and value == c) for c in self.choices)
        return None if ok else f"must be one of {', '.join(map(repr, self.choices))}"


def one_of(*choices: Any) -> Check:
    return _OneOf(tuple(choices))


def spread(value: Any, n_groups: int, name: str = "a hyperparameter") -> list[Any]:
    """One value per group from a scalar, a list, or a ``slice`` (fastai's discriminative learning rates).

    ``slice(lo, hi)`` spreads geometrically from ``lo`` (first group) to ``hi`` (last group); ``slice(hi)`` gives
    ``hi / 10`` to every group but the last, which gets ``hi``. A list must have one value per group.
    """
    if isinstance(value, slice):
        if value.step is not None:
            raise ValueError(f"Invalid {name}: a slice of values takes no step, got {value!r}")
        lo, hi = value.start, value.stop
        if hi is None:
            raise ValueError(f"Invalid {name}: a slice of values needs a stop, got {value!r}")
        if lo is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        if n_groups == 1:
            return [hi]
        if lo <= 0 or hi <= 0:
            raise ValueError(f"Invalid {name}: a geometric slice needs positive ends, got {value!r}")
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * n_groups
        if len(value) != n_groups:
            raise ValueError(
                f"Invalid {name}: got {len(value)} values for {n_groups} parameter group(s) (one value per group)"
            )
        return list(value)
    return [value] * n_groups


def expand_hypers(hypers: dict[str, Any], declared: dict[str, Hyper], groups: Sequence[dict[str, Any]]) -> None:
    """Give each group without its own value the i-th value of every spread (slice or list) hyperparameter."""
    for name, value in list(hypers.items()):
        hyper = declared.get(name)
        spreadable = isinstance(value, slice) or (isinstance(value, list) and hyper is not None and hyper.scalar)
        if not spreadable:
            continue
        values = spread(value, len(groups), name)
        for group, v in zip(groups, values):
            group.setdefault(name, v)
        hypers[name] = values[-1]
