r"""NeroPlus (ALF): Adam- or Nero-like steps with every output vector kept at zero mean and a fixed (or bounded) norm.

Liu et al., 2021, "Learning by Turning: Neural Architecture Aware Optimisation" (ICML), arXiv:2102.07227, with ALF's
enhancements (HorizonRobotics/alf, ``alf/optimizers/nero_plus.py``). A *row* of a parameter with ``ndim > 1`` is
``p[i]`` (the weights of one output unit); a parameter with ``ndim <= 1`` is one row. Per parameter, at step t:

.. math::
    g \leftarrow g + \lambda_2\, p, \qquad
    m_t = \beta_1 m_{t-1} + (1-\beta_1)\, g \ \ (m_t = g \text{ when } \beta_1 = 0), \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, s_t

with :math:`s_t = g^2` (elementwise) or, with ``normalizing_grad_by_norm``, :math:`s_t = \lVert g_i\rVert^2` (one value
per row, the original Nero), then (TensorFlow's eps, :math:`b_1 = 1` when :math:`\beta_1 = 0`)

.. math::
    p \leftarrow p\,(1 - lr\cdot wd) - lr\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

(``lr`` is ``lr * lr_scale``), and finally each row is projected on its constraints: with ``zero_mean``
:math:`p_i \leftarrow p_i - \mathrm{mean}(p_i)`; with a finite ``max_norm`` :math:`c`,
:math:`p_i \leftarrow p_i\, s` where :math:`s = c / (\lVert p_i\rVert + 10^{-30})` (``fixed_norm``) or
:math:`\min(1, s)` (norm at most :math:`c`).

Constraints per parameter: ``ndim > 1`` takes ``max_norm``, ``fixed_norm``, ``zero_mean`` from ``p.opt_args``, else
from the group; ``ndim <= 1`` takes them from ``p.opt_args``, else ``max_norm=inf``, ``fixed_norm=False``,
``zero_mean=False`` (unconstrained), and never subtracts the mean of a 0-D parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, non_negative, positive
from ..core.ops import FOREACH, PerTensorOps, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import row_means, row_norms, tensor_norms, tensor_numels, tensor_sums
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_is_zero, zeros

__all__ = ["NeroPlus", "RowConstraints", "ScaleByNeroPlus"]

_OPT_ARGS_CHECKS = {
    "max_norm": positive,
    "fixed_norm": boolean,
    "zero_mean": boolean,
    "l2_regularization": non_negative,
}


def _row_norm_shape(x: Tensor) -> tuple[int, ...]:
    # ALF's _norm: (n, 1, ..., 1) for ndim > 1, a scalar for the others.
    return (x.shape[0],) + (1,) * (x.dim() - 1) if x.dim() > 1 else ()


def _row_norm_zeros(param: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(_row_norm_shape(param), dtype=dtype, device=param.device)


def _per_row(xs: TensorList, rows: Any, whole: Any) -> TensorList:
    """A statistic per row for ``ndim > 1`` (shape ``(n, 1, ..., 1)``), of the whole tensor otherwise (0-d).

    The whole-tensor statistic comes from the shared per-tensor reductions, not from a one-row view, so that it stays
    exact when the tensor is sharded (a one-row view would be split across shards).
    """
    out: list[Tensor | None] = [None] * len(xs)
    multi = [i for i, x in enumerate(xs) if x.dim() > 1]
    flat = [i for i, x in enumerate(xs) if x.dim() <= 1]
    for i, value in zip(multi, rows([xs[i] for i in multi]) if multi else []):
        out[i] = value
    if flat:
        values = whole([xs[i] for i in flat])
        for k, i in enumerate(flat):
            out[i] = values[k]
    return [v for v in out if v is not None]


def _row_norms(xs: TensorList) -> TensorList:
    """ALF's per-row norm: one value per row when ``ndim > 1``, the whole tensor's norm otherwise."""
    return _per_row(xs, row_norms, tensor_norms)


def _row_means(xs: TensorList) -> TensorList:
    """ALF's per-row mean: one value per row when ``ndim > 1``, the whole tensor's mean otherwise."""
    return _per_row(xs, row_means, _means)


def _means(xs: TensorList) -> Tensor:
    sums = tensor_sums(xs)
    return sums / tensor_numels(xs).to(device=sums.device, dtype=sums.dtype)


def _opt_args(p: Tensor) -> dict[str, Any]:
    # A malformed opt_args (not a dict) is reported by the core as a TypeError.
    args = getattr(p, "opt_args", None)
    return args if isinstance(args, dict) else {}


class Constraint(NamedTuple):
    max_norm: float
    fixed_norm: bool
    zero_mean: bool


def resolve_constraint(p: Tensor, opt_args: dict[str, Any] | None, group: dict[str, Any]) -> Constraint:
    """One parameter's constraints: its ``opt_args`` (``None`` = unset), else the group's (``ndim > 1``) or none."""
    args = opt_args or {}

    def arg(name: str, default: Any) -> Any:
        value = args.get(name)
        return default if value is None else value

    if p.dim() > 1:
        return Constraint(
            arg("max_norm", group["max_norm"]),
            arg("fixed_norm", group["fixed_norm"]),
            arg("zero_mean", group["zero_mean"]),
        )
    # ALF gives 0-D parameters the group's values and ignores their opt_args (forcing a scalar to |p| = max_norm);
    # that is a bug, so 0-D parameters follow the 1-D rule here.
    return Constraint(arg("max_norm", math.inf), arg("fixed_norm", False), arg("zero_mean", False))


def project_rows_(params: TensorList, constraints: list[Constraint], ops: PerTensorOps = FOREACH) -> None:
    """ALF's ``_normalize`` in place on every parameter: subtract row means, then scale rows to (at most) max_norm."""
    # Empty tensors have nothing to constrain (and cannot be viewed as rows).
    live = [(p, c) for p, c in zip(params, constraints) if p.numel() > 0]
    centred = [p for p, c in live if c.zero_mean and p.dim() > 0]
    if centred:
        ops.add_(centred, ops.neg(_row_means(centred)))
    bounded = [(p, c) for p, c in live if c.max_norm != math.inf]
    if not bounded:
        return
    rows = [r for r, _ in bounded]
    scales = ops.mul(torch._foreach_reciprocal(ops.add(_row_norms(rows), 1e-30)), [c.max_norm for _, c in bounded])
    # Without fixed_norm the rows may shrink below max_norm but never grow.
    shrink = [k for k, (_, c) in enumerate(bounded) if not c.fixed_norm]
    if shrink:
        for k, s in zip(shrink, ops.clamp([scales[k] for k in shrink], -math.inf, 1.0)):
            scales[k] = s
    ops.mul_(rows, scales)


