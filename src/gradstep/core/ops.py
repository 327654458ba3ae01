"""Multi-tensor arithmetic used by every transform.

A transform's math is written once against this small vocabulary and runs on a whole parameter group's lists of
tensors. Two interchangeable implementations exist:

* :data:`FOREACH` uses ``torch._foreach_*`` kernels (the default path, and what ``torch.compile`` fuses);
* :data:`PER_TENSOR` runs the plain per-tensor ``torch`` op in a Python loop. It is the literal reference that tests
  hold the foreach path to (``foreach=False`` selects it).

A *coefficient* ``c`` may be a Python number, a 0-d tensor (a tensor ``lr``), or a list with one number or 0-d
tensor per tensor (per-parameter values such as bias corrections or ``opt_args`` overrides). Functions ending in
``_`` write into their first argument; the others return new tensors and never touch their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor

Coef = Union[float, int, Tensor, Sequence[float], Sequence[Tensor]]
TensorList = list[Tensor]

__all__ = [
    "FOREACH",
    "PER_TENSOR",
    "Coef",
    "Direction",
    "ForeachOps",
    "PerTensorOps",
    "Quotient",
    "TensorList",
    "evaluate",
    "is_number",
    "uniform",
]


def is_number(c: object) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


class Quotient:
    """``scale * numerator / denominator``, tensor by tensor, not evaluated yet (:meth:`ForeachOps.quotient`).

    A transform that ends in a division returns one, so that when it is the chain's last step the core writes
    ``p -= lr * numerator / denominator`` in one pass (``addcdiv``, as torch.optim's foreach Adam does) instead of
    writing the direction out and reading it back. Anything else receives it evaluated (:func:`evaluate`).
    """

    __slots__ = ("denominator", "numerator", "scale")

    def __init__(self, numerator: Sequence[Tensor], denominator: Sequence[Tensor], scale: Coef = 1.0) -> None:
        self.numerator = list(numerator)
        self.denominator = list(denominator)
        self.scale = scale


Direction = Union[TensorList, Quotient]
"""What a transform returns: tensors, or a :class:`Quotient` the core may fuse into the parameter write."""


def evaluate(updates: Direction) -> TensorList:
    """The tensors of a direction (a :class:`Quotient` divided out)."""
    if isinstance(updates, Quotient):
        if not updates.numerator:
            return []
        out = list(torch._foreach_div(updates.numerator, updates.denominator))
        if not (is_number(updates.scale) and updates.scale == 1):
            torch._foreach_mul_(out, _coef(updates.scale))
        return out
    return updates


def uniform(c: Coef) -> Coef:
    """A per-tensor coefficient whose values are all the same plain number, as that number (else unchanged).

    Per-parameter values (step counts, bias corrections) are usually equal across a group; as one number they take
    the single-kernel foreach overloads (``lerp_``, ``addcmul_`` with a scalar) instead of a multiply per list.
    """
    if isinstance(c, (list, tuple)) and c and all(is_number(x) for x in c) and all(x == c[0] for x in c):
        return c[0]  # type: ignore[no-any-return]
    return c


def _at(c: Coef, i: int) -> float | Tensor:
    if isinstance(c, (list, tuple)):
        return c[i]
    return c  # type: ignore[return-value]


class PerTensorOps:
    """Reference implementation: one plain torch op per tensor."""

    name = "per_tensor"

    # --- out of place -------------------------------------------------------------------------------------------
    def clone(self, xs: Sequence[Tensor]) -> TensorList:
        return [x.clone() for x in xs]

    def neg(self, xs: Sequence[Tensor]) -> TensorList:
        return [torch.neg(x) for x in xs]

    def abs(self, xs: Sequence[Tensor]) -> TensorList:
        return [torch.abs(x) for x in xs]

    def sign(self, xs: Sequence[Tensor]) -> TensorList:
        return [torch.sign(x) for x in xs]

    def sqrt(self, xs: Sequence[Tensor]) -> TensorList:
        return [torch.sqrt(x) for x in xs]

    def mul(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> TensorList:
        return [torch.mul(x, _at(c, i)) for i, x in enumerate(xs)]

    def div(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> TensorList:
        return [torch.div(x, _at(c, i)) for i, x in enumerate(xs)]

    def add(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | Coef) -> TensorList:
        return [torch.add(x, _at(ys, i)) for i, x in enumerate(xs)]

    def sub(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return [torch.sub(x, y) for x, y in zip(xs, ys)]

    def quotient(self, xs: Sequence[Tensor], ys: Sequence[Tensor], scale: Coef = 1.0) -> Direction:
        """``scale * x / y`` as a direction: the reference computes it at once (``x / y``, then the scale); the
        foreach path may defer it into the parameter write."""
        out = [torch.div(x, y) for x, y in zip(xs, ys)]
        return out if is_number(scale) and scale == 1 else self.mul(out, scale)

    def maximum(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return [torch.maximum(x, y) for x, y in zip(xs, ys)]

    def clamp(self, xs: Sequence[Tensor], lo: float, hi: float) -> TensorList:
        return [torch.clamp(x, lo, hi) for x in xs]

    def to(self, xs: Sequence[Tensor], dtypes: Sequence[torch.dtype]) -> TensorList:
        return [x if x.dtype == d else x.to(d) for x, d in zip(xs, dtypes)]

    def where(self, conds: Sequence[Tensor], xs: Sequence[Tensor], ys: Sequence[Tensor] | Coef) -> TensorList:
        """``where(c, x, y)`` per tensor; ``ys`` may be a coefficient (one number or 0-d tensor per tensor)."""
        return [torch.where(c, x, _at(ys, i)) for i, (c, x) in enumerate(zip(conds, xs))]

    def isfinite(self, xs: Sequence[Tensor]) -> TensorList:
        return [torch.isfinite(x) for x in xs]

    # --- in place -----------------------------------------------------------------------------------------------
    def copy_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for x, y in zip(xs, ys):
            x.copy_(y)

    def mul_(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> None:
        for i, x in enumerate(xs):
            x.mul_(_at(c, i))

    def div_(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> None:
        for i, x in enumerate(xs):
            x.div_(_at(c, i))

    def add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | Coef) -> None:
        for i, x in enumerate(xs):
            x.add_(_at(ys, i))

    def add_scaled_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], c: Coef) -> None:
        """``x += c * y``."""
        for i, (x, y) in enumerate(zip(xs, ys)):
            ci = _at(c, i)
            if is_number(ci):
                x.add_(y, alpha=ci)  # type: ignore[arg-type]
            else:
                x.add_(y * ci)

    def addcmul_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], c: Coef) -> None:
        """``x += c * y * z``."""
        for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
            ci = _at(c, i)
            if is_number(ci):
                x.addcmul_(y, z, value=ci)  # type: ignore[arg-type]
            else:
                x.add_(y * z * ci)

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], w: Coef) -> None:
        """``x += w * (y - x)``: an exponential moving average with weight ``w`` on the new value."""
        for i, (x, y) in enumerate(zip(xs, ys)):
            wi = _at(w, i)
            if is_number(wi):
                x.lerp_(y, wi)  # type: ignore[arg-type]
            else:
                x.add_((y - x) * wi)

    def maximum_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for x, y in zip(xs, ys):
            torch.maximum(x, y, out=x)

    def clamp_(self, xs: Sequence[Tensor], lo: float, hi: float) -> None:
        for x in xs:
            x.clamp_(lo, hi)

    def zero_(self, xs: Sequence[Tensor]) -> None:
        for x in xs:
            x.zero_()


class ForeachOps(PerTensorOps):
    """The multi-tensor path: one ``torch._foreach_*`` kernel launch per list."""

    name = "foreach"

    def clone(self, xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_mul(list(xs), 1.0)) if xs else []

    def neg(self, xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_neg(list(xs)))

    def abs(self, xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_abs(list(xs)))

    def sign(self, xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_sign(list(xs)))

    def sqrt(self, xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_sqrt(list(xs)))

    def mul(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_mul(list(xs), _coef(c)))

    def div(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_div(list(xs), _coef(c)))

    def add(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | Coef) -> TensorList:
        return list(torch._foreach_add(list(xs), _coef(ys)))

    def sub(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_sub(list(xs), list(ys)))

    def maximum(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_maximum(list(xs), list(ys)))

    def quotient(self, xs: Sequence[Tensor], ys: Sequence[Tensor], scale: Coef = 1.0) -> Direction:
        return Quotient(xs, ys, scale)

    def clamp(self, xs: Sequence[Tensor], lo: float, hi: float) -> TensorList:
        if not xs:
            return []
        # One pass for a one-sided bound (max(sqrt(v), eps) and the like), not a second one against infinity.
        if hi == math.inf:
            return list(torch._foreach_clamp_min(list(xs), lo))
        if lo == -math.inf:
            return list(torch._foreach_clamp_max(list(xs), hi))
        return list(torch._foreach_clamp_max(torch._foreach_clamp_min(list(xs), lo), hi))

    def copy_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        if any(hasattr(x, "to_local") for x in xs):  # DTensor (FSDP2) has no foreach copy: the plain loop
            super().copy_(xs, ys)
        elif xs:
            torch._foreach_copy_(list(xs), list(ys))

    def mul_(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> None:
        torch._foreach_mul_(list(xs), _coef(c))

    def div_(self, xs: Sequence[Tensor], c: Coef | Sequence[Tensor]) -> None:
        torch._foreach_div_(list(xs), _coef(c))

    def add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | Coef) -> None:
        torch._foreach_add_(list(xs), _coef(ys))

    def add_scaled_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], c: Coef) -> None:
        if is_number(c):
            torch._foreach_add_(list(xs), list(ys), alpha=c)  # type: ignore[arg-type]
        else:
            torch._foreach_add_(list(xs), torch._foreach_mul(list(ys), _coef(c)))

    def addcmul_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], c: Coef) -> None:
        if is_number(c):
            torch._foreach_addcmul_(list(xs), list(ys), list(zs), value=c)  # type: ignore[arg-type]
        else:
            torch._foreach_add_(list(xs), torch._foreach_mul(torch._foreach_mul(list(ys), list(zs)), _coef(c)))

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], w: Coef) -> None:
        if is_number(w):
            torch._foreach_lerp_(list(xs), list(ys), w)  # type: ignore[arg-type]
        else:
            torch._foreach_add_(list(xs), torch._foreach_mul(torch._foreach_sub(list(ys), list(xs)), _coef(w)))

    def maximum_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        torch._foreach_maximum_(list(xs), list(ys))

    def clamp_(self, xs: Sequence[Tensor], lo: float, hi: float) -> None:
        if not xs:
            return
        if lo != -math.inf:
            torch._foreach_clamp_min_(list(xs), lo)
        if hi != math.inf:
            torch._foreach_clamp_max_(list(xs), hi)

    def zero_(self, xs: Sequence[Tensor]) -> None:
        if xs:
            torch._foreach_zero_(list(xs))


def _coef(c: Any) -> Any:
    # foreach kernels take a Scalar, a 0-d Tensor, a list of Scalars or a list of Tensors; tuples become lists.
    return list(c) if isinstance(c, tuple) else c


FOREACH = ForeachOps()
PER_TENSOR = PerTensorOps()
