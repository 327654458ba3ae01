r"""Factored second moments: Adafactor (Shazeer & Stern, 2018) and CAME (Luo et al., 2023).

Both keep, for a parameter of at least two dimensions, the exponential moving averages of a squared statistic
:math:`S` (of shape :math:`(\dots, n, m)`) reduced over its last dimension and over its second-to-last,
:math:`R_t = \beta R_{t-1} + (1-\beta)\,\mathrm{mean}_{-1}(S_t)` and
:math:`C_t = \beta C_{t-1} + (1-\beta)\,\mathrm{mean}_{-2}(S_t)`, and estimate the full average by the rank-one

.. math::
    \hat V_t = \frac{R_t\, C_t}{\mathrm{mean}_{-2}(R_t)}

(:class:`FactoredSecondMoment`: :math:`n + m` numbers per matrix instead of :math:`nm`). Scalars and vectors keep the
full average. The reductions go through the shared, sharding-aware :func:`~gradstep.core.reductions.dim_means`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import REQUIRED, Hyper, beta_triple, boolean, non_negative, positive
from ..core.ops import PER_TENSOR, Coef, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import dim_means, tensor_norms, tensor_numels
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["CAME", "Adafactor", "FactoredSecondMoment", "ScaleByAdafactor", "ScaleByCAME"]


def _pick(coef: Coef, idx: list[int]) -> Coef:
    return [coef[i] for i in idx] if isinstance(coef, (list, tuple)) else coef  # type: ignore[return-value]


class FactoredSecondMoment:
    """The factored moving average of a squared statistic (see the module docstring), shared by Adafactor and CAME.

    Args:
        row, col: state keys of :math:`R` and :math:`C` (parameters of at least 2 dims; ``None`` for the others).
        full: state key of the full average of smaller parameters (``None``: such parameters keep none).
        keepdim: :math:`R`, :math:`C` keep the reduced dimension as size 1 (torch's ``(..., n, 1)``/``(..., 1, m)``),
            or drop it (fairseq's, HF's and CAME's ``(..., n)``/``(..., m)``).
    """

    def __init__(self, row: str, col: str, full: str | None, keepdim: bool) -> None:
        self.row, self.col, self.full, self.keepdim = row, col, full, keepdim

    def buffers(self) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {self.row: self._row_init, self.col: self._col_init}
        if self.full is not None:
            names[self.full] = self._full_init
        return names

    def _row_init(self, param: Tensor, dtype: torch.dtype) -> Any:
        if param.dim() < 2:
            return None
        shape = (*param.shape[:-1], 1) if self.keepdim else param.shape[:-1]
        return torch.zeros(shape, dtype=dtype, device=param.device)

    def _col_init(self, param: Tensor, dtype: torch.dtype) -> Any:
        if param.dim() < 2:
            return None
        last = (1, param.shape[-1]) if self.keepdim else (param.shape[-1],)
        return torch.zeros((*param.shape[:-2], *last), dtype=dtype, device=param.device)

    @staticmethod
    def _full_init(param: Tensor, dtype: torch.dtype) -> Any:
        return zeros(param, dtype) if param.dim() < 2 else None

    @staticmethod
    def factored(ctx: GroupStep) -> tuple[list[int], list[int]]:
        """Indices of the group's parameters with a factored moment (at least 2 dims), and of the others."""
        fac = [i for i, p in enumerate(ctx.params) if p.dim() >= 2]
        return fac, [i for i, p in enumerate(ctx.params) if p.dim() < 2]

    def _rows_cols(self, ctx: GroupStep, idx: list[int]) -> tuple[TensorList, TensorList]:
        rows = [ctx.states[i][self.row] for i in idx]
        cols = [ctx.states[i][self.col] for i in idx]
        if self.keepdim:
            return rows, cols
        return [r.unsqueeze(-1) for r in rows], [c.unsqueeze(-2) for c in cols]  # views: updates reach the state

    def accumulate_(self, ctx: GroupStep, squares: TensorList, weight: Coef) -> None:
        """Move the averages towards ``squares`` (one per parameter) by ``weight`` (the new value's weight)."""
        fac, flat = self.factored(ctx)
        if fac:
            rows, cols = self._rows_cols(ctx, fac)
            chosen = [squares[i] for i in fac]
            ctx.ops.lerp_(rows, dim_means(chosen, -1), _pick(weight, fac))
            ctx.ops.lerp_(cols, dim_means(chosen, -2), _pick(weight, fac))
        if flat and self.full is not None:
            ctx.ops.lerp_([ctx.states[i][self.full] for i in flat], [squares[i] for i in flat], _pick(weight, flat))

    def estimate(self, ctx: GroupStep, idx: list[int], floor: float = 0.0) -> TensorList:
        r""":math:`\hat V` of the parameters ``idx`` (all factored, or all not); the row mean floored at ``floor``."""
        if not idx:
            return []
        if ctx.params[idx[0]].dim() < 2:
            return [ctx.states[i][self.full] for i in idx]  # type: ignore[index]
        rows, cols = self._rows_cols(ctx, idx)
        means = dim_means(rows, -2)
        if floor > 0:
            means = ctx.ops.clamp(means, floor, math.inf)
        return ctx.ops.mul(ctx.ops.div(rows, means), cols)  # the division on the small factor: one full-size pass

    def inverse_root(self, ctx: GroupStep, idx: list[int]) -> TensorList:
        r""":math:`1/\sqrt{\hat V}` of the parameters ``idx`` (all factored, or all not), as the product of the factors'
        roots (fairseq's and CAME's form: no underflow of the product :math:`R\,C` in float32)."""
        if not idx:
            return []
        if ctx.params[idx[0]].dim() < 2:
            return list(torch._foreach_reciprocal(ctx.ops.sqrt([ctx.states[i][self.full] for i in idx])))  # type: ignore[index]
        rows, cols = self._rows_cols(ctx, idx)
        row_factors = ctx.ops.sqrt(ctx.ops.div(dim_means(rows, -2), rows))
        return ctx.ops.div(row_factors, ctx.ops.sqrt(cols))


def _by_kind(ctx: GroupStep, fn: Callable[[list[int]], TensorList]) -> TensorList:
    """``fn`` of the factored parameters' indices and of the others' (each list non-empty), in parameter order."""
    out: list[Any] = [None] * len(ctx)
    for idx in FactoredSecondMoment.factored(ctx):
        if idx:
            for i, value in zip(idx, fn(idx)):
                out[i] = value
    return out


def _rms(xs: TensorList) -> Tensor:
    """The root mean square of each tensor (float64 vector; whole tensors when sharded)."""
    norms = tensor_norms(xs).to(torch.float64)
    return norms / torch.sqrt(tensor_numels(xs).to(norms.device))


def _vector(ctx: GroupStep, value: Coef) -> Tensor:
    """A coefficient as a float64 vector with one entry per parameter."""
    n, device = len(ctx), ctx.steps.device
    if isinstance(value, (list, tuple)):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in value])
    return torch.as_tensor(value, dtype=torch.float64, device=device).expand(n)