def _param_name(group: dict[str, Any], j: int, p: Tensor) -> str:
    names = group.get("param_names")
    return repr(names[j]) if names else f"#{j} of shape {tuple(p.shape)} in the param group"


def check_normalized(group: dict[str, Any]) -> None:
    """ALF's construction check: the rows of every ``ndim > 1`` parameter already satisfy their constraints."""
    for j, p in enumerate(group["params"]):
        if p.dim() <= 1 or p.numel() == 0:
            continue
        c = resolve_constraint(p, _opt_args(p), group)
        with torch.no_grad():
            # Construction time, not step(): reading values here is fine.
            if c.zero_mean:
                worst = row_means([p.detach()])[0].abs().max().item()
                if not worst < 0.01:
                    problem = f"its largest |row mean| is {worst:.3g} (zero_mean needs < 0.01)"
                    raise ValueError(_unnormalized(group, j, p, problem))
            if c.max_norm != math.inf:
                diff = row_norms([p.detach()])[0] / c.max_norm - 1
                worst = (diff.abs() if c.fixed_norm else diff).max().item()
                if not worst < 0.01:
                    kind = "== max_norm" if c.fixed_norm else "<= max_norm"
                    problem = f"a row norm is off by {worst:.3g} relative to max_norm={c.max_norm} (needs {kind})"
                    raise ValueError(_unnormalized(group, j, p, problem))


def _unnormalized(group: dict[str, Any], j: int, p: Tensor, problem: str) -> str:
    return (
        f"NeroPlus: parameter {_param_name(group, j, p)} is not normalized: {problem}. Call "
        f"NeroPlus.initialize(model, max_norm=..., fixed_norm=..., zero_mean=...) with the optimizer's values before "
        f"building the optimizer (or pass check_normalized=False: the first step then projects it)"
    )


