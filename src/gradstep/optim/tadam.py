r"""TAdam: Adam with a Student-t weighted first moment (Ilboudo, Kobayashi & Sugimoto, 2020, arXiv:2003.00179).

Each gradient enters the first moment with a weight from a Student-t likelihood, so outlying gradients move it less;
the second moment, the torch-style eps and the step are Adam's. See :class:`ScaleByTAdam` for the update.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, boolean, non_negative, optional_positive
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import tensor_dots, tensor_numels
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros
from .adam import BETAS, adam_denominator

__all__ = ["ScaleByTAdam", "TAdam"]


class ScaleByTAdam(Transform):
    r"""TAdam's Student-t weighted first moment, with Adam's second moment and scaling.

    Per parameter of :math:`d` elements, with degrees of freedom :math:`\nu` (``dof``, default :math:`d`):

    .. math::
        w_t = \frac{\nu + d}{\nu + \sum_j (g_{t,j} - m_{t-1,j})^2 / (v_{t-1,j} + \epsilon)},\qquad
        m_t = \frac{W_{t-1}}{W_{t-1} + w_t} m_{t-1} + \frac{w_t}{W_{t-1} + w_t} g_t,\qquad
        W_t = \frac{2\beta_1 - 1}{\beta_1} W_{t-1} + w_t

    with :math:`W_0 = \beta_1 / (1 - \beta_1)`, then Adam's :math:`v_t` (or its running maximum with ``amsgrad``)
    and :math:`d_t = (m_t / (1-\beta_1^t)) / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon)`.

    State (holocron's names): ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad) and ``W_t`` (shape ``(1,)``).
    The sum in :math:`w_t` is one inner product per tensor (:func:`~gradstep.core.reductions.tensor_dots`).
    """

    hypers = (
        BETAS,
        Hyper("eps", 1e-8, non_negative, "term added to the denominator and to v in the Student-t weight"),
        Hyper("amsgrad", False, boolean, "use the running maximum of v (Reddi et al., 2018)"),
        Hyper("dof", None, optional_positive, "degrees of freedom nu of the Student-t (None: the parameter's numel)"),
    )

    def check_group(self, group: dict[str, Any]) -> None:
        # W_t decays by (2*beta1 - 1)/beta1: beta1 = 0 divides by zero (holocron raises ZeroDivisionError mid-step).
        if group["betas"][0] == 0:
            raise ValueError(f"Invalid betas: {group['betas']!r} (TAdam needs betas[0] > 0)")

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        beta1 = group["betas"][0]

        def initial_weight(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((1,), beta1 / (1 - beta1), dtype=dtype, device=param.device)

        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_sq": zeros}
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        names["W_t"] = initial_weight
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps, dof = ctx.hyper("eps"), ctx.hyper("dof")
        exp_avg, exp_avg_sq, weights = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq"), ctx.buffer("W_t")

        # The Student-t weight of this gradient, from the previous m and v (one reduction per tensor).
        residual = ops.sub(updates, exp_avg)
        mahalanobis = tensor_dots(residual, ops.div(residual, ops.add(exp_avg_sq, eps))).to(torch.float64)
        numel = tensor_numels(updates).to(mahalanobis.device)  # of the whole tensor, also when sharded
        nu = numel if dof is None else torch.full_like(numel, float(dof))
        w = (nu + numel) / (nu + mahalanobis)
        big_w = torch.cat([x.to(torch.float64) for x in weights])
        ops.mul_(exp_avg, ctx.per_param(big_w / (big_w + w)))
        ops.add_scaled_(exp_avg, updates, ctx.per_param(w / (big_w + w)))
        new_w = big_w * ((2 * beta1 - 1) / beta1) + w
        ops.copy_(weights, ops.to(list(new_w.split(1)), [x.dtype for x in weights]))

        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        second = exp_avg_sq
        if ctx.hyper("amsgrad"):
            second = ctx.buffer("max_exp_avg_sq")
            ops.maximum_(second, exp_avg_sq)
        denom = adam_denominator(ctx, second, beta2, eps)  # a fresh tensor: scaled in place
        ops.mul_(denom, ctx.per_param(ctx.bias_correction(beta1)))
        return ops.quotient(exp_avg, denom)


class TAdam(ChainedOptimizer):
    r"""TAdam: Adam whose first moment down-weights outlying gradients (Student-t likelihood).

    .. math::
        w_t = \frac{\nu + d}{\nu + \sum_j \frac{(g_{t,j} - m_{t-1,j})^2}{v_{t-1,j} + \epsilon}},\quad
        m_t = \frac{W_{t-1} m_{t-1} + w_t g_t}{W_{t-1} + w_t},\quad
        W_t = \frac{2\beta_1 - 1}{\beta_1} W_{t-1} + w_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    .. math::
        p_t = p_{t-1} - \frac{\text{lr}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`d` the number of elements of the parameter, :math:`\nu` = ``dof`` (default :math:`d`),
    :math:`W_0 = \beta_1/(1-\beta_1)`, :math:`m_0 = v_0 = 0`; ``amsgrad`` uses the running maximum of :math:`v`.
    Weight decay is coupled (L2, ``g + wd * p`` before the moments) by default, as in holocron. Since
    :math:`v_0 = 0`, the first weight is about :math:`\epsilon` and the first steps are tiny: this is the algorithm,
    not a bug.

    Ilboudo, Kobayashi & Sugimoto, 2020. TAdam: A Robust Stochastic Gradient Optimizer. arXiv:2003.00179.

    .. warning::
        Differences from holocron ``TAdam`` (pylocron 0.3.0):

        * holocron crashes on 0-d parameters (its ``(1,)``-shaped ``W_t`` cannot scale a 0-d ``exp_avg`` in place);
          gradstep handles them (``d = 1``).
        * ``betas[0] = 0`` raises ``ValueError`` at construction; holocron raises ``ZeroDivisionError`` in ``step``.
        * ``dof`` is validated (``None`` or > 0); holocron accepts any value.
        * holocron's docstring gives :math:`v_t` an EMA of :math:`g_t - g_{t-1}`; its code (and gradstep) use
          :math:`g_t^2`.
        * The weight :math:`w_t` and :math:`W_t` are computed in float64 (holocron: in the parameter's dtype).
        * ``step`` is a 0-d float tensor (holocron: a Python int); ``W_t`` keeps holocron's name and shape.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.TAdam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()
        >>> opt.state[w]["W_t"]
        tensor([8.])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        dof: float | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByTAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            dof=dof,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "tadam",
        TAdam,
        "Adam with a Student-t weighted first moment (robust to outlying gradients)",
        "Ilboudo, Kobayashi & Sugimoto, 2020. TAdam: A Robust Stochastic Gradient Optimizer. arXiv:2003.00179",
        ("holocron TAdam",),
        example={"lr": 2e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01, "amsgrad": True, "dof": 3.0},
        invalid=(
            ({"betas": (0.0, 0.999)}, "betas"),
            ({"dof": -1.0}, "dof"),
            ({"eps": -1e-8}, "eps"),
        ),
        sharding="per-tensor reduction",
    )
)
