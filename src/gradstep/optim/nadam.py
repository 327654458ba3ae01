r"""NAdam: Adam with Nesterov momentum (Dozat, 2016), with torch's momentum schedule.

Per parameter, at step t, with :math:`\psi` = ``momentum_decay``:

.. math::
    \mu_t = \beta_1\left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
    \Pi_t = \prod_{i \le t} \mu_i \ \text{(state ``mu_product``)}, \qquad
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

.. math::
    d_t = \left(\frac{1-\mu_t}{1-\Pi_t}\, g_t + \frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}}\, m_t\right)
    \Big/ \left(\sqrt{v_t / (1-\beta_2^t)} + \epsilon\right)

and ``p <- p - lr * d``. Weight decay is the core's: coupled (torch's default) or decoupled
(``decoupled_weight_decay=True``, NAdamW).

Dozat, 2016. Incorporating Nesterov Momentum into Adam. ICLR workshop (openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ).
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, non_negative
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, scalar_state, zeros
from .adam import BETAS

__all__ = ["NAdam", "ScaleByNAdam"]


class ScaleByNAdam(Transform):
    """NAdam's moments, momentum schedule and Nesterov look-ahead (see the module docstring).

    State (torch's names): ``exp_avg``, ``exp_avg_sq`` and ``mu_product``, a 0-d tensor in torch's dtype for it
    (float32 unless float64 is the default dtype), so that the product rounds as torch's does.
    """

    elementwise = True
    hypers = (
        BETAS,
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("momentum_decay", 4e-3, non_negative, "psi: the momentum schedule mu_t = beta1 (1 - 0.96^(t psi) / 2)"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros, "mu_product": scalar_state(1.0)}

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        psi = ctx.hyper("momentum_decay")
        base = torch.tensor(0.96, dtype=torch.float64, device=ctx.steps.device)
        mu = beta1 * (1.0 - 0.5 * torch.pow(base, ctx.steps * psi))
        mu_next = beta1 * (1.0 - 0.5 * torch.pow(base, (ctx.steps + 1) * psi))
        mu_products = ctx.buffer("mu_product")
        ops.mul_(mu_products, ctx.per_param(mu))  # rounded to the state's dtype, as torch's product is
        product = torch.stack(mu_products).to(torch.float64)
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.lerp_(exp_avg, updates, 1 - beta1)
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        denom = ops.sqrt(exp_avg_sq)  # fresh: divided and shifted in place
        ops.div_(denom, ctx.per_param(torch.sqrt(ctx.bias_correction(beta2))))
        ops.add_(denom, ctx.hyper("eps"))
        numerator = ops.mul(updates, ctx.per_param((1.0 - mu) / (1.0 - product)))
        ops.add_scaled_(numerator, exp_avg, ctx.per_param(mu_next / (1.0 - product * mu_next)))
        return ops.quotient(numerator, denom)


class NAdam(ChainedOptimizer):
    r"""NAdam, a drop-in for ``torch.optim.NAdam`` (lr 2e-3, momentum_decay 4e-3).

    .. math::
        d_t = \left(\frac{1-\mu_t}{1-\Pi_t}\, g_t + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\, m_t\right)
        \Big/ \left(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\right)

    ``decoupled_weight_decay=True`` (torch's flag) is ``weight_decay_mode="decoupled"``. Dozat (2016).

    .. warning::
        Differences from torch.optim.NAdam: the gradient and momentum terms are added before the one division
        (torch divides each, in two writes), which changes the rounding only. ``capturable``/``differentiable`` are
        not arguments (``compiled=True`` is the fast path).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = gradstep.NAdam([w], lr=1e-2, momentum_decay=4e-3)
        >>> w.grad = torch.tensor([1.0, -1.0, 0.0]); _ = opt.step()
        >>> sorted(opt.state[w]), opt.state[w]["mu_product"].dtype
        (['exp_avg', 'exp_avg_sq', 'mu_product', 'step'], torch.float32)
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        if decoupled_weight_decay:  # torch.optim.NAdam's flag, as the core's weight_decay_mode
            options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByNAdam()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "nadam",
        NAdam,
        "Adam with Nesterov momentum and torch's momentum schedule (mu_product)",
        "Dozat, 2016. Incorporating Nesterov Momentum into Adam. ICLR 2016 workshop",
        ("torch.optim.NAdam",),
        example={"lr": 1e-2, "betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.02, "momentum_decay": 0.01},
        invalid=(
            ({"momentum_decay": -1e-3}, "momentum_decay"),
            ({"betas": (1.0, 0.9)}, "betas"),
            ({"eps": -1.0}, "eps"),
        ),
    )
)
