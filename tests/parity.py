"""Shared helpers for parity tests: run an original optimizer and its gradstep counterpart side by side.

Every parity test in this directory follows the same recipe, written once here:

1. :func:`make_params` builds a seeded set of float64 tensors of several shapes (a scalar, a vector, a 4-D tensor and
   a matrix by default), and :func:`split_groups` deals them into two parameter groups, so that every group mixes
   shapes and each test can give the groups different hyperparameters.
2. Each side gets its *own* copy of the same initial values (an optimizer writes its parameters in place, and fastai
   even writes into ``p.grad``), built by a factory that receives the groups as lists of tensors: use
   :func:`torch_groups` to turn them into ``torch.optim`` param group dicts, or pass them as they are to a fastai
   factory (a list of lists is fastai's way of giving groups) and set per-group values with :func:`fastai_set_hypers`.
3. At every step each side receives a fresh gradient computed from *its own* current parameters by a deterministic
   function (:func:`gradient` by default), so a difference in the update shows up in the next gradient instead of
   being masked by a shared one. The gradient is bounded (a sine plus a pull towards 0), so runs of a few hundred
   steps do not diverge.
4. After every step the parameters of the two sides are compared; the result holds, per parameter, the largest
   relative difference seen over the whole run, and how far the parameter moved (a run where nothing moves proves
   nothing, so :meth:`ParityResult.assert_within` checks both).

The relative difference of two tensors is ``max|a - b| / max(max|a|, max|b|)`` (a norm-wise relative error in the
infinity norm): it does not blow up for an element that happens to cross zero, and any difference in the update rule
larger than rounding shows up in it after a few steps.

Two runners:

* :func:`run_side_by_side` for ``torch.optim.Optimizer`` subclasses: gradients are produced by a closure passed to
  ``step(closure)``, which also exercises the closure path of both sides.
* :func:`run_side_by_side_fastai` for optimizers that are not ``torch.optim.Optimizer`` and take no closure (fastai's
  ``Optimizer``, or a small hand-written reference with a ``step()`` method): fresh gradients are written into
  ``p.grad`` before every ``step()``, since fastai's L2 mode adds ``wd * p`` into ``p.grad`` in place.

Example::

    from parity import run_side_by_side, torch_groups
    result = run_side_by_side(
        lambda groups: torch.optim.SGD(torch_groups(groups, {"lr": 0.1}, {"lr": 0.05}), momentum=0.9),
        lambda groups: gradstep.SGD(torch_groups(groups, {"lr": 0.1}, {"lr": 0.05}), momentum=0.9),
    )
    result.assert_within(1e-6)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SHAPES",
    "GradFn",
    "ParityResult",
    "fastai_set_hypers",
    "gradient",
    "make_params",
    "relative_difference",
    "run_side_by_side",
    "run_side_by_side_fastai",
    "split_groups",
    "torch_groups",
]

SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (2, 3, 4, 5), (3, 4))
"""Default parameter shapes: a scalar, a vector, a 4-D tensor and a matrix (dealt round-robin into the groups, so
group 0 holds the scalar and the 4-D tensor, group 1 the vector and the matrix)."""

GradFn = Callable[[Tensor, int, int], Tensor]
"""``grad_fn(p, t, index)``: the gradient of parameter number ``index`` (in :func:`make_params` order) at step ``t``
(1-based), from its current value ``p``. Must return a new tensor of ``p``'s shape and dtype."""