def _eps_pair(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (eps1 or None, eps2)"
    if value[0] is not None and non_negative(value[0]) is not None:
        return "eps[0] must be None or a real number >= 0"
    if non_negative(value[1]) is not None:
        return "eps[1] must be a real number >= 0"
    return None


def _eps_reals(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or any(non_negative(v) is not None for v in value):
        return "must be a pair of real numbers >= 0"
    return None


def _non_positive(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0
    return None if ok else "must be a real number <= 0"


def _at_least_one(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1
    return None if ok else "must be a real number >= 1"


def _optional_beta(value: Any) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    return None if ok else "must be None or in [0, 1)"


class ScaleByAdafactor(Transform):
    r"""Adafactor's step direction, in torch's formulation, with the paper's options (see :class:`Adafactor`).

    State: ``row_var`` :math:`(\dots, n, 1)` and ``col_var`` :math:`(\dots, 1, m)` for parameters of at least two
    dimensions, ``variance`` for the others (``None`` where a key does not apply), and ``exp_avg`` with ``beta1``.
    """

    hypers = (
        Hyper("beta2_decay", -0.8, _non_positive, "the second moment's new-value weight is t ** beta2_decay"),
        Hyper(
            "eps",
            (None, 1e-3),
            _eps_pair,
            "(floor of the second moment's root, or None: dtype eps; floor of the parameter RMS)",
            scalar=False,
        ),
        Hyper("d", 1.0, _at_least_one, "update clipping threshold: the update's RMS is scaled down to at most d"),
        Hyper("relative_step", True, boolean, "step size min(lr, 1/sqrt(t)) (the paper's); False: lr"),
        Hyper("scale_parameter", True, boolean, "multiply the step size by max(eps[1], RMS(p))"),
        Hyper("warmup_init", False, boolean, "with relative_step: min(lr * t, 1/sqrt(t)) (HF: lr=1e-6)"),
        Hyper("beta1", None, _optional_beta, "momentum of the scaled update (None: none)", scalar=False),
    )
    moment = FactoredSecondMoment("row_var", "col_var", "variance", keepdim=True)

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names = self.moment.buffers()
        if group["beta1"] is not None:
            names["exp_avg"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops, steps = ctx.ops, ctx.steps
        eps1, eps2 = ctx.hyper("eps")
        self.moment.accumulate_(ctx, ops.mul(updates, updates), ctx.per_param(steps ** ctx.hyper("beta2_decay")))

        def normalized(idx: list[int]) -> TensorList:
            floor = eps1 if eps1 is not None else torch.finfo(ctx.params[idx[0]].dtype).eps
            # torch floors the factored row mean at eps1 and the estimate at eps1**2, then divides by its root.
            estimate = self.moment.estimate(ctx, idx, floor)
            floored = (
                [torch.clamp(v, min=floor * floor) for v in estimate]
                if ops is PER_TENSOR
                else (list(torch._foreach_clamp_min(estimate, floor * floor)))
            )
            return ops.div([updates[i] for i in idx], ops.sqrt(floored))

        scaled = _by_kind(ctx, normalized)

        # The step size relative to lr (the core multiplies by lr): min(lr, 1/sqrt(t)) / lr, and so on.
        factor = torch.ones_like(steps)
        if ctx.hyper("relative_step"):
            lr = _vector(ctx, ctx.param_hyper("lr"))
            cap = 1.0 / (lr * torch.sqrt(steps))  # inf where lr = 0: the core's lr then zeroes the step
            factor = torch.minimum(steps, cap) if ctx.hyper("warmup_init") else torch.clamp(cap, max=1.0)
        if ctx.hyper("scale_parameter"):
            factor = factor * torch.clamp(_rms(ctx.params), min=eps2)
        factor = factor / torch.clamp(_rms(scaled) / ctx.hyper("d"), min=1.0)
        ops.mul_(scaled, ctx.per_param(factor))  # scaled is this step's own temporary
        beta1 = ctx.hyper("beta1")
        if beta1 is None:
            return scaled
        exp_avg = ctx.buffer("exp_avg")
        ops.lerp_(exp_avg, scaled, 1 - beta1)
        return exp_avg


class Adafactor(ChainedOptimizer):
    r"""Adafactor: factored second moments, relative step sizes and update clipping (``torch.optim.Adafactor``).

    Per parameter at step :math:`t`, with :math:`g` the gradient and :math:`\hat V_t` the factored (at least 2
    dims) or full average of :math:`g^2` with new-value weight :math:`t^{c}` (``beta2_decay`` :math:`c`):

    .. math::
        U_t = \frac{g_t}{\sqrt{\max(\hat V_t, \epsilon_1^2)}},\qquad
        \rho_t = \min\big(\text{lr}, 1/\sqrt t\big),\qquad
        \alpha_t = \max\big(\epsilon_2, \mathrm{RMS}(p_{t-1})\big)\,\rho_t

    .. math::
        p_t = p_{t-1}(1 - \text{lr}\cdot\text{wd}) - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\, U_t

    (the factored row mean is floored at :math:`\epsilon_1`, which defaults to the dtype's machine epsilon). The
    paper's options, as in HF transformers' ``Adafactor``: ``relative_step=False`` makes :math:`\rho_t = \text{lr}`;
    ``warmup_init=True`` makes it :math:`\min(\text{lr}\cdot t, 1/\sqrt t)`; ``scale_parameter=False`` drops the
    :math:`\max(\epsilon_2, \mathrm{RMS}(p))` factor; ``beta1`` adds momentum on the scaled, clipped update,
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\alpha_t U_t / \max(1, \cdot)`, stepping by :math:`m_t`.

    Shazeer & Stern, 2018. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost. arXiv:1804.04235.

    .. warning::
        Differences from ``torch.optim.Adafactor`` (torch 2.13): with ``eps[0] = None`` the floor is the machine
        epsilon of the *state* dtype (float32 for bfloat16 parameters; torch: of the parameter's dtype).

        Differences from HF transformers' ``Adafactor`` (5.25), whose options these are: ``eps[0]`` floors the
        second moment (HF adds it to :math:`g^2`: the same unless :math:`g^2` is that small); ``d`` is HF's
        ``clip_threshold`` and ``beta2_decay`` its ``decay_rate``; with ``relative_step`` the step size is capped by
        ``lr`` (HF: by 0.01, or by :math:`10^{-6} t` with ``warmup_init``: ``lr=1e-6`` here) and HF's ``lr`` must
        be ``None``. ``exp_avg`` holds the momentum of the step *divided by lr* (HF's times lr: the same steps at a
        constant lr; under a schedule the current lr scales the whole momentum, as in ``torch.optim.SGD``). Weight
        decay is torch's, :math:`p(1 - \text{lr}\cdot\text{wd})` (HF's subtracts
        :math:`\text{wd}\,\alpha_t\, p`). No ``RMS`` state entry (HF records it; it is recomputed each step).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(2, 3))
        >>> opt = gradstep.Adafactor([w], lr=0.01)
        >>> w.grad = torch.ones(2, 3); _ = opt.step()
        >>> w.detach()[0]
        tensor([0.9900, 0.9900, 0.9900])
        >>> tuple(opt.state[w]["row_var"].shape), tuple(opt.state[w]["col_var"].shape), opt.state[w]["variance"]
        ((2, 1), (1, 3), None)
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        relative_step: bool = True,
        scale_parameter: bool = True,
        warmup_init: bool = False,
        beta1: float | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByAdafactor()],
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            relative_step=relative_step,
            scale_parameter=scale_parameter,
            warmup_init=warmup_init,
            beta1=beta1,
            **options,
        )


class ScaleByCAME(Transform):
    r"""CAME's step direction (see :class:`CAME`).

    State (came_pytorch's names): ``exp_avg``; ``exp_avg_sq_row`` :math:`(\dots, n)`, ``exp_avg_sq_col``
    :math:`(\dots, m)`, ``exp_avg_res_row``, ``exp_avg_res_col`` for parameters of at least two dimensions,
    ``exp_avg_sq`` for the others (``None`` where a key does not apply).
    """

    hypers = (
        Hyper(
            "betas",
            (0.9, 0.999, 0.9999),
            beta_triple,
            "decay rates of m, the squared gradient and the instability",
            scalar=False,
        ),
        Hyper("eps", (1e-30, 1e-16), _eps_reals, "added to g**2 and to the instability", scalar=False),
        Hyper("clip_threshold", 1.0, positive, "the normalized update's RMS is scaled down to at most this"),
    )
    second = FactoredSecondMoment("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", keepdim=False)
    instability = FactoredSecondMoment("exp_avg_res_row", "exp_avg_res_col", None, keepdim=False)

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, **self.second.buffers(), **self.instability.buffers()}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2, beta3 = ctx.hyper("betas")
        eps1, eps2 = ctx.hyper("eps")
        self.second.accumulate_(ctx, ops.add(ops.mul(updates, updates), eps1), 1 - beta2)
        normalized = _by_kind(ctx, lambda idx: ops.mul([updates[i] for i in idx], self.second.inverse_root(ctx, idx)))
        clipped = ops.div(
            normalized, ctx.per_param(torch.clamp(_rms(normalized) / ctx.hyper("clip_threshold"), min=1.0))
        )
        exp_avg = ctx.buffer("exp_avg")
        ops.lerp_(exp_avg, clipped, 1 - beta1)
        fac, _ = self.second.factored(ctx)
        if not fac:
            return exp_avg
        # Confidence: the instability (U_t - m_t)^2 of the factored parameters, averaged the same way.
        residual = ops.sub([clipped[i] for i in fac], [exp_avg[i] for i in fac])
        squares: list[Tensor] = list(clipped)  # placeholders where the instability is not kept
        for i, r in zip(fac, ops.add(ops.mul(residual, residual), eps2)):
            squares[i] = r
        self.instability.accumulate_(ctx, squares, 1 - beta3)
        out = list(exp_avg)
        for i, v in zip(fac, ops.mul([exp_avg[i] for i in fac], self.instability.inverse_root(ctx, fac))):
            out[i] = v
        return out


class CAME(ChainedOptimizer):
    r"""CAME: confidence-guided adaptive memory-efficient optimization (came_pytorch's ``CAME``).

    Per parameter, with factored averages :math:`\hat V` (module docstring) for at least two dimensions and full ones
    otherwise:

    .. math::
        V_t \approx \beta_2 V_{t-1} + (1-\beta_2)(g_t^2 + \epsilon_1),\qquad
        U_t = \frac{g_t/\sqrt{\hat V_t}}{\max(1, \mathrm{RMS}(g_t/\sqrt{\hat V_t})/d)},\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) U_t

    .. math::
        S_t \approx \beta_3 S_{t-1} + (1-\beta_3)\big((U_t - m_t)^2 + \epsilon_2\big),\qquad
        p_t = p_{t-1}(1 - \text{lr}\cdot\text{wd}) - \text{lr}\, \frac{m_t}{\sqrt{\hat S_t}}

    (:math:`d` is ``clip_threshold``; vectors and scalars step by :math:`m_t`, keeping no :math:`S`).

    Luo, Ren, Zheng, Jiang, Jiang & You, 2023. CAME: Confidence-guided Adaptive Memory Efficient Optimization.
    ACL 2023, arXiv:2307.02047.

    .. warning::
        Differences from came_pytorch ``CAME`` (0.1.3): no ``RMS`` state entry (came_pytorch records the
        parameter's RMS and never reads it); ``step`` is a tensor (came_pytorch: an int); the moving averages are
        ``lerp`` (came_pytorch: ``mul`` then ``add``; equal to rounding). ``betas`` must be in [0, 1)
        (came_pytorch accepts 1). bfloat16/float16 parameters keep float32 state (came_pytorch: the gradient's
        float32 copy, the parameter's dtype for ``exp_avg``).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(2, 3))
        >>> opt = gradstep.CAME([w], lr=1e-3)
        >>> w.grad = torch.ones(2, 3); _ = opt.step()
        >>> sorted(k for k, v in opt.state[w].items() if v is not None)
        ['exp_avg', 'exp_avg_res_col', 'exp_avg_res_row', 'exp_avg_sq_col', 'exp_avg_sq_row', 'step']
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = REQUIRED,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByCAME()],
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "adafactor",
        Adafactor,
        "Factored second moments, relative step sizes and update clipping (torch's, with HF's options)",
        "Shazeer & Stern, 2018. Adafactor: Adaptive Learning Rates with Sublinear Memory Cost. arXiv:1804.04235",
        ("torch.optim.Adafactor", "transformers Adafactor"),
        example={"lr": 0.02, "beta2_decay": -0.6, "eps": (1e-20, 1e-3), "d": 1.5, "weight_decay": 0.01},
        invalid=(
            ({"beta2_decay": 0.1}, "beta2_decay"),
            ({"d": 0.5}, "d"),
            ({"eps": (None,)}, "eps"),
            ({"beta1": 1.0}, "beta1"),
        ),
        sharding="per-tensor reduction",
    )
)

register(
    Entry(
        "came",
        CAME,
        "Factored second moments with a confidence-guided (instability-scaled) momentum",
        "Luo, Ren, Zheng, Jiang, Jiang & You, 2023. CAME: Confidence-guided Adaptive Memory Efficient "
        "Optimization. arXiv:2307.02047",
        ("came_pytorch CAME",),
        preset={"lr": REQUIRED},
        example={
            "lr": 2e-3,
            "betas": (0.8, 0.99, 0.999),
            "eps": (1e-30, 1e-12),
            "clip_threshold": 2.0,
            "weight_decay": 0.01,
        },
        invalid=(
            ({"betas": (0.9, 0.999)}, "betas"),
            ({"clip_threshold": 0.0}, "clip_threshold"),
            ({"eps": (-1.0, 1e-16)}, "eps"),
        ),
        sharding="per-tensor reduction",
    )
)
