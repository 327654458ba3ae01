r"""RMSProp (Tieleman & Hinton, 2012, Coursera lecture 6.5), with the variants of torch, fastai and GoMLX.

.. math::
    v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\qquad
    \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)},\qquad
    s_t = \sqrt{\frac{v_t}{c_t} - \left(\frac{\bar g_t}{c_t}\right)^2_{[\text{centered}]}} + \epsilon

with :math:`c_t = 1 - \alpha^t` when ``bias_correction`` (GoMLX), else 1 (torch, fastai). With momentum
:math:`\mu > 0`:

* ``momentum_on="scaled"`` (torch): :math:`b_t = \mu b_{t-1} + g_t / s_t`, :math:`d_t = b_t`;
* ``momentum_on="grad"`` (fastai): :math:`b_t = \mu b_{t-1} + g_t`, :math:`d_t = b_t / s_t`.

Without momentum :math:`d_t = g_t / s_t`. Centered RMSProp: Graves (2013), arXiv:1308.0850.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.hypers import Hyper, boolean, momentum_factor, non_negative, one_of, unit_interval_closed
from ..core.ops import Direction, TensorList
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["RMSProp", "RMSprop", "ScaleByRms"]


class ScaleByRms(Transform):
    """RMSProp's scaling and momentum (see the module docstring).

    State (torch's names): ``square_avg``; ``grad_avg`` when centered; ``momentum_buffer`` when momentum > 0.
    """

    elementwise = True
    hypers = (
        Hyper("alpha", 0.99, unit_interval_closed, "decay rate of the squared-gradient average"),
        Hyper("eps", 1e-8, non_negative, "term added to the denominator"),
        Hyper("momentum", 0.0, momentum_factor, "momentum factor (in [0, 1])"),
        Hyper("centered", False, boolean, "normalise by the estimated variance instead of the second moment"),
        Hyper("bias_correction", False, boolean, "divide the averages by 1 - alpha^t (GoMLX)"),
        Hyper("momentum_on", "scaled", one_of("scaled", "grad"), "torch: momentum of g/s; fastai: of g"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"square_avg": zeros}
        if group["centered"]:
            names["grad_avg"] = zeros
        if group["momentum"] != 0:
            names["momentum_buffer"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> Direction:
        ops = ctx.ops
        alpha, eps, mu = ctx.hyper("alpha"), ctx.hyper("eps"), ctx.hyper("momentum")
        square_avg = ctx.buffer("square_avg")
        ops.mul_(square_avg, alpha)
        ops.addcmul_(square_avg, updates, updates, 1 - alpha)
        correction = ctx.per_param(ctx.bias_correction(alpha)) if ctx.hyper("bias_correction") else None
        second = square_avg if correction is None else ops.div(square_avg, correction)
        if ctx.hyper("centered"):
            grad_avg = ctx.buffer("grad_avg")
            ops.lerp_(grad_avg, updates, 1 - alpha)
            mean = grad_avg if correction is None else ops.div(grad_avg, correction)
            second = ops.clone(second)
            ops.addcmul_(second, mean, mean, -1.0)
        denom = ops.sqrt(second)  # fresh: shifted in place
        ops.add_(denom, eps)
        if ctx.is_zero("momentum"):
            return ops.quotient(updates, denom)
        buf = ctx.buffer("momentum_buffer")
        ops.mul_(buf, mu)
        if ctx.hyper("momentum_on") == "scaled":
            ops.add_(buf, ops.div(updates, denom))
            return buf
        ops.add_(buf, updates)
        return ops.quotient(buf, denom)


class RMSprop(ChainedOptimizer):
    """RMSProp, a drop-in for ``torch.optim.RMSprop`` (lr 1e-2, alpha 0.99, eps 1e-8).

    fastai's variant is ``momentum_on="grad", weight_decay_mode="decoupled"``; GoMLX's is ``alpha=0.999, eps=1e-7,
    bias_correction=True`` (see :mod:`gradstep.recipes`).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            params,
            [ScaleByRms()],
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


RMSProp = RMSprop


register(
    Entry(
        "rmsprop",
        RMSprop,
        "RMSProp with torch's, fastai's and GoMLX's variants as options",
        "Tieleman & Hinton, 2012. Lecture 6.5, RMSProp (Coursera); Graves, 2013 (centered). arXiv:1308.0850",
        ("torch.optim.RMSprop", "fastai RMSProp", "GoMLX RMSProp"),
        example={"lr": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01, "momentum": 0.5, "centered": True},
        invalid=(({"alpha": 1.5}, "alpha"), ({"eps": -1.0}, "eps"), ({"momentum_on": "both"}, "momentum_on")),
    )
)
