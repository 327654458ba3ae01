r"""Adan: adaptive Nesterov momentum (Xie et al., 2022, arXiv:2208.06677), in its official formulation.

Per parameter, at step t, with :math:`\delta_t = g_t - g_{t-1}` (:math:`\delta_1 = 0`):

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\delta_t,\qquad
    n_t = \beta_3 n_{t-1} + (1-\beta_3)\,(g_t + \beta_2 \delta_t)^2

.. math::
    d_t = \frac{m_t/(1-\beta_1^t) + \beta_2\, v_t/(1-\beta_2^t)}{\sqrt{n_t/(1-\beta_3^t)} + \epsilon},\qquad
    p_t = \frac{p_{t-1} - \text{lr}\, d_t}{1 + \text{lr}\cdot\text{wd}}

(proximal weight decay, the paper's and the official code's default).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, beta_triple, boolean, non_negative
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.reductions import global_norm
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["Adan", "ScaleByAdan"]


class ScaleByAdan(Transform):
    r"""Adan's three moments and scaling (see the module docstring).

    With ``max_grad_norm`` :math:`c > 0`, the group's gradients are first scaled by
    :math:`\min(1, c / (\lVert G \rVert + \epsilon))`, :math:`\lVert G \rVert` their global norm (pytorch_optimizer's
    clipping, over the group). The previous gradient kept for :math:`\delta` is the clipped one.

    State (pytorch_optimizer's names): ``exp_avg`` (m), ``exp_avg_diff`` (v, the EMA of gradient differences),
    ``exp_avg_sq`` (n), ``prev_grad`` (:math:`g_{t-1}`, holocron's name; pytorch_optimizer keeps
    :math:`-g_{t-1}` as ``previous_grad``) and, with ``amsgrad``, ``max_exp_avg_sq`` (the running maximum of n).
    """

    # Element by element but for the optional clipping, whose global norm is the same over real views: complex
    # parameters work as pairs of reals (as in pytorch_optimizer).
    elementwise = True
    hypers = (
        Hyper("betas", (0.98, 0.92, 0.99), beta_triple, "decay rates of m, v (differences) and n", scalar=False),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator (and to the norm when clipping)"),
        Hyper("amsgrad", False, boolean, "use the running maximum of n (holocron's option)"),
        Hyper("max_grad_norm", 0.0, non_negative, "clip the group's gradients to this global norm first (0: off)"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_diff": zeros, "exp_avg_sq": zeros}
        names["prev_grad"] = zeros
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        return names

    def needs_whole_group(self, group: dict[str, Any]) -> bool:
        return group["max_grad_norm"] > 0

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2, beta3 = ctx.hyper("betas")
        eps, max_norm = ctx.hyper("eps"), ctx.hyper("max_grad_norm")
        grads = updates
        if max_norm > 0:
            factor = torch.clamp(max_norm / (global_norm(grads).to(torch.float64) + eps), max=1.0)
            # One factor per tensor in its own dtype, so that a 0-d float32 gradient is not promoted to float64.
            grads = ops.mul(grads, [factor.to(g.dtype) for g in grads])

        exp_avg, exp_avg_diff, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_diff"), ctx.buffer("exp_avg_sq")
        prev_grad = ctx.buffer("prev_grad")
        # On a parameter's first step there is no previous gradient: delta = 0 (official code), not g - 0.
        first = ctx.per_param(ctx.steps == 1)
        delta = ops.sub(grads, ops.where(first, grads, prev_grad))
        ops.lerp_(exp_avg, grads, 1 - beta1)
        ops.lerp_(exp_avg_diff, delta, 1 - beta2)
        nesterov = ops.add(grads, ops.mul(delta, beta2))
        ops.mul_(exp_avg_sq, beta3)
        ops.addcmul_(exp_avg_sq, nesterov, nesterov, 1 - beta3)
        ops.copy_(prev_grad, grads)

        second = exp_avg_sq
        if ctx.hyper("amsgrad"):
            second = ctx.buffer("max_exp_avg_sq")
            ops.maximum_(second, exp_avg_sq)
        sqrt_bc3 = torch.sqrt(ctx.bias_correction(beta3))
        denom = ops.add(ops.div(ops.sqrt(second), ctx.per_param(sqrt_bc3)), eps)
        numerator = ops.div(exp_avg, ctx.per_param(ctx.bias_correction(beta1)))
        ops.add_scaled_(numerator, exp_avg_diff, ctx.per_param(beta2 / ctx.bias_correction(beta2)))
        return ops.quotient(numerator, denom)


class Adan(ChainedOptimizer):
    r"""Adan: Adam with a Nesterov-style momentum built from gradient differences (official formulation).

    .. math::
        \delta_t = g_t - g_{t-1}\ (\delta_1 = 0),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \delta_t,\quad
        n_t = \beta_3 n_{t-1} + (1-\beta_3) (g_t + \beta_2\delta_t)^2

    .. math::
        p_t = \Big(p_{t-1} - \text{lr}\,
        \frac{m_t/(1-\beta_1^t) + \beta_2 v_t/(1-\beta_2^t)}{\sqrt{n_t/(1-\beta_3^t)} + \epsilon}\Big)
        \Big/ (1 + \text{lr}\cdot\text{wd})

    Weight decay is proximal by default (``weight_decay_mode="proximal"``, pytorch_optimizer's
    ``weight_decouple=False``); ``"decoupled"`` multiplies ``p`` by ``1 - lr * wd`` before the step
    (``weight_decouple=True``); ``"coupled"`` adds ``wd * p`` to the gradient (neither original's choice alone).
    ``amsgrad`` uses the running maximum of :math:`n` (holocron's option). ``max_grad_norm > 0`` first scales the
    group's gradients by :math:`\min(1, c / (\lVert G\rVert + \epsilon))`.

    Xie, Zhou, Li, Lin & Yan, 2022. Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models.
    arXiv:2208.06677.

    .. warning::
        Differences from pytorch_optimizer ``Adan`` (4.1.0):

        * ``max_grad_norm`` clips by the norm of the **group's** gradients (pytorch_optimizer: of all groups together,
          with the first group's ``max_grad_norm`` and ``eps``, a norm computed in float32); with one group and
          float32 they agree. With coupled weight decay the clipped gradient includes ``wd * p``.
        * The previous gradient is kept as ``prev_grad`` = :math:`g_{t-1}` (pytorch_optimizer: ``previous_grad`` =
          :math:`-g_{t-1}`).
        * The step count is per parameter (pytorch_optimizer: per group). ``amsgrad`` and coupled decay are
          additions. The ``**kwargs`` extras (``use_gc``, ``adanorm``) are not provided. ``betas[2] = 1`` is
          rejected (pytorch_optimizer accepts it and divides by zero). pytorch_optimizer writes ``maximize`` and
          the clipping into ``p.grad``; gradstep never modifies gradients.

        Differences from holocron ``Adan`` (pylocron 0.3.0), whose two bugs are not reproduced:

        * holocron never updates ``prev_grad`` (it stays 0, so :math:`\delta_t = g_t`, :math:`v` is a second EMA
          of :math:`g` and :math:`n` an EMA of :math:`((1+\beta_2) g)^2`). gradstep keeps the previous gradient,
          with :math:`\delta_1 = 0`. The two agree exactly when ``betas[1] = 0`` (then :math:`\delta` does not
          reach the parameters, :math:`m` or :math:`n`; only :math:`v` and ``prev_grad`` differ).
        * holocron applies weight decay twice (coupled L2 in the gradient, then the proximal division); gradstep
          applies it once, as ``weight_decay_mode`` says. They agree when ``weight_decay = 0``.
        * State: holocron's ``exp_avg_sq`` is v and ``exp_avg_delta`` is n; gradstep uses pytorch_optimizer's
          names (``exp_avg_diff`` is v, ``exp_avg_sq`` is n, ``max_exp_avg_sq`` for amsgrad).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> opt = gradstep.optim.adan.Adan([w], lr=0.1)
        >>> w.grad = torch.tensor([0.1, 0.2, 0.3]); _ = opt.step()
        >>> w.grad = torch.tensor([0.3, 0.2, 0.1]); _ = opt.step()
        >>> torch.equal(opt.state[w]["prev_grad"], w.grad)
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        max_grad_norm: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "proximal")
        super().__init__(
            params,
            [ScaleByAdan()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            max_grad_norm=max_grad_norm,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "adan",
        Adan,
        "Adaptive Nesterov momentum from gradient differences, proximal weight decay",
        "Xie, Zhou, Li, Lin & Yan, 2022. Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep "
        "Models. arXiv:2208.06677",
        ("pytorch_optimizer Adan", "holocron Adan (where its bugs do not act)"),
        example={
            "lr": 1e-2,
            "betas": (0.9, 0.9, 0.95),
            "eps": 1e-6,
            "weight_decay": 0.02,
            "amsgrad": True,
            "max_grad_norm": 5.0,
        },
        invalid=(
            ({"betas": (0.98, 0.92)}, "betas"),
            ({"max_grad_norm": -1.0}, "max_grad_norm"),
            ({"eps": -1e-8}, "eps"),
        ),
    )
)
