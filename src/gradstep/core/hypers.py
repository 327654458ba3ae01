"""Hyperparameter declarations: name, default, validation.

Every transform declares the hyperparameters it reads as :class:`Hyper` objects. An optimizer's ``defaults`` is the
union of its transforms' declarations (plus the core's own options), and every value that reaches a param group, at
construction, through ``add_param_group`` or through ``set_hyper``, goes through the declaration's check. A bad
value raises ``ValueError`` naming the argument and the value.
"""

from __future__ import annotations

import math
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
    "non_negative",
    "non_negative_int",
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
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        # Construction-time check of a tensor hyperparameter; never runs inside step().
        return float(value.detach().cpu().item())
    return None


def non_negative(value: Any) -> str | None:
    x = _real(value)
    if x is None or math.isnan(x) or x < 0:
        return "must be a real number >= 0"
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


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def spread(value: Any, n_groups: int) -> list[Any]:
    """One value per group from a scalar, a list, or a ``slice`` (fastai's discriminative learning rates).

    ``slice(lo, hi)`` spreads geometrically from ``lo`` (first group) to ``hi`` (last group); ``slice(hi)`` gives
    ``hi / 10`` to every group but the last, which gets ``hi``. A list must have one value per group.
    """
    if isinstance(value, slice):
        if value.step is not None:
            raise ValueError(f"a slice of values takes no step, got {value!r}")
        lo, hi = value.start, value.stop
        if hi is None:
            raise ValueError(f"a slice of values needs a stop, got {value!r}")
        if lo is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        if n_groups == 1:
            return [hi]
        if lo <= 0 or hi <= 0:
            raise ValueError(f"a geometric slice needs positive ends, got {value!r}")
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * n_groups
        if len(value) != n_groups:
            raise ValueError(f"got {len(value)} values for {n_groups} parameter groups")
        return list(value)
    return [value] * n_groups


def expand_hypers(hypers: dict[str, Any], declared: dict[str, Hyper], groups: Sequence[dict[str, Any]]) -> None:
    """Give each group without its own value the i-th value of every spread (slice or list) hyperparameter."""
    for name, value in list(hypers.items()):
        hyper = declared.get(name)
        spreadable = isinstance(value, slice) or (isinstance(value, list) and hyper is not None and hyper.scalar)
        if not spreadable:
            continue
        values = spread(value, len(groups))
        for group, v in zip(groups, values):
            group.setdefault(name, v)
        hypers[name] = values[-1]
