r"""ALF's ``TrustedUpdater``: shrink the last change of some variables until monitored quantities change little enough.

If an update makes a monitored quantity (a KL divergence between old and new policies, a loss on held-out data, ...)
jump, the step was probably too big. The updater keeps a backup :math:`v^{\text{prev}}` of the variables, and after
the caller has changed them (an optimizer step) it moves them back along the segment towards the backup:

.. math::
    \rho = \max_k \frac{|c_k|}{m_k}, \qquad
    \text{while } \rho > 1:\quad v \leftarrow v^{\text{prev}} + \frac{0.9}{\rho}\,(v - v^{\text{prev}}),
    \ \ \text{recompute } c \text{ and } \rho

where :math:`c_k` are the changes returned by ``change_f()`` (a scalar, or a nest of scalars) and :math:`m_k` the
allowed changes ``max_change`` (same nest). The shrinks compound (each acts on the already shrunk value). The factor
0.9 (``shrink``) keeps the loop from stalling just above the limit. When every change is within its limit, the
variables are copied into the backup for the next call.

Reference: ALF ``alf/optimizers/trusted_updater.py`` (spec A.6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TrustedUpdater"]


def _is_leaf(x: Any) -> bool:
    return not isinstance(x, (Mapping, list, tuple))


def _pairs(change: Any, limit: Any, path: str = "change") -> list[tuple[str, Any, Any]]:
    """Pair every leaf of ``change`` with its limit (a scalar limit covers a whole nest)."""
    if _is_leaf(change):
        if not _is_leaf(limit):
            raise ValueError(f"{path} is a scalar but its max_change is a nest ({type(limit).__name__})")
        return [(path, change, limit)]
    if _is_leaf(limit):
        items = change.items() if isinstance(change, Mapping) else enumerate(change)
        return [pair for key, value in items for pair in _pairs(value, limit, f"{path}[{key!r}]")]
    if isinstance(change, Mapping):
        if not isinstance(limit, Mapping) or set(change) != set(limit):
            raise ValueError(f"{path} and max_change have different structures")
        return [pair for key in change for pair in _pairs(change[key], limit[key], f"{path}[{key!r}]")]
    if isinstance(limit, Mapping) or len(change) != len(limit):
        raise ValueError(f"{path} and max_change have different structures")
    return [pair for i, (c, m) in enumerate(zip(change, limit)) for pair in _pairs(c, m, f"{path}[{i}]")]


def _detached_copy(change: Any) -> Any:
    if isinstance(change, Tensor):
        return change.detach().clone()
    if isinstance(change, Mapping):
        return type(change)({k: _detached_copy(v) for k, v in change.items()})  # type: ignore[call-arg]
    if isinstance(change, tuple) and hasattr(change, "_fields"):  # a namedtuple
        return type(change)(*(_detached_copy(v) for v in change))
    if isinstance(change, (list, tuple)):
        return type(change)(_detached_copy(v) for v in change)
    return change


def _as_float(x: Any, what: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().reshape(()).item())
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{what} must be a number or a one-element tensor, got {type(x).__name__}")
    return float(x)


def _ratio(change: Any, max_change: Any) -> float:
    """:math:`\\max_k |c_k| / m_k` (one host sync per leaf)."""
    worst = 0.0
    for path, c, m in _pairs(change, max_change):
        limit = _as_float(m, f"max_change of {path}")
        if not limit > 0:
            raise ValueError(f"max_change of {path} must be > 0, got {limit}")
        value = abs(_as_float(c, path))
        if math.isnan(value):
            raise ValueError(f"{path} is NaN: the change cannot be compared with max_change")
        worst = max(worst, value / limit)
    return worst


class TrustedUpdater:
    r"""Shrink the latest change of a set of tensors until every monitored change is within its limit (ALF).

    Typical use, around an optimizer step::

        updater = TrustedUpdater(policy.parameters())        # backup = current values
        for batch in data:
            old = policy_logits(batch).detach()
            loss.backward(); optimizer.step()                # the change to shrink if needed
            change0, shrinks = updater.adjust_step(
                lambda: kl(old, policy_logits(batch)), max_change=0.01)

    ``change_f`` must compute its changes from the *current* values of the variables (it is called again after every
    shrink), relative to whatever reference the caller chose (here the values before the step). Only the variables are
    moved: an optimizer's state (moments) keeps the full step's statistics.

    Args:
        parameters: the tensors to adjust (non-empty). Their current values become the first backup.
        shrink: the factor :math:`0.9` in :math:`v^{\text{prev}} + (\text{shrink}/\rho)(v - v^{\text{prev}})`,
            in (0, 1).
        max_shrinks: how many shrinks are tried before giving up (ALF: 100).
    """

    def __init__(self, parameters: Iterable[Tensor], shrink: float = 0.9, max_shrinks: int = 100) -> None:
        self._variables: list[Tensor] = list(parameters)
        if not self._variables:
            raise ValueError("TrustedUpdater needs at least one tensor")
        if not all(isinstance(v, Tensor) for v in self._variables):
            raise TypeError("TrustedUpdater adjusts tensors")
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink < 1:
            raise ValueError(f"Invalid shrink: {shrink!r} (must be in (0, 1))")
        if isinstance(max_shrinks, bool) or not isinstance(max_shrinks, int) or max_shrinks < 1:
            raise ValueError(f"Invalid max_shrinks: {max_shrinks!r} (must be an int >= 1)")
        self.shrink = float(shrink)
        self.max_shrinks = max_shrinks
        self._prev = [v.detach().clone() for v in self._variables]

    @property
    def variables(self) -> list[Tensor]:
        return list(self._variables)

    @torch.no_grad()
    def backup(self) -> None:
        """Take the current values as the reference of the next :meth:`adjust_step` (done by it on success)."""
        for prev, v in zip(self._prev, self._variables):
            prev.copy_(v)

    def adjust_step(self, change_f: Callable[[], Any], max_change: Any) -> tuple[Any, int]:
        """Shrink the change of the variables since the last backup until ``change_f()`` is within ``max_change``.

        Args:
            change_f: returns the monitored change(s) for the current values: a number or a one-element tensor, or
                a nest (dicts, lists, tuples) of them. Called once, then once after every shrink.
            max_change: the allowed absolute change, > 0: the same nest as the change, or one value for all leaves.

        Returns:
            ``(change0, shrinks)``: what ``change_f()`` returned before any shrink (its tensors detached and
            copied), and how many shrinks were made (0: the step was kept as it was).

        Raises:
            RuntimeError: when the changes are still too big after ``max_shrinks`` shrinks ("the change cannot be
                reduced by making the step smaller", ALF's assertion). The variables keep their last, shrunk values,
                and the backup is not refreshed.
            ValueError: a NaN change, a limit <= 0, or a ``max_change`` whose nest does not match the change. Raised
                before any variable is modified when ``change_f()``'s first result is at fault.
        """
        change0 = _detached_copy(change_f())  # a copy: its tensors may be views of the variables that get shrunk
        ratio = _ratio(change0, max_change)
        shrinks = 0
        while ratio > 1 and shrinks < self.max_shrinks:
            self._shrink(self.shrink / ratio)
            ratio = _ratio(change_f(), max_change)
            shrinks += 1
        if ratio > 1:
            raise RuntimeError(
                f"TrustedUpdater: the change is still {ratio:.4g} times its limit after {shrinks} shrinks; "
                f"it cannot be reduced by making the step smaller"
            )
        self.backup()
        return change0, shrinks

    @torch.no_grad()
    def _shrink(self, r: float) -> None:
        for v, prev in zip(self._variables, self._prev):
            # v <- prev + r * (v - prev), in place and in v's dtype.
            v.sub_(prev).mul_(r).add_(prev)

    def __repr__(self) -> str:
        shapes: Sequence[tuple[int, ...]] = [tuple(v.shape) for v in self._variables]
        return f"TrustedUpdater({len(shapes)} tensors, shrink={self.shrink}, max_shrinks={self.max_shrinks})"