class ScaleByNeroPlus(Transform):
    """NeroPlus's step direction (see the module docstring): coupled ``l2_regularization``, optional first moment,
    elementwise or per-row second moment, TensorFlow's eps and bias corrections.

    State: ``exp_avg`` (only when ``betas[0] > 0``) and ``exp_avg_sq`` (shaped like the parameter, or one value per
    row with ``normalizing_grad_by_norm``: ``(n, 1, ..., 1)``, a scalar for ``ndim <= 1``).
    """

    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the moments; betas[0] = 0 turns m off", scalar=False),
        Hyper("eps", 1e-7, non_negative, "added to sqrt(v) (TensorFlow style)"),
        Hyper("normalizing_grad_by_norm", False, boolean, "v averages the squared row norm of g (Nero), not g**2"),
        Hyper("l2_regularization", 0.0, non_negative, "coupled L2 penalty: g + l2 * p (opt_args may override)"),
    )

    def check_group(self, group: dict[str, Any]) -> None:
        if not group["betas"][1] > 0:
            raise ValueError(f"Invalid betas: {group['betas']!r} (betas[1] must be in (0, 1) for NeroPlus)")
        for j, p in enumerate(group["params"]):
            for key, check in _OPT_ARGS_CHECKS.items():
                value = _opt_args(p).get(key)
                if value is not None and check(value) is not None:
                    raise ValueError(
                        f"Invalid opt_args[{key!r}] of parameter {_param_name(group, j, p)}: {value!r} ({check(value)})"
                    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg_sq": _row_norm_zeros if group["normalizing_grad_by_norm"] else zeros}
        if group["betas"][0] > 0:
            names["exp_avg"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        l2 = ctx.param_hyper("l2_regularization")
        g = updates if coef_is_zero(l2) else ops.add(updates, ops.mul(ctx.params, l2))
        if not ctx.is_zero("betas", 0):
            numerator = ctx.buffer("exp_avg")
            ops.lerp_(numerator, g, 1 - beta1)
            bc1 = ctx.bias_correction(beta1)
        else:
            numerator, bc1 = g, torch.ones_like(ctx.steps)
        squares = _row_norms(g) if ctx.hyper("normalizing_grad_by_norm") else g
        exp_avg_sq = ctx.buffer("exp_avg_sq")
        ops.lerp_(exp_avg_sq, ops.mul(squares, squares), 1 - beta2)
        direction = ops.div(numerator, ops.add(ops.sqrt(exp_avg_sq), ctx.hyper("eps")))
        return ops.mul(direction, ctx.per_param(torch.sqrt(ctx.bias_correction(beta2)) / bc1))


class RowConstraints(Transform):
    """After each step, keep every row at zero mean and at (at most) ``max_norm`` (ALF NeroPlus's ``_normalize``).

    Which constraints a parameter gets is :func:`resolve_constraint`'s rule (per-parameter ``opt_args``; 1-D and 0-D
    parameters unconstrained unless their ``opt_args`` say otherwise). With ``check_normalized``, adding a group
    whose ``ndim > 1`` parameters violate their constraints raises ``ValueError`` (see :meth:`NeroPlus.initialize`).
    """

    hypers = (
        Hyper("max_norm", 1.0, positive, "norm of each row (fixed_norm) or its upper bound; inf: no norm constraint"),
        Hyper("fixed_norm", True, boolean, "rows keep norm max_norm exactly (else they may shrink below it)"),
        Hyper("zero_mean", True, boolean, "rows of ndim > 1 parameters keep a zero mean"),
        Hyper("check_normalized", True, boolean, "raise ValueError at add_param_group for unnormalized rows (ALF)"),
    )
    # The rows' means and norms of the stepped parameter come before its write: compiled, recompute it.
    recompute_when_compiled = True

    def check_group(self, group: dict[str, Any]) -> None:
        if group["check_normalized"]:
            check_normalized(group)

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        return updates

    def after_step(self, ctx: GroupStep, params: TensorList) -> None:
        constraints = [resolve_constraint(p, a, ctx.group) for p, a in zip(params, ctx.opt_args)]
        project_rows_(params, constraints, ctx.ops)


class NeroPlus(ChainedOptimizer):
    """ALF's NeroPlus, with ALF's arguments in ALF's order (``params`` is required: ALF defaults it to an empty group).

    Call :meth:`NeroPlus.initialize` on the model before building the optimizer. ``lr``, ``lr_scale``,
    ``weight_decay``, ``l2_regularization``, ``max_norm``, ``fixed_norm`` and ``zero_mean`` can be set per parameter
    in ``p.opt_args`` (a dict; ``None`` means the group's value). ``weight_decay`` is decoupled
    (``p * (1 - lr * lr_scale * wd)``), ``l2_regularization`` is added to the gradient.

    Example::

        >>> import torch, gradstep
        >>> from gradstep.optim.nero import NeroPlus
        >>> model = torch.nn.Linear(4, 3)
        >>> NeroPlus.initialize(model)
        >>> opt = NeroPlus(model.parameters(), lr=1e-2)
        >>> model(torch.ones(2, 4)).sum().backward(); _ = opt.step()
        >>> w = model.weight.detach()
        >>> torch.allclose(w.norm(dim=1), torch.ones(3)), torch.allclose(w.mean(dim=1), torch.zeros(3), atol=1e-6)
        (True, True)

    .. warning::
        Differences from ALF's ``NeroPlus`` (``alf/optimizers/nero_plus.py``):

        * 0-D parameters: ALF gives them the group's constraints and ignores their ``opt_args``, so with the
          defaults a scalar is forced to ``|p| = 1`` after every step and in ``initialize()`` (a bug: it cannot
          learn). Here they follow the 1-D rule (unconstrained unless their ``opt_args`` ask). ALF's behaviour:
          ``p.opt_args = dict(max_norm=<group max_norm>, fixed_norm=<group fixed_norm>)``.
        * Unnormalized parameters raise ``ValueError`` naming the parameter (ALF: ``AssertionError``);
          ``check_normalized=False`` skips the check. Bad ``betas`` (``betas[1] == 0``), negative ``weight_decay``
          or ``l2_regularization`` and invalid ``opt_args`` values raise ``ValueError`` (ALF asserts on betas after
          construction, ignores a negative weight decay and applies a negative L2 penalty).
        * State is created at the first step (ALF: in ``add_param_group``); the numbers are the same, and a loaded
          state_dict is kept.
        * Additions: ``maximize``, ``foreach``, a group ``lr_scale`` (ALF: only ``opt_args['lr_scale']``), the core's
          options (``nonfinite``, ``clip_step``, ...). ALF's wrapper features (gradient clipping, capacity masks,
          ParVI, lr schedulers as callables) are not part of this class.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        normalizing_grad_by_norm: bool = False,
        max_norm: float = 1.0,
        weight_decay: float = 0.0,
        l2_regularization: float = 0.0,
        fixed_norm: bool = True,
        zero_mean: bool = True,
        *,
        check_normalized: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByNeroPlus(), RowConstraints()],
            lr=lr,
            betas=betas,
            eps=eps,
            normalizing_grad_by_norm=normalizing_grad_by_norm,
            max_norm=max_norm,
            weight_decay=weight_decay,
            l2_regularization=l2_regularization,
            fixed_norm=fixed_norm,
            zero_mean=zero_mean,
            check_normalized=check_normalized,
            maximize=maximize,
            foreach=foreach,
            **options,
        )

    @staticmethod
    @torch.no_grad()
    def initialize(
        model: torch.nn.Module | Iterable[Tensor], max_norm: float = 1, fixed_norm: bool = True, zero_mean: bool = True
    ) -> None:
        """Project every parameter of ``model`` on its constraints (the group values given here, ``opt_args`` first).

        Call it before building the optimizer, with the same ``max_norm``, ``fixed_norm`` and ``zero_mean``.
        """
        if positive(max_norm) is not None:
            raise ValueError(f"Invalid max_norm: {max_norm!r} ({positive(max_norm)})")
        params = list(model.parameters() if isinstance(model, torch.nn.Module) else model)
        group = {"max_norm": max_norm, "fixed_norm": fixed_norm, "zero_mean": zero_mean}
        project_rows_([p.detach() for p in params], [resolve_constraint(p, _opt_args(p), group) for p in params])


register(
    Entry(
        "neroplus",
        NeroPlus,
        "Adam- or Nero-like steps keeping each output row at zero mean and a fixed or bounded norm (ALF)",
        "Liu et al., 2021. Learning by Turning: Neural Architecture Aware Optimisation. arXiv:2102.07227",
        ("ALF NeroPlus (alf/optimizers/nero_plus.py)",),
        # The registry builds optimizers on arbitrary parameters (capability probes on zeros, the test matrix, the
        # command line): there, unnormalized parameters are projected by the first step instead of raising.
        preset={"check_normalized": False},
        # Mostly inactive constraints (rows of the matrix's random parameters have norms below 10, no centring): an
        # active projection moves unnormalized parameters even at lr = 0, which the generic matrix forbids.
        example={
            "lr": 1e-2,
            "betas": (0.0, 0.99),
            "eps": 1e-6,
            "normalizing_grad_by_norm": True,
            "max_norm": 10.0,
            "weight_decay": 0.01,
            "l2_regularization": 1e-3,
            "fixed_norm": False,
            "zero_mean": False,
        },
        invalid=(
            ({"betas": (0.9, 0.0)}, "betas"),
            ({"max_norm": 0.0}, "max_norm"),
            ({"l2_regularization": -1.0}, "l2_regularization"),
            ({"eps": -1.0}, "eps"),
        ),
        sharding="per-tensor reduction",
    )
)
