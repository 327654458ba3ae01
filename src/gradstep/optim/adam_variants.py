r"""Adam's variants that reorder its two moments: ADOPT and LaProp.

ADOPT (Taniguchi et al., 2024, arXiv:2411.02853) normalises the gradient by the *previous* second moment, then takes
the momentum of the normalised (and clipped) gradient; LaProp (Ziyin, Wang & Ueda, 2020, arXiv:2002.04839)
normalises first and takes the momentum of the normalised gradient, with the learning rate inside the momentum.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..core.hypers import Hyper, beta_pair, boolean, non_negative, non_negative_int, one_of
from ..core.ops import TensorList, is_number, uniform
from ..core.optimizer import ChainedOptimizer
from ..core.registry import Entry, register
from ..core.transform import BufferInit, GroupStep, Transform, coef_mul, zeros

__all__ = ["ADOPT", "LaProp", "ScaleByADOPT", "ScaleByLaProp"]


def _optional_non_negative(value: Any) -> str | None:
    if value is None:
        return None
    return non_negative(value)


def _scalar_zero(param: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros((), dtype=dtype, device=param.device)


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


class ScaleByLaProp(Transform):
    r"""LaProp's moments (see :class:`LaProp`).

    State: ``exp_avg`` (m, which holds the learning rate), ``exp_avg_sq`` (v), ``exp_avg_lr_1`` (the EMA of the
    learning rate, a 0-d tensor), and with options ``exp_mean_avg_beta2`` (centered) and ``max_exp_avg_sq``
    (amsgrad): pytorch_optimizer's names.
    """

    elementwise = True
    hypers = (
        Hyper("betas", (0.9, 0.999), beta_pair, "decay rates of the momentum and of v", scalar=False),
        Hyper("eps", 1e-15, non_negative, "term added to the denominator"),
        Hyper("centered", False, boolean, "subtract the squared EMA of g from v (after the warm-up steps)"),
        Hyper("steps_before_using_centered", 10, non_negative_int, "steps before the centering is used"),
        Hyper("amsgrad", False, boolean, "use the running maximum of v"),
        Hyper(
            "eps_mode",
            "torch",
            one_of("torch", "tf"),
            "where eps goes: 'torch': sqrt(v_hat) + eps, v_hat = v/(1-beta2^t); 'tf': (sqrt(v) + eps)/sqrt(1-beta2^t)",
        ),
    )

    def buffers(self, group: dict[str, Any]) -> dict[str, BufferInit]:
        names: dict[str, BufferInit] = {"exp_avg": zeros, "exp_avg_sq": zeros, "exp_avg_lr_1": _scalar_zero}
        if group["centered"]:
            names["exp_mean_avg_beta2"] = zeros
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = zeros
        return names

    def update(self, ctx: GroupStep, updates: TensorList) -> TensorList:
        ops = ctx.ops
        beta1, beta2 = ctx.hyper("betas")
        eps = ctx.hyper("eps")
        exp_avg, exp_avg_sq = ctx.buffer("exp_avg"), ctx.buffer("exp_avg_sq")
        ops.mul_(exp_avg_sq, beta2)
        ops.addcmul_(exp_avg_sq, updates, updates, 1 - beta2)
        second = exp_avg_sq
        if ctx.hyper("centered"):
            mean = ctx.buffer("exp_mean_avg_beta2")
            ops.lerp_(mean, updates, 1 - beta2)
            use = (ctx.steps > ctx.hyper("steps_before_using_centered")).to(torch.float64)
            second = ops.sub(exp_avg_sq, ops.mul(ops.mul(mean, mean), ctx.per_param(use)))
        if ctx.hyper("amsgrad"):
            ops.maximum_(ctx.buffer("max_exp_avg_sq"), second)
            second = ctx.buffer("max_exp_avg_sq")
        sqrt_bc2 = ctx.per_param(torch.sqrt(ctx.bias_correction(beta2)))
        denom = ops.sqrt(second)
        if ctx.hyper("eps_mode") == "torch":
            ops.div_(denom, sqrt_bc2)
            ops.add_(denom, eps)
        else:
            ops.add_(denom, eps)
            ops.div_(denom, sqrt_bc2)
        # The learning rate enters the momentum (so a schedule acts on each gradient when it arrives), and the step is
        # normalised by the EMA of the learning rate instead of 1 - beta1^t; the core then multiplies by lr again.
        lr = coef_mul(ctx.param_hyper("lr"), ctx.param_hyper("lr_scale"))
        ops.mul_(exp_avg, beta1)
        ops.add_scaled_(exp_avg, ops.div(updates, denom), coef_mul(lr, 1 - beta1))
        lr_avg = ctx.buffer("exp_avg_lr_1")
        ops.mul_(lr_avg, beta1)
        ops.add_(lr_avg, coef_mul(lr, 1 - beta1))
        averages = torch.stack(lr_avg).to(torch.float64)
        # No learning rate yet (all zero): no step, as the reference's bias correction of 1 times a zero momentum.
        inverse = torch.where(averages == 0, torch.zeros_like(averages), 1.0 / averages)
        return ops.mul(exp_avg, ctx.per_param(inverse))


class LaProp(ChainedOptimizer):
    r"""LaProp: momentum of the RMS-normalised gradient (Adam with momentum and adaptivity separated).

    .. math::
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\text{lr}_t\, \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    .. math::
        a_t = \beta_1 a_{t-1} + (1-\beta_1)\,\text{lr}_t, \qquad p_t = p_{t-1} - \text{lr}_t\, m_t / a_t

    With a constant lr, :math:`a_t = \text{lr}(1-\beta_1^t)` and this is the paper's
    :math:`p_t = p_{t-1} - \text{lr}\, \hat m_t` for the momentum :math:`\hat m` of normalised gradients. Options:
    ``centered`` (subtract the squared EMA of g from v after ``steps_before_using_centered`` steps), ``amsgrad``,
    ``eps_mode="tf"`` (pytorch_optimizer's :math:`(\sqrt{v} + \epsilon)/\sqrt{1-\beta_2^t}`). Decoupled weight
    decay by default.

    Ziyin, Wang & Ueda, 2020. LaProp: Separating Momentum and Adaptivity in Adam. arXiv:2002.04839.

    .. warning::
        Differences from pytorch_optimizer 4.1.0's ``LaProp``:

        * Its denominator is :math:`(\sqrt{v + 10^{-15}} + \epsilon)/\sqrt{1-\beta_2^t}`: ``eps_mode="tf"`` gives
          the placement of eps; the :math:`10^{-15}` inside the root is not added (it moves results by less than
          :math:`10^{-15}/v`).
        * It decays the weights *after* the step (:math:`(p - \Delta)(1 - \text{lr}\lambda)`, official code's
          order); gradstep decays before, as AdamW (:math:`p(1 - \text{lr}\lambda) - \Delta`): they differ by
          :math:`\text{lr}\lambda\Delta`. Its coupled mode (``weight_decouple=False``) adds :math:`\lambda p` to the
          gradient after the step, where it has no effect; gradstep's ``weight_decay_mode="coupled"`` adds it
          before. ``fixed_decay`` is not provided.
        * Its foreach path computes the step sizes :math:`\text{lr}/a_t` in float32, also for float64 parameters;
          gradstep in the state dtype (its per-parameter path's float64).
        * ``exp_avg_lr_2`` is not kept (it is :math:`1-\beta_2^t`); ``exp_avg_lr_1`` is a 0-d tensor (a Python float
          there). The step count is per parameter; ``lr = 0`` gives no step (there: a step of the momentum).

    Example::

        >>> import torch, gradstep
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = gradstep.LaProp([w], lr=0.1)
        >>> w.grad = torch.tensor([0.2, -0.4]); _ = opt.step()   # first step: lr * g / |g|
        >>> w.detach()
        tensor([ 0.9000, -0.9000])
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        centered: bool = False,
        steps_before_using_centered: int = 10,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("weight_decay_mode", "decoupled")
        super().__init__(
            params,
            [ScaleByLaProp()],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            centered=centered,
            steps_before_using_centered=steps_before_using_centered,
            amsgrad=amsgrad,
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
register(
    Entry(
        "laprop",
        LaProp,
        "Momentum of the RMS-normalised gradient, learning rate inside the momentum",
        "Ziyin, Wang & Ueda, 2020. LaProp: Separating Momentum and Adaptivity in Adam. arXiv:2002.04839",
        ("LaProp (official code)", "pytorch_optimizer LaProp"),
        example={
            "lr": 1e-2,
            "betas": (0.8, 0.99),
            "eps": 1e-8,
            "weight_decay": 0.02,
            "centered": True,
            "steps_before_using_centered": 2,
            "amsgrad": True,
        },
        invalid=(
            ({"steps_before_using_centered": -1}, "steps_before_using_centered"),
            ({"eps_mode": "keras"}, "eps_mode"),
            ({"betas": (1.0, 0.9)}, "betas"),
        ),
    )
)