def make_params(
    shapes: Sequence[tuple[int, ...]] = SHAPES, seed: int = 0, dtype: torch.dtype = torch.float64
) -> list[Tensor]:
    """Seeded leaf tensors (``requires_grad=True``) with values in [-1.5, 1.5]; the same seed gives the same values."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(shape, generator=gen, dtype=torch.float64) * 3 - 1.5).to(dtype).requires_grad_(True)
        for shape in shapes
    ]


def split_groups(params: Sequence[Tensor], n_groups: int = 2) -> list[list[Tensor]]:
    """Deal the parameters round-robin into ``n_groups`` lists (parameter ``i`` goes to group ``i % n_groups``)."""
    return [list(params[g::n_groups]) for g in range(n_groups)]


def torch_groups(groups: Sequence[Sequence[Tensor]], *hypers: dict[str, Any]) -> list[dict[str, Any]]:
    """``torch.optim`` param group dicts: group ``i`` gets the parameters ``groups[i]`` and the values ``hypers[i]``.

    Give no ``hypers`` for groups that only use the optimizer's defaults; otherwise give one dict per group.
    """
    if hypers and len(hypers) != len(groups):
        raise ValueError(f"got {len(hypers)} hyperparameter dicts for {len(groups)} groups")
    per_group = hypers or tuple({} for _ in groups)
    return [{"params": list(g), **h} for g, h in zip(groups, per_group)]


def fastai_set_hypers(opt: Any, **per_group: Sequence[Any]) -> Any:
    """Give each fastai group its own value of each hyperparameter (``opt.set_hyper(name, [v0, v1, ...])``).

    fastai's factories take one value per hyperparameter; per-group values go through ``set_hyper`` with a list.
    Returns ``opt`` so a factory can be a single expression.
    """
    for name, values in per_group.items():
        opt.set_hyper(name, list(values))
    return opt


def gradient(p: Tensor, t: int, index: int) -> Tensor:
    """The default gradient: ``sin(3p + t + index) + 0.3 p``.

    A deterministic function of the current value, the step and the parameter, so both sides see the same gradient as
    long as they agree, and any disagreement feeds back. The sine is bounded and the ``0.3 p`` term pulls towards 0,
    so the parameters stay bounded (a maximizing optimizer grows them by at most a factor ``1 + 0.3 lr`` per step).
    """
    return torch.sin(3 * p + t + index) + 0.3 * p


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max(max|a|, max|b|)``; 0 for two zero tensors, ``inf`` where exactly one side is non-finite."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    same_nonfinite = (~torch.isfinite(a)) & (~torch.isfinite(b)) & ((a == b) | (a.isnan() & b.isnan()))
    if bool((~torch.isfinite(a) | ~torch.isfinite(b))[~same_nonfinite].any()):
        return float("inf")
    finite = ~same_nonfinite
    a, b = a[finite], b[finite]
    if a.numel() == 0:
        return 0.0
    scale = max(float(a.abs().max()), float(b.abs().max()))
    diff = float((a - b).abs().max())
    return 0.0 if diff == 0 else diff / scale


@dataclass
class ParityResult:
    """What a side-by-side run measured, per parameter (named ``"group G, param I, shape S"``).

    Attributes:
        diffs: the largest relative difference between the two sides' parameter, over every step of the run.
        moved: the relative distance the gradstep side's parameter moved from its initial value by the end.
        steps: the number of steps run.
    """

    diffs: dict[str, float] = field(default_factory=dict)
    moved: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    @property
    def max_diff(self) -> float:
        """The largest relative difference over all parameters and steps."""
        return max(self.diffs.values(), default=0.0)

    def table(self) -> str:
        return "\n".join(
            f"  {name}: max rel diff {self.diffs[name]:.3e}, moved {self.moved[name]:.3e}" for name in self.diffs
        )

    def assert_within(self, tol: float, min_move: float = 1e-3) -> None:
        """Every parameter stayed within ``tol`` of the reference, and every one moved by at least ``min_move``."""
        bad = {n: d for n, d in self.diffs.items() if not d <= tol}
        assert not bad, f"parity failed after {self.steps} steps (tolerance {tol:g}):\n{self.table()}"
        still = {n: m for n, m in self.moved.items() if not m >= min_move}
        assert not still, f"parameters barely moved (< {min_move:g}), so parity proves little:\n{self.table()}"


def _run(
    make_reference: Callable[[list[list[Tensor]]], Any],
    make_gradstep: Callable[[list[list[Tensor]]], Any],
    steps: int,
    shapes: Sequence[tuple[int, ...]],
    seed: int,
    dtype: torch.dtype,
    n_groups: int,
    grad_fn: GradFn,
    use_closure: bool,
) -> ParityResult:
    ref_params = make_params(shapes, seed, dtype)
    gs_params = make_params(shapes, seed, dtype)
    initial = [p.detach().clone() for p in gs_params]
    ref_groups, gs_groups = split_groups(ref_params, n_groups), split_groups(gs_params, n_groups)
    # (name, index in make_params order) of every parameter, group by group
    index_of = {id(p): i for i, p in enumerate(gs_params)}
    entries = [
        (f"group {gi}, param {index_of[id(p)]}, shape {tuple(p.shape)}", index_of[id(p)])
        for gi, group in enumerate(gs_groups)
        for p in group
    ]
    ref_opt, gs_opt = make_reference(ref_groups), make_gradstep(gs_groups)

    def set_grads(params: Iterable[Tensor], t: int) -> None:
        # A new tensor every time: never shared between the sides, and fastai may have written into the last one.
        for i, p in enumerate(params):
            p.grad = grad_fn(p.detach(), t, i)

    def take_step(opt: Any, params: list[Tensor], t: int) -> None:
        if use_closure:

            def closure() -> Tensor:
                set_grads(params, t)
                return torch.zeros((), dtype=dtype)

            opt.step(closure)
        else:
            set_grads(params, t)
            opt.step()

    result = ParityResult(diffs={name: 0.0 for name, _ in entries}, steps=steps)
    for t in range(1, steps + 1):
        take_step(ref_opt, ref_params, t)
        take_step(gs_opt, gs_params, t)
        for name, i in entries:
            d = relative_difference(ref_params[i], gs_params[i])
            if not d <= result.diffs[name]:  # also records a NaN
                result.diffs[name] = d
    result.moved = {name: relative_difference(gs_params[i], initial[i]) for name, i in entries}
    return result


def run_side_by_side(
    make_reference: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    make_gradstep: Callable[[list[list[Tensor]]], torch.optim.Optimizer],
    steps: int = 200,
    *,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    n_groups: int = 2,
    grad_fn: GradFn = gradient,
) -> ParityResult:
    """Step two ``torch.optim.Optimizer`` instances from identical parameters and compare them after every step.

    Args:
        make_reference: builds the original optimizer from the groups (lists of its own parameter tensors).
        make_gradstep: builds the gradstep optimizer from the groups (the same values, other tensors).
        steps: number of steps.
        shapes, seed, dtype: the parameters (see :func:`make_params`).
        n_groups: how many groups the parameters are dealt into (see :func:`split_groups`).
        grad_fn: the gradient (see :data:`GradFn`); wrap :func:`gradient` to inject NaNs at chosen steps.

    Gradients are set by a closure passed to ``step(closure)``.
    """
    return _run(make_reference, make_gradstep, steps, shapes, seed, dtype, n_groups, grad_fn, use_closure=True)


def run_side_by_side_fastai(
    make_reference: Callable[[list[list[Tensor]]], Any],
    make_gradstep: Callable[[list[list[Tensor]]], Any],
    steps: int = 200,
    *,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    n_groups: int = 2,
    grad_fn: GradFn = gradient,
) -> ParityResult:
    """As :func:`run_side_by_side`, for a reference that is not a ``torch.optim.Optimizer`` and takes no closure.

    fastai's ``Optimizer`` takes a list of lists of parameters (one list per group, which is what the factories
    receive), its ``step()`` refuses a closure, and in L2 mode (``decouple_wd=False``) it adds ``wd * p`` into
    ``p.grad`` in place. So here both sides get a fresh gradient tensor written into ``p.grad`` before every plain
    ``step()``. Hand-written references with a ``step()`` method run the same way.
    """
    return _run(make_reference, make_gradstep, steps, shapes, seed, dtype, n_groups, grad_fn, use_closure=False)
