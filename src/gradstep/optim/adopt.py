r"""ADOPT (Taniguchi et al., 2024, arXiv:2411.02853): Adam's variant that normalises the gradient by the *previous*
second moment, then takes the momentum of the normalised (and clipped) gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.hypers import Hyper, beta_pair, non_negative
from ..core.ops import TensorList, is_number, uniform
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, zeros

__all__ = ["ADOPT", "ScaleByADOPT"]


def _optional_non_negative(value: Any) -> str | None:
    if value is None:
        return None
    return non_negative(value)


class ScaleByADOPT(Transform):
    r"""ADOPT's moments (see :class:`ADOPT`). State: ``exp_avg`` (m), ``exp_avg_sq`` (v), the authors' names.

    A parameter's first step only sets :math:`v = g^2` and returns a zero direction.
    """

    elementwise = True
    hypers = (
        Hyper("betas", (0.9, 0.9999), beta_pair, "decay rates of the first and second moments", scalar=False),
        Hyper("eps", 1e-6, non_negative, "lower bound of sqrt(v) in the normalisation"),
        Hyper("clip_exponent", 0.25, _optional_non_negative, "clip g/sqrt(v) to ±t**exponent (None: off)"),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        return {"exp_avg": zeros, "exp_avg_sq": zeros}

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        later = (ctx.steps > 1).to(torch.float64)  # 0 on a parameter's first step: only v is set, to g^2
        denom = ops.sqrt(exp_avg_sq)
        ops.clamp_(denom, ctx.hyper("eps"), math.inf)
        normed = ops.div(updates, denom)
        exponent = ctx.hyper("clip_exponent")
        if exponent is not None:
            clip = uniform(ctx.per_param(torch.pow(ctx.steps, exponent)))
            if is_number(clip):
                ops.clamp_(normed, -float(clip), float(clip))  # type: ignore[arg-type]
            else:
                # One bound per tensor, as c * clamp(x / c, -1, 1): the foreach clamps take a single bound.
                normed = ops.mul(ops.clamp(ops.div(normed, clip), -1.0, 1.0), clip)
        ops.lerp_(exp_avg, normed, uniform(ctx.per_param(later * (1 - beta1))))
        ops.mul_(exp_avg_sq, uniform(ctx.per_param(later * beta2)))
        ops.addcmul_(exp_avg_sq, updates, updates, uniform(ctx.per_param(1 - later * beta2)))
        keep = uniform(ctx.per_param(later))
        return exp_avg if is_number(keep) and keep == 1 else ops.mul(exp_avg, keep)


class ADOPT(ChainedOptimizer):
    r"""ADOPT: Adam with the second moment taken *after* the step, and a clipped normalised gradient.

    .. math::
        v_1 = g_1^2,\ \text{no step at } t = 1; \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,
        \operatorname{clip}\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, t^{c}\Big),

    .. math::
        p_t = p_{t-1} - \text{lr}\, m_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    with :math:`\operatorname{clip}(x, c) = \max(-c, \min(c, x))` and ``clip_exponent`` :math:`c` (the authors'
    ``clip_lambda = step ** 0.25``; ``None`` turns clipping off). :math:`t` counts the parameter's steps, the first
    (which only sets :math:`v`) included, as the authors' code does. Coupled weight decay by default (the authors'
    ``decouple=False``); ``decoupled_weight_decay=True`` or ``weight_decay_mode="decoupled"`` is AdamW's.

    Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa & Matsuo, 2024. ADOPT: Modified
    Adam Can Converge with Any beta2 with the Optimal Rate. NeurIPS 2024, arXiv:2411.02853.

    .. warning::
        Differences from the authors' code and pytorch_optimizer 4.1.0's ``ADOPT``:

        * The clipping schedule is ``clip_exponent`` (:math:`c = t^{\text{exponent}}`), not a ``clip_lambda``
          callable (a function in the param groups would not survive ``state_dict``/``weights_only`` loading);
          ``clip_exponent=None`` is ``clip_lambda=None``.
        * Where the parameters of a group are at different step counts, the clip is computed as
          ``c * clamp(x / c, -1, 1)``: equal to ``clamp(x, -c, c)`` up to one rounding.
        * The step count is per parameter (pytorch_optimizer: per group, so a parameter that first gets a gradient
          later is stepped there with a zero ``v``). pytorch_optimizer's ``fixed_decay``, ``cautious`` (here the
          core's ``cautious=True``) and ``stable_adamw`` options: only ``cautious`` is provided.
        * The paper indexes the clip by the update count (:math:`t - 1` here); gradstep follows the code.

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = gradstep.ADOPT([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -1.0]); _ = opt.step()   # sets v = g^2, no step
        >>> w.detach()
        tensor([1., 2.])
        >>> w.grad = torch.tensor([0.5, -1.0]); _ = opt.step()   # m = 0.1 * g / |g|
        >>> w.detach()
        tensor([0.9900, 2.0100])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip_exponent: float | None = 0.25,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        if decoupled_weight_decay:  # the authors' `decouple` flag
            options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByADOPT()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            clip_exponent=clip_exponent,
            maximize=maximize,
            foreach=foreach,
            **options,
        )


register(
    Entry(
        "adopt",
        ADOPT,
        "Adam with the second moment updated after the step and a clipped normalised gradient",
        "Taniguchi et al., 2024. ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate. "
        "arXiv:2411.02853",
        ("ADOPT (authors' code)", "pytorch_optimizer ADOPT"),
        example={"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-5, "weight_decay": 0.01, "clip_exponent": 0.3},
        invalid=(({"clip_exponent": -1.0}, "clip_exponent"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps")),
    )
)
